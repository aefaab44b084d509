"""Quantized weights in a span: the modules that hold them, and `quantize_span`.

`quantize_span` swaps a loaded span's projections (attention q/k/v/o, dense MLP, the LM
head) for `QuantLinear` and its fused experts for `QuantTensor`; routers, norms and the
embedding stay as they are. In "int4" mode the LM head is int8 (as llama.cpp keeps its
output matrix at higher precision), and any weight whose K is not a multiple of the group
falls back to int8. Quantization is per tensor, so a span quantized alone equals the same
layers of a bigger span quantized.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from kernels import native
from kernels.packed import PackedTensor, linears
from kernels.quant import (
    KIND_OF,
    QUANT_MODES,
    AnyWeight,
    Bf16Weight,
    Int4Weight,
    Int8Weight,
    QuantWeight,
    linear,
    quantize,
)

if TYPE_CHECKING:
    from kernels.span import SpanModel

__all__ = ["QuantLinear", "QuantTensor", "as_weight", "quantize_span"]


class QuantTensor(nn.Module):
    """A quantized weight held as buffers (so ``.to()`` and ``state_dict`` see them)."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.kind = KIND_OF[type(weight)]
        self.group = weight.group if isinstance(weight, Int4Weight) else 0
        self.data: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("data", weight.tensors()[0])
        self.register_buffer("scales", weight.tensors()[1])

    @property
    def value(self) -> QuantWeight:
        if self.kind == "int8":
            return Int8Weight(self.data, self.scales)
        if self.kind == "bf16":
            return Bf16Weight(self.data, self.scales)
        return Int4Weight(self.data, self.scales, self.group)

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={list(self.shape)}" + (f", group={self.group}" if self.group else "")


def as_weight(p: torch.Tensor | QuantTensor | PackedTensor) -> AnyWeight:
    """What the matmuls take: a plain tensor as it is, a `QuantTensor`'s or `PackedTensor`'s weight."""
    return p.value if isinstance(p, QuantTensor | PackedTensor) else p


class QuantLinear(nn.Module):
    """``nn.Linear`` over a quantized weight: ``linear(x, w) + bias``."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = QuantTensor(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        y = None
        if x.numel() <= native.MAX_ROWS * x.shape[-1]:  # decode: straight to the C kernel, as linear_fast would
            y = native.gemv(x, w.kind, w.data, w.scales, w.group)
        if y is None:
            y = linear(x, w.value)
        return y if self.bias is None else y + self.bias


def _expert_holders(span: nn.Module) -> Iterator[nn.Module]:
    """Modules holding fused experts as ``gate_up [E, 2I, H]`` and ``down [E, H, I]``."""
    for module in span.modules():
        gate_up, down = getattr(module, "gate_up", None), getattr(module, "down", None)
        if isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3:
            if getattr(module, "gate_up_bias", None) is not None:
                continue  # GPT-OSS: stored transposed with biases (and MXFP4 on disk): kept in the compute dtype
            yield module


@torch.no_grad()
def quantize_span(span: SpanModel, mode: str) -> None:
    """Replace the span's projections and fused experts by quantized ones, in place ("none": no-op).

    Each weight is quantized on its own and its full-precision tensor freed, so the peak
    memory is the loaded span plus one quantized weight.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r} (known: {', '.join(QUANT_MODES)})")
    if mode == "none":
        return
    for parent, name, lin in list(linears(span)):
        head_mode = "int8" if name == "lm_head" and mode == "int4" else mode
        q = quantize(lin.weight, head_mode)
        assert not isinstance(q, torch.Tensor)
        setattr(parent, name, QuantLinear(q, lin.bias))
    for module in list(_expert_holders(span)):
        for name in ("gate_up", "down"):
            q = quantize(getattr(module, name), mode)
            assert not isinstance(q, torch.Tensor)
            delattr(module, name)
            setattr(module, name, QuantTensor(q))
    span.set_exact(False)  # bound to no one's bits: the faster decode ops
    span.quantization = mode
