"""What a span's weights cost and what quantizing them changed: the bytes of weights one
decode token reads (`weight_bytes_per_token`: what `bench/quant.py` divides by the memory's
streaming rate), and how far a tensor or a quantized span's layers are from a reference
(`relative_error`, `layer_errors`: the native library's load-time check and the quality tests).
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING

import torch
from torch import nn

from kernels.packed import PackedTensor

if TYPE_CHECKING:
    from kernels.span import SpanModel

__all__ = ["layer_errors", "relative_error", "weight_bytes_per_token"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes_per_token(span: nn.Module) -> int:
    """Bytes of weights one decode token reads: every weight once, except the experts (top_k of
    E of them, in expectation) and the embedding (one row)."""
    total = 0
    expert_tensors: set[int] = set()
    for module in span.modules():
        cfg, gate_up, down = (getattr(module, a, None) for a in ("cfg", "gate_up", "down"))
        if cfg is None or gate_up is None or down is None:
            continue
        tensors = [t for m in (gate_up, down) for t in (m.buffers() if isinstance(m, nn.Module) else [m])]
        expert_tensors |= {id(t) for t in tensors}
        packed = sum(m.nbytes for m in (gate_up, down) if isinstance(m, PackedTensor))
        total += round((sum(_nbytes(t) for t in tensors) + packed) * cfg.top_k / cfg.num_experts)
    for module in span.modules():  # packed projections (the experts' are counted above)
        if isinstance(module, PackedTensor) and len(module.value.packed) == 1 and len(module.shape) == 2:
            total += module.nbytes
    for name, t in chain(span.named_parameters(), span.named_buffers()):
        if id(t) in expert_tensors or name.endswith("inv_freq"):
            continue
        total += t.shape[-1] * t.element_size() if name == "embed_tokens.weight" else _nbytes(t)
    return total


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - ref|| / ||ref||`` in fp32."""
    ref32 = ref.float()
    return float((approx.float() - ref32).norm() / ref32.norm().clamp(min=torch.finfo(torch.float32).tiny))


def layer_errors(reference: SpanModel, quantized: SpanModel, x: torch.Tensor) -> list[float]:
    """Relative error of each layer's output of `quantized` against `reference` on input `x`
    (one prefill from position 0; errors accumulate down the layers, as in a real forward)."""
    outputs: list[list[torch.Tensor]] = [[], []]
    hooks = []
    for i, span in enumerate((reference, quantized)):
        for layer in span.layers:
            hooks.append(layer.register_forward_hook(lambda _m, _a, out, i=i: outputs[i].append(out.detach())))
    try:
        for span in (reference, quantized):
            span(x, span.new_cache(x.shape[1]), 0)
    finally:
        for hook in hooks:
            hook.remove()
    return [relative_error(r, q) for r, q in zip(outputs[0], outputs[1], strict=True)]
