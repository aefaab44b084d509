"""bf16 weights prepacked in oneDNN's blocked layout, for the CPU's decode matmuls.

``F.linear`` on a plain bf16 weight re-lays the weight out on every call; for one decode
token that is most of the work: on an AVX-512-BF16 CPU a [1, 1024] x [5632, 1024] matmul
over weights that do not fit in the cache reads ~12 GB/s through ``F.linear`` and ~30 GB/s
through oneDNN's ``_linear_pointwise`` on a weight reordered once at load
(``_reorder_linear_weight``). The two give the same bits for decode-sized inputs (both are
oneDNN's bf16 gemm; probed at load and tested), so packing changes speed only; where a
bigger input would come out otherwise (oneDNN on AMX), it multiplies the weight unpacked.

A packed weight is an opaque ``MkldnnCPU`` tensor: it cannot be indexed, moved or saved,
so a span is packed last, on the CPU, after loading and quantizing (`pack_span`); fused
experts ``[E, N, K]`` become one packed tensor per expert (`PackedWeight` indexes them).
Only bf16 on a CPU whose oneDNN takes it (`packing_available`); elsewhere nothing changes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PackedLinear", "PackedTensor", "PackedWeight", "pack_span", "packed_linear", "packing_available"]

NO_PACK_ENV = "MOEMESH_NO_PACK"  # set to 1 to keep plain weights (for comparisons)
PACKED_ROWS = 32  # rows that a packed weight always takes (packing_available checks them)


@functools.cache
def packing_available() -> bool:
    """Whether this torch and CPU run oneDNN's packed bf16 matmul, and it agrees with F.linear
    for decode-sized inputs (up to `PACKED_ROWS` rows)."""
    if os.environ.get(NO_PACK_ENV, "") not in ("", "0"):
        return False
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        return _agrees((1, 3, 17, PACKED_ROWS))
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def _packed_takes_all_rows() -> bool:
    """Whether the packed matmul also gives F.linear's bits for prefill-sized inputs. Not on
    every CPU: with AMX, oneDNN computes more than ~32 rows otherwise on a packed weight than
    on a plain one (704 x 1024 from 34 rows, 5632 x 1024 from 33), so there a bigger input
    multiplies the weight unpacked again (`to_dense`: the same bf16, about 2x the time)."""
    return _agrees((33, 34, 64, 128))


def _agrees(rows: tuple[int, ...]) -> bool:
    g = torch.Generator().manual_seed(0)
    for n, k in ((64, 96), (704, 1024), (256, 48)):
        w = torch.randn(n, k, generator=g).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        for m in rows:
            x = torch.randn(m, k, generator=g).bfloat16()
            if not torch.equal(_mm(x, packed), torch.nn.functional.linear(x, w)):
                return False
    return True


def _mm(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """One packed ``[N, K]`` weight, or a stack of them (fused experts), indexed by expert."""

    packed: tuple[torch.Tensor, ...]  # one opaque MkldnnCPU tensor per expert (one for a projection)
    shape: torch.Size  # the logical [..., N, K]

    def __getitem__(self, expert: int) -> PackedWeight:
        return PackedWeight((self.packed[expert],), self.shape[-2:])

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * 2


def pack(w: torch.Tensor) -> PackedWeight:
    """bf16 ``[N, K]`` or ``[E, N, K]`` on the CPU -> its packed form."""
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.dim() not in (2, 3):
        raise ValueError(f"only 2-d or 3-d bf16 CPU weights are packed, got {w.dtype} {list(w.shape)} on {w.device}")
    mats = [w.detach()] if w.dim() == 2 else list(w.detach().unbind(0))
    return PackedWeight(tuple(torch.ops.mkldnn._reorder_linear_weight(m.contiguous(), 1) for m in mats), w.shape)


def packed_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:  # x [..., K] -> [..., N]
    assert len(w.packed) == 1, "index the expert first"
    if x.dtype != torch.bfloat16:
        raise ValueError(f"a packed weight takes bf16 activations, got {x.dtype}")
    if x.numel() > PACKED_ROWS * x.shape[-1] and not _packed_takes_all_rows():
        return torch.nn.functional.linear(x, w.packed[0].to_dense())
    return _mm(x if x.is_contiguous() else x.contiguous(), w.packed[0])


class PackedTensor(nn.Module):
    """Holds a `PackedWeight` (not as buffers: oneDNN's tensors cannot be moved or saved)."""

    def __init__(self, weight: PackedWeight) -> None:
        super().__init__()
        self.value = weight

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    @property
    def nbytes(self) -> int:
        return self.value.nbytes

    def extra_repr(self) -> str:
        return f"packed bf16, shape={list(self.shape)}"


class PackedLinear(nn.Module):
    """``nn.Linear`` over a packed bf16 weight."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = PackedTensor(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self.dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(x, self.weight.value)
        return y if self.bias is None else y + self.bias


def linears(span: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """Each ``nn.Linear`` (subclasses too) of `span`, with its parent and its name there."""
    for parent in span.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                yield parent, name, child


@torch.no_grad()
def pack_span(span: nn.Module) -> int:
    """Pack a CPU span's bf16 projections and fused experts in place; returns how many weights.

    A no-op where packing is not available, on other dtypes and devices; quantized weights
    stay as they are. Call it last: a packed span cannot be moved to another device.
    """
    if not packing_available():
        return 0
    count = 0
    for parent, name, lin in list(linears(span)):
        if lin.weight.dtype == torch.bfloat16 and lin.weight.device.type == "cpu" and lin.weight.dim() == 2:
            setattr(parent, name, PackedLinear(pack(lin.weight), lin.bias))
            count += 1
    for module in list(span.modules()):
        gate_up, down = getattr(module, "gate_up", None), getattr(module, "down", None)
        if getattr(module, "gate_up_bias", None) is not None:
            continue  # GPT-OSS's experts are applied as x @ W (transposed): kept plain
        if not all(isinstance(t, nn.Parameter) and t.dtype == torch.bfloat16 for t in (gate_up, down)):
            continue
        if gate_up.dim() != 3 or gate_up.device.type != "cpu":  # type: ignore[union-attr]
            continue
        for attr in ("gate_up", "down"):
            packed = pack(getattr(module, attr))
            delattr(module, attr)
            setattr(module, attr, PackedTensor(packed))
            count += 1
    if count:
        span.packed = True  # type: ignore[assignment]
    return count
