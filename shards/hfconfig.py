"""A Hugging Face config.json translated into the kernels' `ModelConfig`, for each family
`shards.families` knows, or an error naming what is not supported; and the dtype a span is
served in when none is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from kernels import ModelConfig, UnsupportedModelError
from kernels.config import ROPE_TYPES, LatentAttentionConfig, RopeConfig
from kernels.rope import yarn_mscale
from shards.errors import CheckpointError
from shards.families import FAMILY_DEFAULTS
from shards.manifest import Manifest

__all__ = [
    "DTYPES", "FAMILY_DEFAULTS", "SUPPORTED_FAMILIES", "compute_dtype_of", "embedding_dtype", "model_config_from_hf",
]  # fmt: skip

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
