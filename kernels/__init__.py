"""moemesh compute: span forward with a per-session KV cache, MoE router/experts, attention.

Imports nothing of moemesh's own (torch only). Note: this package shadows Hugging Face's
``kernels`` package of the same name; do not install both in one environment.

The names below are imported from their modules on first use (PEP 562), so that importing
`kernels.errors` (as `shards` does for its errors) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kernels.errors import CacheError, CacheFullError, KernelError, ShapeError, UnsupportedModelError

if TYPE_CHECKING:
    from kernels.attention import attention_reference, attention_sdpa, attention_sinks
    from kernels.cache import KVCache
    from kernels.config import LatentAttentionConfig, ModelConfig, RopeConfig
    from kernels.gemv import SplitLinear, split_available, split_span
    from kernels.measure import layer_errors, relative_error, weight_bytes_per_token
    from kernels.memory import SpanBytes
    from kernels.moe import (
        ClampedSwiGLU,
        Dispatch,
        combine,
        dispatch,
        experts_dense,
        experts_forward,
        experts_gathered,
        experts_grouped,
        experts_one_token,
        experts_reference,
        route,
        route_sigmoid_group,
        route_softmax_group,
        route_topk_softmax,
        run_experts,
    )
    from kernels.packed import PackedLinear, PackedTensor, PackedWeight, pack_span, packing_available
    from kernels.qspan import QuantLinear, QuantTensor, quantize_span
    from kernels.quant import (
        QUANT_MODES,
        Bf16Weight,
        Int4Weight,
        Int8Weight,
        dequantize,
        linear,
        linear_fast,
        linear_reference,
        quantize,
    )
    from kernels.span import SpanModel

_WHERE = {
    **dict.fromkeys(("attention_reference", "attention_sdpa", "attention_sinks"), "attention"),
    **dict.fromkeys(("KVCache",), "cache"),
    **dict.fromkeys(("LatentAttentionConfig", "ModelConfig", "RopeConfig"), "config"),
    **dict.fromkeys(("SplitLinear", "split_available", "split_span"), "gemv"),
    **dict.fromkeys(("SpanBytes",), "memory"),
    **dict.fromkeys(
        (
            "ClampedSwiGLU",
            "Dispatch",
            "combine",
            "dispatch",
            "experts_dense",
            "experts_forward",
            "experts_gathered",
            "experts_grouped",
            "experts_one_token",
            "experts_reference",
            "route",
            "route_sigmoid_group",
            "route_softmax_group",
            "route_topk_softmax",
            "run_experts",
        ),
        "moe",
    ),
    **dict.fromkeys(("PackedLinear", "PackedTensor", "PackedWeight", "pack_span", "packing_available"), "packed"),
    **dict.fromkeys(
        (
            "QUANT_MODES",
            "Bf16Weight",
            "Int4Weight",
            "Int8Weight",
            "dequantize",
            "linear",
            "linear_fast",
            "linear_reference",
            "quantize",
        ),
        "quant",
    ),
    **dict.fromkeys(("QuantLinear", "QuantTensor", "quantize_span"), "qspan"),
    **dict.fromkeys(("layer_errors", "relative_error", "weight_bytes_per_token"), "measure"),
    **dict.fromkeys(("SpanModel",), "span"),
}

__all__ = [
    "CacheError",
    "ClampedSwiGLU",
    "LatentAttentionConfig",
    "RopeConfig",
    "Dispatch",
    "CacheFullError",
    "Bf16Weight",
    "Int4Weight",
    "Int8Weight",
    "KVCache",
    "KernelError",
    "ModelConfig",
    "QUANT_MODES",
    "PackedLinear",
    "PackedTensor",
    "PackedWeight",
    "QuantLinear",
    "QuantTensor",
    "ShapeError",
    "SplitLinear",
    "SpanBytes",
    "SpanModel",
    "UnsupportedModelError",
    "attention_reference",
    "attention_sdpa",
    "attention_sinks",
    "combine",
    "dequantize",
    "dispatch",
    "experts_dense",
    "experts_forward",
    "experts_gathered",
    "experts_grouped",
    "experts_one_token",
    "experts_reference",
    "layer_errors",
    "linear",
    "linear_fast",
    "linear_reference",
    "pack_span",
    "packing_available",
    "quantize",
    "quantize_span",
    "relative_error",
    "split_available",
    "split_span",
    "route",
    "route_sigmoid_group",
    "route_softmax_group",
    "route_topk_softmax",
    "run_experts",
    "weight_bytes_per_token",
]

MOEMESH_KERNELS = True  # marker: tests assert `import kernels` resolves to this package


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"kernels.{module}"), name)
    globals()[name] = value
    return value


del TYPE_CHECKING  # not part of the package
