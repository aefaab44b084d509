"""Read a Hugging Face safetensors checkpoint: its architecture, its identity, a span's weights.

Only the tensors of the requested span are read (safetensors memory-maps each file and
copies out the named tensors). Checkpoints store experts one by one
(``experts.{e}.w1/w3/w2`` for Mixtral, ``experts.{e}.gate_proj/up_proj/down_proj`` for
Qwen3-MoE); they are fused here into ``gate_up [E, 2I, H]`` and ``down [E, H, I]``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kernels import QUANT_MODES, ModelConfig, SpanModel, UnsupportedModelError, pack_span, quantize_span, split_span
from kernels.config import ROPE_TYPES, LatentAttentionConfig, RopeConfig
from kernels.rope import yarn_mscale
from shards.errors import CheckpointError, SpanSpecError
from shards.families import FAMILY_DEFAULTS
from shards.manifest import Manifest, load_manifest

__all__ = ["Checkpoint", "DTYPES", "FAMILY_DEFAULTS", "compute_dtype_of", "embedding_dtype", "model_config_from_hf"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SUPPORTED_FAMILIES = tuple(FAMILY_DEFAULTS)
# GPT-OSS's rope when its config names none (transformers' GptOssConfig.__post_init__)
_GPT_OSS_ROPE: dict[str, Any] = dict(
    rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096
)
_QUANTIZATIONS = ("fp8", "mxfp4")


class _Reader:
    """config.json values with the family's defaults behind them."""

    def __init__(self, hf: dict[str, Any], family: str) -> None:
        self.hf, self.defaults = hf, FAMILY_DEFAULTS[family]

    def __call__(self, key: str) -> Any:
        if key in self.hf:
            return self.hf[key]
        if key in self.defaults:
            return self.defaults[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self(key)
        except KeyError:
            return default


def _rope(get: _Reader, family: str, rotary_dim: int) -> RopeConfig:
    """transformers' rope standardisation: rope_scaling over rope_parameters, theta and defaults filled in."""
    hf = get.hf
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if not params and family == "gpt_oss":
        params = dict(_GPT_OSS_ROPE)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"not supported: rope_type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    theta = params.get("rope_theta", get.get("rope_theta"))
    if theta is None:
        raise UnsupportedModelError("not supported: the config names no rope_theta")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    max_pos = int(get("max_position_embeddings"))
    original = params.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn"):
        original = hf.get("original_max_position_embeddings", original) or max_pos

    def num(key: str) -> float | None:
        value = params.get(key)
        return None if value is None else float(value)

    if rope_type in ("linear", "dynamic", "llama3") and params.get("factor") is None:
        raise UnsupportedModelError(f"not supported: rope_type {rope_type!r} without a factor")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        dim=int(rotary_dim * float(partial)) if not family.startswith("deepseek") else rotary_dim,
        max_position_embeddings=max_pos,
        factor=num("factor"),
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=num("low_freq_factor"),
        high_freq_factor=num("high_freq_factor"),
        beta_fast=num("beta_fast"),
        beta_slow=num("beta_slow"),
        mscale=num("mscale"),
        mscale_all_dim=num("mscale_all_dim"),
        attention_factor=num("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _check_quantization(hf: dict[str, Any]) -> None:
    quant = hf.get("quantization_config")
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in _QUANTIZATIONS:
        raise UnsupportedModelError(
            f"not supported: quantization {method!r} (supported: block-scaled fp8, GPT-OSS mxfp4 experts)"
        )
    if method == "fp8" and quant.get("fmt", "e4m3") != "e4m3":
        raise UnsupportedModelError(f"not supported: quantization 'fp8' in format {quant.get('fmt')!r} (only e4m3)")
    if method == "mxfp4" and hf.get("model_type") != "gpt_oss":
        raise UnsupportedModelError("not supported: quantization 'mxfp4' outside GPT-OSS's experts")


def compute_dtype_of(hf: Mapping[str, Any], stored: Callable[[], str]) -> torch.dtype:
    """The dtype a span is served in when none is asked for: the config's, else that of the
    embedding as stored (`stored()`: its safetensors dtype name, read only when needed)."""
    named = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(named, str) and named in DTYPES:
        return DTYPES[named]
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored(), torch.float32)


def embedding_dtype(manifest: Manifest) -> str:
    entry = manifest.tensor("model.embed_tokens.weight")
    return entry.dtype if entry is not None else "F32"


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a transformers config.json into the kernels' ModelConfig, or say what is unsupported."""
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"not supported: model_type {family!r} (supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    _check_quantization(hf)
    get = _Reader(hf, family)
    act = get("hidden_act")
    if act != "silu" and family != "gpt_oss":  # GPT-OSS's experts have their own activation
        raise UnsupportedModelError(f"not supported: hidden_act {act!r} (only silu)")
    try:
        return _model_config(get, family)
    except KeyError as missing:
        raise CheckpointError(f"config.json lacks {missing} for model_type {family!r}") from None
    except (TypeError, ValueError) as bad:  # ModelConfig's own checks, or a non-numeric field
        raise CheckpointError(f"config.json is inconsistent: {bad}") from None


def _model_config(get: _Reader, family: str) -> ModelConfig:
    hidden, heads, layers = int(get("hidden_size")), int(get("num_attention_heads")), int(get("num_hidden_layers"))
    head_dim = int(get.get("head_dim") or hidden // heads)
    kv_heads = int(get("num_key_value_heads") or heads)
    every = tuple(range(layers))
    opts: dict[str, Any] = {}
    rotary_dim = head_dim
    if family.startswith("deepseek"):
        rotary_dim = int(get("qk_rope_head_dim"))
    rope = _rope(get, family, rotary_dim)
    if family in ("llama", "mixtral", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss"):
        opts.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")))
    if family in ("mixtral", "granitemoe", "gpt_oss"):
        opts.update(num_experts=int(get("num_local_experts")), top_k=int(get("num_experts_per_tok")))
    if family in ("mixtral", "granitemoe"):
        opts.update(moe_intermediate_size=int(get("intermediate_size")), moe_layers=every)
    if family == "mixtral":
        window = get("sliding_window")
        opts.update(sliding_window=window, sliding_layers=every if window else ())
    if family in ("qwen3_moe", "qwen2_moe", "olmoe"):
        experts = int(get("num_experts") if "num_local_experts" not in get.hf else get("num_local_experts"))
        step = int(get.get("decoder_sparse_step", 1))
        dense = set(get.get("mlp_only_layers") or [])
        moe = tuple(i for i in every if i not in dense and experts > 0 and (i + 1) % step == 0)
        opts.update(
            num_experts=experts,
            top_k=int(get("num_experts_per_tok")),
            moe_intermediate_size=int(get("moe_intermediate_size") if family != "olmoe" else get("intermediate_size")),
            norm_topk_prob=bool(get("norm_topk_prob")),
            router_weights_in_model_dtype=True,
            moe_layers=moe,
        )
    if family == "qwen3_moe":
        window = get("sliding_window") if get("use_sliding_window") else None
        opts.update(qk_norm="head", sliding_window=window, sliding_layers=every if window else ())
    if family == "qwen2_moe":
        window = get("sliding_window") if get("use_sliding_window") else None
        types = get.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < int(get("max_window_layers")) and window else "full_attention"
            for i in every
        ]
        sliding = tuple(i for i in every if types[i] == "sliding_attention") if window else ()
        opts.update(
            qkv_bias=bool(get("qkv_bias")),
            sliding_window=window,
            sliding_layers=sliding,
            shared_expert_size=int(get("shared_expert_intermediate_size")),
            shared_expert_gate=True,
        )
    if family == "olmoe":
        opts.update(qk_norm="full", clip_qkv=get("clip_qkv"))
        if head_dim * heads != hidden:
            raise UnsupportedModelError("not supported: OLMoE with head_dim * heads != hidden_size")
    if family == "granitemoe":
        opts.update(
            router="topk_softmax",
            attention_scale=float(get("attention_multiplier")),
            embedding_multiplier=float(get("embedding_multiplier")),
            residual_multiplier=float(get("residual_multiplier")),
            logits_scaling=float(get("logits_scaling")),
        )
    if family.startswith("deepseek"):
        opts.update(_deepseek(get, family, rope, layers))
        kv_heads = heads  # latent attention expands the kv latent to every head
    if family == "gpt_oss":
        window = get("sliding_window")
        types = get.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in every]
        opts.update(
            sliding_window=window,
            sliding_layers=tuple(i for i in every if types[i] == "sliding_attention") if window else (),
            attention_sinks=True,
            moe_intermediate_size=int(get("intermediate_size")),
            moe_layers=every,
            router="topk_softmax",
            router_bias=True,
            expert_style="gpt_oss",
            swiglu_alpha=float(get("swiglu_alpha")),
            swiglu_limit=float(get("swiglu_limit")),
            norm_cast_after_weight=True,
            fp32_params_under_fp16=("input_layernorm.weight", "post_attention_layernorm.weight", "norm.weight"),
        )
    return ModelConfig(
        family=family,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(get.get("intermediate_size") or 0),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope=rope,
        max_position_embeddings=rope.max_position_embeddings,
        mlp_bias=bool(get("mlp_bias")) if family == "llama" else False,
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        **opts,
    )


def _deepseek(get: _Reader, family: str, rope: RopeConfig, layers: int) -> dict[str, Any]:
    """DeepSeek-V3 (sigmoid, noaux_tc routing, interleaved rope) and V2 (softmax routing, complex rope)."""
    if family == "deepseek_v3":
        topk_method, scoring = get.get("topk_method", "noaux_tc"), get.get("scoring_func", "sigmoid")
        if topk_method != "noaux_tc" or scoring != "sigmoid":
            raise UnsupportedModelError(
                f"not supported: DeepSeek-V3 routing {scoring!r}/{topk_method!r} (only sigmoid scoring with noaux_tc)"
            )
        routing: dict[str, Any] = dict(
            router="sigmoid_group",
            norm_topk_prob=bool(get("norm_topk_prob")),
            rope_style="interleave" if get("rope_interleave") else "half",
            fp32_params=("mlp.router", "mlp.score_bias"),
        )
    else:
        topk_method = get("topk_method")
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(f"not supported: DeepSeek-V2 topk_method {topk_method!r}")
        routing = dict(
            router="softmax_group",
            group_limited=topk_method == "group_limited_greedy",
            rope_style="complex",
            fp32_params=("mlp.router",),
        )
    if get("num_experts_per_tok") is None:
        raise CheckpointError(f"config.json lacks 'num_experts_per_tok' for model_type {family!r}")
    mla = LatentAttentionConfig(
        q_lora_rank=None if get("q_lora_rank") is None else int(get("q_lora_rank")),
        kv_lora_rank=int(get("kv_lora_rank")),
        qk_nope_head_dim=int(get("qk_nope_head_dim")),
        qk_rope_head_dim=int(get("qk_rope_head_dim")),
        v_head_dim=int(get("v_head_dim")),
    )
    scale = mla.qk_head_dim**-0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:  # transformers' yarn_apply_mscale
        assert rope.factor is not None
        mscale = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * mscale * mscale
    experts = int(get("n_routed_experts"))
    return dict(
        routing,
        mla=mla,
        attention_scale=scale,
        qkv_bias=bool(get("attention_bias")),
        o_bias=bool(get("attention_bias")),
        num_experts=experts,
        top_k=int(get("num_experts_per_tok")),
        moe_intermediate_size=int(get("moe_intermediate_size")),
        moe_layers=tuple(range(int(get("first_k_dense_replace")), layers)),
        n_group=int(get("n_group") or 1),
        topk_group=int(get("topk_group") or 1),
        routed_scaling_factor=float(get("routed_scaling_factor")),
        shared_expert_size=int(get("moe_intermediate_size")) * int(get("n_shared_experts") or 0),
    )


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class _Source:
    """How one of our parameters is made from checkpoint tensors."""

    names: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


def _one(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


class Checkpoint:
    """A local Hugging Face checkpoint folder: config.json plus one or more .safetensors files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json (expected a Hugging Face checkpoint folder)")
        try:
            self.hf_config: dict[str, Any] = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_path}: unreadable ({e})") from None
        self.config = model_config_from_hf(self.hf_config)
        self._files = self._index()
        self._model_id: str | None = None
        self._family = self.config.family
        quant = self.hf_config.get("quantization_config") or {}
        self._quant_method: str | None = quant.get("quant_method")
        block = quant.get("weight_block_size")
        self._block_size: tuple[int, int] | None = (int(block[0]), int(block[1])) if block else None

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def _index(self) -> dict[str, Path]:
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no .safetensors files")
        index: dict[str, Path] = {}
        for file in files:
            for name in _safetensors_header(file):
                index[name] = file
        return index

    def model_id(self) -> str:
        """The hash of the model's manifest (`shards.manifest`): config, tokenizer files and every
        tensor's layout and sha256. Cached in the folder, so only the first call reads the weights;
        a folder assembled from fetched tensors carries the manifest of the whole model."""
        if self._model_id is None:
            self._model_id = load_manifest(self.path).model_id
        return self._model_id

    def _moe_sources(self, layer: int) -> dict[str, _Source]:
        """Our MoE block's parameters (router, gate_up, down, ...) from the family's checkpoint names."""
        cfg, family, files = self.config, self._family, self._files
        e_count = cfg.num_experts
        mlp = f"model.layers.{layer}.mlp"
        if family == "gpt_oss":
            experts = f"{mlp}.experts"
            sources = {
                "router": _Source((f"{mlp}.router.weight",), _one),
                "router_bias": _Source((f"{mlp}.router.bias",), _one),
                "gate_up_bias": _Source((f"{experts}.gate_up_proj_bias",), _one),
                "down_bias": _Source((f"{experts}.down_proj_bias",), _one),
            }
            for ours, theirs in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                if f"{experts}.{theirs}_blocks" in files:  # MXFP4: [E, out, in/32, 16] nibbles + [E, out, in/32]
                    sources[ours] = _Source((f"{experts}.{theirs}_blocks", f"{experts}.{theirs}_scales"), _mxfp4)
                else:
                    sources[ours] = _Source((f"{experts}.{theirs}",), _one)
            return sources
        if family == "granitemoe":
            base = f"model.layers.{layer}.block_sparse_moe"
            return {
                "router": _Source((f"{base}.router.layer.weight",), _one),
                "gate_up": _Source((f"{base}.input_linear.weight",), _one),
                "down": _Source((f"{base}.output_linear.weight",), _one),
            }
        if family == "mixtral":
            base = f"model.layers.{layer}.block_sparse_moe"
            gate, up, down = "w1", "w3", "w2"
        else:
            base = mlp
            gate, up, down = "gate_proj", "up_proj", "down_proj"
        router = f"{base}.gate.weight"
        sources = {}
        if cfg.shared_expert_size:
            shared = f"{base}.shared_experts" if family.startswith("deepseek") else f"{base}.shared_expert"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                sources[f"shared.{proj}.weight"] = _Source((f"{shared}.{proj}.weight",), _one)
        if cfg.shared_expert_gate:
            sources["shared_gate.weight"] = _Source((f"{base}.shared_expert_gate.weight",), _one)
        if cfg.router == "sigmoid_group":
            sources["score_bias"] = _Source((f"{base}.gate.e_score_correction_bias",), _one)
        fused = f"{mlp}.experts"
        if f"{fused}.gate_up_proj" in files:  # already fused by transformers 5
            router = router if router in files else f"{mlp}.gate.weight"
            return sources | {
                "router": _Source((router,), _one),
                "gate_up": _Source((f"{fused}.gate_up_proj",), _one),
                "down": _Source((f"{fused}.down_proj",), _one),
            }
        gates = tuple(f"{base}.experts.{e}.{gate}.weight" for e in range(e_count))
        ups = tuple(f"{base}.experts.{e}.{up}.weight" for e in range(e_count))
        downs = tuple(f"{base}.experts.{e}.{down}.weight" for e in range(e_count))

        def fuse_gate_up(ts: list[torch.Tensor]) -> torch.Tensor:  # E x [I, H] gates, then E x [I, H] ups
            return torch.stack([torch.cat(pair) for pair in zip(ts[:e_count], ts[e_count:], strict=True)])

        return sources | {
            "router": _Source((router,), _one),
            "gate_up": _Source(gates + ups, fuse_gate_up),
            "down": _Source(downs, torch.stack),
        }

    def _sources(self, span: SpanModel) -> dict[str, _Source]:
        """Map every parameter of `span` to the checkpoint tensors it is built from."""
        cfg = self.config
        sources: dict[str, _Source] = {}
        for local, layer in enumerate(range(span.start, span.end)):
            ours = f"layers.{local}."
            moe = self._moe_sources(layer) if cfg.is_moe_layer(layer) else {}
            for name, _ in span.layers[local].named_parameters():
                if name.startswith("mlp.") and moe:
                    sources[ours + name] = moe[name.removeprefix("mlp.")]
                else:
                    sources[ours + name] = _Source((f"model.layers.{layer}.{name}",), _one)
        if span.embed_tokens is not None:
            sources["embed_tokens.weight"] = _Source(("model.embed_tokens.weight",), _one)
        if span.norm is not None:
            sources["norm.weight"] = _Source(("model.norm.weight",), _one)
            head = "lm_head.weight"
            if cfg.tie_word_embeddings or head not in self._files:
                head = "model.embed_tokens.weight"
            sources["lm_head.weight"] = _Source((head,), _one)
        return sources

    def _read(self, names: tuple[str, ...]) -> Iterator[torch.Tensor]:
        """The named tensors; block-scaled FP8 weights come out dequantized to fp32."""
        handles: dict[Path, Any] = {}

        def get(name: str) -> torch.Tensor:
            file = self._files.get(name)
            if file is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            tensor: torch.Tensor = handles[file].get_tensor(name)
            return tensor

        for name in names:
            tensor = get(name)
            if tensor.dtype in _FP8:
                if self._quant_method != "fp8":
                    raise UnsupportedModelError(
                        f"not supported: float8 tensor {name!r} without an fp8 quantization_config"
                    )
                tensor = _dequantize_fp8(tensor, get(f"{name}_scale_inv"), self._block_size, name)
            yield tensor

    @property
    def compute_dtype(self) -> torch.dtype:
        """The one dtype a span is served in when none is asked for: the config's, else the embedding's."""
        embed = "model.embed_tokens.weight"
        if embed in self._files and self._files[embed].is_file():
            return compute_dtype_of(self.hf_config, lambda: _safetensors_header(self._files[embed])[embed]["dtype"])
        # a folder holding only a middle span: the manifest knows the embedding
        return compute_dtype_of(self.hf_config, lambda: embedding_dtype(load_manifest(self.path)))

    def load_span(
        self,
        start: int,
        end: int,
        dtype: torch.dtype | None = None,
        quantize: str = "none",
        progress: Callable[[int, int], None] | None = None,
        pack: bool = True,
    ) -> SpanModel:
        """Build layers [start, end) with their weights, reading only the tensors they need.

        Every tensor is cast to one compute dtype (`dtype`, else `compute_dtype`), quantized
        ones dequantized first, except those transformers itself keeps in fp32. `quantize`
        ("none" | "bf16" | "int8" | "int4", see `kernels.quant`) is applied once loaded; then bf16
        weights are packed for the CPU's matmuls (`kernels.packed`) and big fp32 ones split over its
        threads (`kernels.gemv`) unless `pack` is false
        (a span to be moved to another device). `progress(done, total)` is called after each
        parameter is read; an exception it raises ends the load.
        """
        if not 0 <= start < end <= self.config.num_layers:
            raise SpanSpecError(
                f"layers {start}:{end} are not inside the model's {self.config.num_layers} layers"
                f" (valid: 0 <= START < END <= {self.config.num_layers})"
            )
        if quantize not in QUANT_MODES:
            raise ValueError(f"unknown quantization {quantize!r} (known: {', '.join(QUANT_MODES)})")
        cfg = self.config
        compute = dtype or self.compute_dtype
        keep32 = cfg.fp32_params + (cfg.fp32_params_under_fp16 if compute == torch.float16 else ())
        with torch.device("meta"):
            span = SpanModel(cfg, start, end)
        state: dict[str, torch.Tensor] = {}
        expected = dict(span.named_parameters())
        sources = self._sources(span)
        for done, (name, source) in enumerate(sources.items(), 1):
            tensor = source.combine(list(self._read(source.names)))
            want = list(expected[name].shape)
            if list(tensor.shape) != want:
                raise CheckpointError(f"{self.path}: {name} has shape {list(tensor.shape)}, the config implies {want}")
            state[name] = tensor.to(torch.float32 if name.endswith(keep32) else compute)
            if progress is not None:
                progress(done, len(sources))
        span.load_state_dict(state, assign=True, strict=True)
        span.rotary = type(span.rotary)(cfg.rope, complex_pairs=cfg.rope_style == "complex")  # real buffer, fp32
        state.clear()  # the span holds the only reference: quantizing then frees each weight
        quantize_span(span, quantize)
        if pack:
            pack_span(span)
            split_span(span)
        return span.eval()


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _dequantize_fp8(
    weight: torch.Tensor,  # [..., N, K] float8
    scale_inv: torch.Tensor,  # [..., ceil(N / bn), ceil(K / bk)] (or one scale)
    block: tuple[int, int] | None,
    name: str,
) -> torch.Tensor:  # [..., N, K] fp32: weight * its block's scale, as transformers' Fp8Dequantize
    w = weight.to(torch.float32)
    s = scale_inv.to(torch.float32)
    if block is None or s.numel() == 1:
        return w * s
    n, k = w.shape[-2:]
    bn, bk = block
    if s.shape[-2:] != (-(-n // bn), -(-k // bk)):
        raise CheckpointError(f"{name}: scales {list(s.shape)} do not tile {[n, k]} in blocks of {[bn, bk]}")
    s = s.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return w * s


def _mxfp4(ts: list[torch.Tensor]) -> torch.Tensor:
    """GPT-OSS MXFP4 experts: [E, out, G, 16] bytes (two e2m1 nibbles, low first) and [E, out, G] e8m0
    exponents -> [E, in, out] fp32 (transposed for ``x @ W``), as transformers' convert_moe_packed_tensors."""
    blocks, scales = ts[0].to(torch.uint8), ts[1].to(torch.int32) - 127
    if blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"mxfp4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32)
    *prefix, groups, width = blocks.shape
    out = torch.empty(*prefix, groups, width * 2, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).to(torch.int)]
    out[..., 1::2] = lut[(blocks >> 4).to(torch.int)]
    out = torch.ldexp(out, scales[..., None])
    return out.reshape(*prefix, groups * width * 2).transpose(1, 2).contiguous()
