"""Read a Hugging Face safetensors checkpoint: its architecture, its identity, a span's weights.

Only the tensors of the requested span are read (safetensors memory-maps each file and
copies out the named tensors). Checkpoints store experts one by one
(``experts.{e}.w1/w3/w2`` for Mixtral, ``experts.{e}.gate_proj/up_proj/down_proj`` for
Qwen3-MoE); they are fused here into ``gate_up [E, 2I, H]`` and ``down [E, H, I]``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kernels import QUANT_MODES, ModelConfig, SpanModel, UnsupportedModelError, quantize_span
from shards.errors import CheckpointError, SpanSpecError

__all__ = ["Checkpoint", "DTYPES", "model_config_from_hf"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_FAMILIES = ("llama", "mixtral", "qwen3_moe")


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(f"not supported: rope_type {rope_type!r} (only the default rotary embedding)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise UnsupportedModelError("not supported: the config names no rope_theta")
    return float(theta)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a transformers config.json into the kernels' ModelConfig, or say what is unsupported."""
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"not supported: model_type {family!r} (supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"not supported: hidden_act {act!r} (only silu)")
    window = hf.get("sliding_window")
    if window is not None and (family != "qwen3_moe" or hf.get("use_sliding_window")):
        raise UnsupportedModelError(f"not supported: sliding-window attention (sliding_window={window})")
    try:
        hidden, heads, layers = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        common: dict[str, Any] = dict(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(hf.get("intermediate_size") or 0),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        if family == "mixtral":
            return ModelConfig(
                **common,
                num_experts=int(hf["num_local_experts"]),
                top_k=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["intermediate_size"]),
                norm_topk_prob=True,
                moe_layers=tuple(range(layers)),
            )
        if family == "qwen3_moe":
            experts = int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"])
            step = int(hf.get("decoder_sparse_step", 1))
            dense = set(hf.get("mlp_only_layers") or [])
            moe = tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
            return ModelConfig(
                **common,
                num_experts=experts,
                top_k=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                router_weights_in_model_dtype=True,
                moe_layers=moe,
                qk_norm=True,
            )
        return ModelConfig(**common)
    except KeyError as missing:
        raise CheckpointError(f"config.json lacks {missing} for model_type {family!r}") from None
    except ValueError as bad:  # ModelConfig's own checks, or a non-numeric field
        raise CheckpointError(f"config.json is inconsistent: {bad}") from None


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
        self._family = self.config.family

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
        """Content-derived id: a hash of config.json and of the weight index.

        The index is every tensor's name, dtype, shape and byte range, and each file's size.
        It is read from the safetensors headers alone, so it costs milliseconds, not a pass
        over the weights; two checkpoints that differ only in tensor values share an id.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self.hf_config, sort_keys=True).encode())
        for file in sorted(set(self._files.values())):
            header = _safetensors_header(file)
            for name in sorted(header):
                meta = header[name]
                digest.update(f"{name}|{meta['dtype']}|{meta['shape']}|{meta['data_offsets']}\n".encode())
            digest.update(f"{file.name}:{file.stat().st_size}\n".encode())
        return digest.hexdigest()[:24]

    def _moe_sources(self, layer: int) -> dict[str, _Source]:
        cfg = self.config
        e_count = cfg.num_experts
        if self._family == "mixtral":
            base = f"model.layers.{layer}.block_sparse_moe"
            router, gate, up, down = f"{base}.gate.weight", "w1", "w3", "w2"
        else:
            base = f"model.layers.{layer}.mlp"
            router, gate, up, down = f"{base}.gate.weight", "gate_proj", "up_proj", "down_proj"
        fused_prefix = f"model.layers.{layer}.mlp.experts"
        if f"{fused_prefix}.gate_up_proj" in self._files:  # already fused by transformers 5
            return {
                "router": _Source(
                    (router if router in self._files else f"model.layers.{layer}.mlp.gate.weight",), _one
                ),
                "gate_up": _Source((f"{fused_prefix}.gate_up_proj",), _one),
                "down": _Source((f"{fused_prefix}.down_proj",), _one),
            }
        gates = tuple(f"{base}.experts.{e}.{gate}.weight" for e in range(e_count))
        ups = tuple(f"{base}.experts.{e}.{up}.weight" for e in range(e_count))
        downs = tuple(f"{base}.experts.{e}.{down}.weight" for e in range(e_count))

        def fuse_gate_up(ts: list[torch.Tensor]) -> torch.Tensor:  # E x [I, H] gates, then E x [I, H] ups
            return torch.stack([torch.cat(pair) for pair in zip(ts[:e_count], ts[e_count:], strict=True)])

        return {
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
        handles: dict[Path, Any] = {}
        for name in names:
            file = self._files.get(name)
            if file is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            yield handles[file].get_tensor(name)

    def load_span(self, start: int, end: int, dtype: torch.dtype | None = None, quantize: str = "none") -> SpanModel:
        """Build layers [start, end) with their weights, reading only the tensors they need.

        `quantize` ("none" | "int8" | "int4", see `kernels.quant`) is applied once loaded.
        """
        if not 0 <= start < end <= self.config.num_layers:
            raise SpanSpecError(
                f"layers {start}:{end} are not inside the model's {self.config.num_layers} layers"
                f" (valid: 0 <= START < END <= {self.config.num_layers})"
            )
        if quantize not in QUANT_MODES:
            raise ValueError(f"unknown quantization {quantize!r} (known: {', '.join(QUANT_MODES)})")
        with torch.device("meta"):
            span = SpanModel(self.config, start, end)
        state: dict[str, torch.Tensor] = {}
        expected = dict(span.named_parameters())
        for name, source in self._sources(span).items():
            tensor = source.combine(list(self._read(source.names)))
            want = list(expected[name].shape)
            if list(tensor.shape) != want:
                raise CheckpointError(f"{self.path}: {name} has shape {list(tensor.shape)}, the config implies {want}")
            state[name] = tensor if dtype is None else tensor.to(dtype)
        span.load_state_dict(state, assign=True, strict=True)
        state.clear()  # the span holds the only reference: quantizing then frees each weight
        span.rotary = type(span.rotary)(self.config.head_dim, self.config.rope_theta)  # real buffer, fp32
        quantize_span(span, quantize)
        return span.eval()
