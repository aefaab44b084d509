"""Weight-only quantization: int8 per output channel, int4 in groups of 32 along the input,
and bf16 weights on moemesh's own kernels.

A weight ``[..., N, K]`` (a projection ``[N, K]``, or fused experts ``[E, N, K]``) becomes

- `Int8Weight`: symmetric codes ``int8 [..., N, K]`` and one scale per output channel
  ``[..., N]``: ``w = codes * scale``;
- `Int4Weight`: asymmetric 4-bit codes in groups of `INT4_GROUP` along K, two per byte
  ``uint8 [..., N, K/2]`` in the layout torch's CPU kernel reads, and per group a scale and
  a zero ``[..., K/G, N, 2]``: ``w = (q - 8) * scale + zero``;
- `Bf16Weight`: the weight rounded to bf16 (exact for a bf16 checkpoint), held as its int16
  bit patterns. What it changes against "none" is whose kernels multiply: moemesh's decode
  kernels (fp32 sums in their own fixed order, at the memory's speed) instead of transformers'
  oneDNN matmuls, whose bits bind an unquantized span.

Scales are held in the model's dtype (the kernels take them in the activations' dtype).
`linear_reference` is the definition: dequantize to fp32, multiply in fp32, round once to
the activations' dtype. `linear_fast` calls torch's packed CPU kernels
(``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``), which dequantize in
fp32 inside the matmul; the two agree to fp32 rounding (not bit for bit: the kernels sum in
another order). `linear` is the dispatcher, and it takes plain tensors too (``F.linear``).

`kernels.qspan` puts these weights into a span (`quantize_span`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels import clib, native
from kernels.gemv import applies as gemv_applies
from kernels.gemv import gemv_split, split_available
from kernels.packed import PackedWeight, packed_linear

if TYPE_CHECKING:
    pass

__all__ = [
    "AnyWeight",
    "Bf16Weight",
    "INT4_GROUP",
    "KIND_OF",
    "QUANT_MODES",
    "Int4Weight",
    "Int8Weight",
    "QuantWeight",
    "Weight",
    "dequantize",
    "linear",
    "linear_fast",
    "linear_reference",
    "pack_int4",
    "quantize",
    "quantize_int4",
    "quantize_int8",
    "scales_of",
    "unpack_int4",
]

QUANT_MODES = ("none", "bf16", "int8", "int4")
INT4_N_BLOCK = 32  # output rows per block of torch's int4 CPU kernel
INT4_GROUP = 32  # torch's CPU kernel takes 32, 64, 128 or 256; 32 is llama.cpp Q4_0's block
DEQUANTIZED_ROWS = 24  # fewer rows never write the weight out: its cost is the same for any rows (AMX Xeon:
# [M, 1024] x [2816, 1024] int8 at 16 rows 0.60 ms on torch's kernel, 0.59 dequantized; int4 at 24: 0.80, 0.78)
# how much faster the dequantized prefill must time than the next best to be taken: every process of
# a machine must choose alike (the choice sets the bits), and on an AMX Xeon it was 4-5x
DEQUANTIZED_MARGIN = 1.5


@dataclass(frozen=True, eq=False)
class Int8Weight:
    """``w [..., N, K] = codes * scales[..., None]``; indexing picks one expert of a stack."""

    codes: torch.Tensor  # [..., N, K] int8
    scales: torch.Tensor  # [..., N] model dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def __getitem__(self, expert: int) -> Int8Weight:
        return Int8Weight(self.codes[expert], self.scales[expert])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scales


@dataclass(frozen=True, eq=False)
class Int4Weight:
    """``w[n, k] = (q[n, k] - 8) * scale[k // G, n] + zero[k // G, n]``, q packed two per byte."""

    packed: torch.Tensor  # [..., N, K/2] uint8, the CPU kernel's layout (see pack_int4)
    scale_zeros: torch.Tensor  # [..., K/G, N, 2] model dtype: (scale, zero) per group
    group: int = INT4_GROUP

    @property
    def shape(self) -> torch.Size:
        *lead, n, half = self.packed.shape
        return torch.Size((*lead, n, 2 * half))

    def __getitem__(self, expert: int) -> Int4Weight:
        return Int4Weight(self.packed[expert], self.scale_zeros[expert], self.group)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.scale_zeros


@dataclass(frozen=True, eq=False)
class Bf16Weight:
    """``w [..., N, K]`` in bf16, as int16 bits: a span's dtype casts (``.half()``) leave them."""

    bits: torch.Tensor  # [..., N, K] int16, the bf16 bit patterns
    scales: torch.Tensor  # [0] in the compute dtype: no scales, but it says the dtype and device as theirs do

    @property
    def shape(self) -> torch.Size:
        return self.bits.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.bits.view(torch.bfloat16)

    def __getitem__(self, expert: int) -> Bf16Weight:
        return Bf16Weight(self.bits[expert], self.scales)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.bits, self.scales


QuantWeight = Int8Weight | Int4Weight | Bf16Weight
KIND_OF: dict[type, str] = {Int8Weight: "int8", Int4Weight: "int4", Bf16Weight: "bf16"}  # QuantTensor.kind
Weight = torch.Tensor | QuantWeight  # a weight as quantized
AnyWeight = Weight | PackedWeight  # what the matmuls of the span and the experts take


# ---- int4 packing: the byte layout of torch._convert_weight_to_int4pack_for_cpu --------------
# Output channels go in blocks of B (`clib.int4_block`: 64 where torch runs AVX-512 kernels,
# 32 on AVX2): block b is bytes [K, B/2] whose low nibble is channel Bb + j and high nibble
# channel Bb + B/2 + j. The N % B channels left are bytes [K, r/2], low nibble channel 2j, high
# nibble 2j + 1. Our C kernels are built for the same B; a test checks the layout against torch's
# own packer, and torch's prefill kernel runs only where the two agree (`_int4_layout_ok`).


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., N, K]`` in 0..15 (N even) -> ``uint8 [..., N, K/2]`` in the CPU kernel's layout."""
    *lead, n, k = q.shape
    q, b = q.to(torch.uint8), clib.int4_block()
    full = n - n % b
    block = q[..., :full, :].reshape(*lead, full // b, 2, b // 2, k)  # [.., b, half, j, K]
    head = (block[..., 0, :, :] | block[..., 1, :, :] << 4).transpose(-1, -2)  # [.., b, K, B/2]
    pairs = q[..., full:, :].reshape(*lead, (n - full) // 2, 2, k)  # [.., r/2, 2, K]
    tail = (pairs[..., 0, :] | pairs[..., 1, :] << 4).transpose(-1, -2)  # [.., K, r/2]
    flat = torch.cat((head.reshape(*lead, -1), tail.reshape(*lead, -1)), dim=-1)
    return flat.reshape(*lead, n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: ``uint8 [..., N, K/2]`` -> codes ``uint8 [..., N, K]``."""
    *lead, n, half = packed.shape
    k, b = 2 * half, clib.int4_block()
    full = n - n % b
    flat = packed.reshape(*lead, n * half)
    head = flat[..., : full * half].reshape(*lead, full // b, k, b // 2)  # [.., b, K, B/2]
    head = torch.stack((head & 0xF, head >> 4), dim=-3)  # [.., b, half, K, B/2]
    head = head.transpose(-1, -2).reshape(*lead, full, k)  # [.., full, K]
    tail = flat[..., full * half :].reshape(*lead, k, (n - full) // 2)  # [.., K, r/2]
    tail = torch.stack((tail & 0xF, tail >> 4), dim=-1)  # [.., K, r/2, 2]
    tail = tail.reshape(*lead, k, n - full).transpose(-1, -2)  # [.., r, K]
    return torch.cat((head, tail), dim=-2)


@functools.cache
def _int4_layout_ok() -> bool:
    """Whether this build's int4 CPU packer writes the layout of `pack_int4` (probed once)."""
    q = torch.randint(0, 16, (96, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        theirs = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    except (RuntimeError, AttributeError):
        return False
    return theirs.shape == (96, 32) and torch.equal(theirs, pack_int4(q))


# ---- quantize / dequantize --------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric int8 per output channel: scale = max |w| / 127 over each row of K."""
    w32 = w.detach().float()
    scales = (w32.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(w.dtype)  # [..., N]
    codes = torch.round(w32 / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)  # [..., N, K]
    return Int8Weight(codes.contiguous(), scales.contiguous())


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> Int4Weight:
    """Asymmetric int4 in groups of `group` along K: [min, max] of each group onto 0..15."""
    *lead, n, k = w.shape
    if k % group or n % 2:
        raise ValueError(f"int4 needs K a multiple of {group} and N even, got [N, K] = [{n}, {k}]")
    wg = w.detach().float().reshape(*lead, n, k // group, group)  # [..., N, K/G, G]
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # [..., N, K/G]
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(w.dtype)
    zero = (lo + 8 * scale.float()).to(w.dtype)  # the value of code 8
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)  # [..., N, K/G, G]
    scale_zeros = torch.stack((scale, zero), dim=-1).transpose(-2, -3)  # [..., K/G, N, 2]
    return Int4Weight(pack_int4(q.reshape(*lead, n, k)), scale_zeros.contiguous(), group)


def quantize_bf16(w: torch.Tensor) -> Bf16Weight:
    """`w` rounded to bf16 (to nearest even, as ``.to()``), for the native kernels."""
    bits = w.detach().to(torch.bfloat16).contiguous().view(torch.int16)
    return Bf16Weight(bits, torch.empty(0, dtype=w.dtype, device=w.device))


def quantize(w: torch.Tensor, mode: str) -> Weight:
    """`w` [..., N, K] in `mode` ("none" returns it); int4 falls back to int8 where the packed
    kernel does not take the shape (K a multiple of the group, N a multiple of its 32-row blocks:
    MLA's small latent projections are not)."""
    if mode == "none":
        return w
    if mode == "bf16":
        return quantize_bf16(w)
    if mode == "int4" and w.shape[-1] % INT4_GROUP == 0 and w.shape[-2] % INT4_N_BLOCK == 0:
        return quantize_int4(w)
    if mode in ("int8", "int4"):
        return quantize_int8(w)
    raise ValueError(f"unknown quantization {mode!r} (known: {', '.join(QUANT_MODES)})")


def scales_of(w: QuantWeight) -> torch.Tensor:
    """The weight's scales: they carry the compute dtype and the device of the weight."""
    return w.scale_zeros if isinstance(w, Int4Weight) else w.scales


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``[..., N, K]`` the codes stand for, computed in fp32."""
    if isinstance(w, Bf16Weight):
        return w.weight.to(dtype)
    if isinstance(w, Int8Weight):
        return (w.codes.float() * w.scales.float()[..., None]).to(dtype)
    q = unpack_int4(w.packed).float()  # [..., N, K]
    *lead, n, k = q.shape
    sz = w.scale_zeros.float().transpose(-2, -3)  # [..., N, K/G, 2]
    qg = q.reshape(*lead, n, k // w.group, w.group)
    return ((qg - 8) * sz[..., 0:1] + sz[..., 1:2]).reshape(*lead, n, k).to(dtype)


# ---- the matmul: reference, fast path, dispatcher --------------------------------------------


def linear_reference(x: torch.Tensor, w: Weight) -> torch.Tensor:  # x [..., K], w [N, K] -> [..., N]
    """Dequantize-then-matmul in fp32, rounded once to x's dtype: the definition."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return F.linear(x.float(), dequantize(w)).to(x.dtype)


def linear_fast(x: torch.Tensor, w: Weight) -> torch.Tensor:  # x [..., K], w [N, K] -> [..., N]
    """Decode-sized calls on the C kernels (`kernels.native`) where they are built; more rows
    (prefill) on whichever of torch's packed kernel for the kind, the reference, or the weight
    dequantized in C and multiplied on torch's matmul for x's dtype was timed fastest here
    (`_prefill_path`). x on the CPU, in the scales' dtype."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    rows = x.numel() // x.shape[-1]
    if rows <= native.MAX_ROWS:
        if isinstance(w, Bf16Weight):
            y = native.bf16_gemv(x, w)
        else:
            y = native.int8_gemv(x, w) if isinstance(w, Int8Weight) else native.int4_gemv(x, w)
        if y is not None:
            return y
    if rows >= DEQUANTIZED_ROWS and not isinstance(w, Bf16Weight) and _dequantized_prefill(KIND_OF[type(w)], x.dtype):
        weight = native.dequantize(w)
        if weight is not None:
            return F.linear(x, weight)
    if _prefill_path(KIND_OF[type(w)], x.dtype) == "reference":
        return linear_reference(x, w)
    return _torch_prefill(x, w)


def _torch_prefill(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """torch's kernel for `w`'s kind: oneDNN's bf16 matmul (x in bf16), its packed int8 and int4 ones."""
    if isinstance(w, Bf16Weight):
        return F.linear(x, w.weight if x.dtype is torch.bfloat16 else w.weight.to(x.dtype))
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    if isinstance(w, Int8Weight):
        y = torch._weight_int8pack_mm(x2, w.codes, w.scales)  # [M, N]
    else:
        y = torch._weight_int4pack_mm_for_cpu(x2, w.packed, w.group, w.scale_zeros)  # [M, N]
    return y.reshape(*x.shape[:-1], y.shape[-1])


@functools.cache
def _prefill_path(kind: str, dtype: torch.dtype) -> str:
    """How prefill-sized matmuls of `kind` run fastest here of "torch" (its packed kernel for the
    kind) and "reference" (dequantize, then MKL's fp32 matmul): on a CPU without bf16 hardware
    (an AVX2 EPYC) oneDNN's bf16 matmul took 134 ms for [128, 1024] x [5632, 1024] against 33 in
    fp32 on the widened weights, and the int8 kernel 48 against 36. Timed once per process
    (`_probe_times`); int4 where torch's packer writes another layout than ours
    (`_int4_layout_ok`) never takes torch's kernel."""
    times = _probe_times(kind, dtype)
    return min(("torch", "reference"), key=lambda path: times.get(path, float("inf")))


@functools.cache
def _dequantized_prefill(kind: str, dtype: torch.dtype) -> bool:
    """Whether prefill-sized int8/int4 matmuls run on the weight written out in x's dtype by
    `kernels.native.dequantize`, then torch's matmul in that dtype: only for bf16 on a CPU with
    bf16 matmul hardware, and only where it timed `DEQUANTIZED_MARGIN` faster than `_prefill_path`
    (it rounds the weight to bf16). On a Xeon with AMX, for [128, 1024] x [2816, 1024]: torch's
    int8 and int4 kernels 6.0 ms, the weight dequantized to bf16 and multiplied 1.1-1.3 ms."""
    times = _probe_times(kind, dtype)
    return "dequantized" in times and times["dequantized"] * DEQUANTIZED_MARGIN < times[_prefill_path(kind, dtype)]


@functools.cache
def _probe_times(kind: str, dtype: torch.dtype) -> dict[str, float]:
    """Seconds of each prefill path that applies here, on one [64, 1024] x [1024, 1024] matmul
    of `kind`, best of three each (once per process)."""
    g = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(1024, 1024, generator=g).to(dtype), kind)
    x = torch.randn(64, 1024, generator=g).to(dtype)
    assert not isinstance(w, torch.Tensor)

    def best(fn: Callable[[], torch.Tensor]) -> float:
        fn()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    times = {"reference": best(lambda: linear_reference(x, w))}
    if kind != "int4" or _int4_layout_ok():
        times["torch"] = best(lambda: _torch_prefill(x, w))
    hardware = dtype is torch.bfloat16 and native.bf16_matmul_hardware()
    if hardware and not isinstance(w, Bf16Weight) and native.dequantize(w) is not None:
        times["dequantized"] = best(lambda: F.linear(x, native.dequantize(w)))  # type: ignore[arg-type]
    return times


def _fast_applies(x: torch.Tensor, w: QuantWeight) -> bool:
    scales = scales_of(w)
    return x.device.type == "cpu" and scales.device.type == "cpu" and x.dtype == scales.dtype


def linear(x: torch.Tensor, w: AnyWeight) -> torch.Tensor:
    """Dispatcher: ``F.linear`` for plain weights, oneDNN for packed bf16 ones (`kernels.packed`),
    the packed quantized kernel where it applies, else the reference."""
    if isinstance(w, torch.Tensor):
        return gemv_split(x, w) if gemv_applies(x, w) and split_available() else F.linear(x, w)
    if isinstance(w, PackedWeight):
        return packed_linear(x, w)
    return linear_fast(x, w) if _fast_applies(x, w) else linear_reference(x, w)
