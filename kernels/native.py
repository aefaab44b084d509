"""Decode-sized work of quantized spans in C (`kernels/qgemv.c`), each piece one call: int8,
int4 and bf16-weight matmuls, a MoE layer's quantized experts, a decode step's attention, rotary, softmax
routing and RMSNorm.

For a few rows of activations (decode tokens) torch's packed CPU kernels read their weights
well below what the memory gives: `torch._weight_int8pack_mm` read int8 at ~11 GB/s on this
machine's AMD EPYC, slower per token than the packed bf16 matmul it was meant to beat. The
C kernels stream the codes once, convert them to fp32 in registers and sum in fp32 in one
fixed order per output (see the C file), so a row gets the same bits whatever rows share its
call, and `kernels.quant.linear_reference` (dequantize, then matmul) is their definition to
fp32 rounding, as it is for torch's kernels. Larger calls (prefill) keep torch's kernels.
The layer pieces replace a dozen or more dispatcher ops each (the small ops had become half
of a quantized token's time); they compute in fp32 and round once, so they are for spans
that no one's bits bind (`SpanModel.set_exact(False)`: quantized spans).

The library is built on first use with the system C compiler and kept in a cache folder
(`kernels.clib`). It links the OpenMP runtime torch has already loaded (the same soname), so
its threads are torch's threads, not a second team fighting them for the cores. Before first
use it is checked against the reference on this CPU; where no compiler is found, the build or
the check fails, or ``MOEMESH_NO_NATIVE=1`` is set, torch's kernels run instead (`available`
says which).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kernels import clib

if TYPE_CHECKING:
    from kernels.quant import Bf16Weight, Int4Weight, Int8Weight, QuantWeight

__all__ = [
    "DTYPES",
    "MAX_ROWS",
    "NO_NATIVE_ENV",
    "attend",
    "available",
    "bf16_gemv",
    "bf16_matmul_hardware",
    "dequantize",
    "gemv",
    "int4_gemv",
    "int8_gemv",
    "library",
    "moe",
    "rmsnorm",
    "rope",
    "route",
]

log = logging.getLogger(__name__)

NO_NATIVE_ENV = "MOEMESH_NO_NATIVE"
MAX_ROWS = 8  # calls of up to this many rows take the C kernels; more (prefill) take torch's
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C file's dtype codes


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(NO_NATIVE_ENV, "") not in ("", "0"):
        return None
    cc = clib.compiler()
    if cc is None:
        log.info("no C compiler found: int8/int4 decode runs on torch's kernels")
        return None
    try:
        path = clib.library_path(cc)
        if not path.exists():
            clib.build(cc, path)
        lib = clib.load(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native int8/int4 kernels unavailable (%s): torch's kernels run instead", e)
        return None
    return lib if _agrees(lib) else None


@torch.no_grad()
def _agrees(lib: ctypes.CDLL) -> bool:
    """Whether the built kernels match the reference on this CPU (a miscompile stays unused)."""
    from kernels.layers import RMSNorm
    from kernels.measure import relative_error
    from kernels.quant import (
        Bf16Weight,
        dequantize,
        linear_reference,
        quantize_bf16,
        quantize_int4,
        quantize_int8,
    )  # fmt: skip

    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        w = torch.randn(160, 96, generator=g).to(dtype)
        x = torch.randn(3, 96, generator=g).to(dtype)
        for q, run in ((quantize_int8(w), _int8), (quantize_int4(w), _int4), (quantize_bf16(w), _bf16)):
            got, want = run(lib, x, q), linear_reference(x, q)  # type: ignore[arg-type]
            if got is None or relative_error(want, got) > (1e-5 if dtype == torch.float32 else 1e-2):
                log.warning("native matmul kernels disagree with the reference here: torch's kernels run instead")
                return False
            if isinstance(q, Bf16Weight):
                continue
            weight = _dequantize(lib, q)
            if weight is None or not torch.equal(weight, dequantize(q, dtype)):
                log.warning("the native dequantizer disagrees with the reference here: torch's kernels run instead")
                return False
        norm = RMSNorm(96, 1e-6)  # exact: torch's own ops
        norm.weight.data = torch.randn(96, generator=g).to(dtype)
        y, want = _rmsnorm(lib, x, norm.weight.data, 1e-6, False), norm(x)
        if y is None or relative_error(want, y) > (1e-5 if dtype == torch.float32 else 1e-2):
            log.warning("the native RMSNorm disagrees with torch's here: torch's kernels run instead")
            return False
        if not _agrees_layer_ops(lib, dtype, g):
            log.warning("the native MoE, attention, rotary or routing disagrees with torch's here: torch's run instead")
            return False
    return True


def _agrees_layer_ops(lib: ctypes.CDLL, dtype: torch.dtype, g: torch.Generator) -> bool:
    """The one-call MoE, attention, rotary and routing against torch's ops on small inputs."""
    from kernels.attention import attention_reference, attention_sinks
    from kernels.measure import relative_error
    from kernels.moe import experts_reference, route
    from kernels.quant import dequantize, quantize_bf16, quantize_int4, quantize_int8
    from kernels.rope import apply_rotary

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    gate_up, down = torch.randn(4, 128, 64, generator=g).to(dtype), torch.randn(4, 64, 64, generator=g).to(dtype)
    x = torch.randn(3, 64, generator=g).to(dtype)
    ids, weights = torch.tensor([[2, 0], [1, 2], [3, 1]]), torch.softmax(torch.randn(3, 2, generator=g), dim=-1)
    for quantize in (quantize_int8, quantize_int4, quantize_bf16):
        a, b = quantize(gate_up), quantize(down)
        got = _moe(lib, x, ids, weights, a, b)
        want = experts_reference(x.float(), ids, weights, dequantize(a), dequantize(b), F.silu)  # not these kernels
        if got is None or relative_error(want.to(dtype), got) > tolerance:
            return False
    q, k, v = (torch.randn(1, h, s, 64, generator=g).to(dtype) for h, s in ((8, 1), (2, 9), (2, 9)))
    sinks = torch.randn(8, generator=g)
    for want, got in (
        (attention_reference(q.float(), k.float(), v.float(), 0.125), _attend(lib, q, k, v, 0.125, None)),
        (attention_sinks(q.float(), k.float(), v.float(), 0.125, sinks), _attend(lib, q, k, v, 0.125, sinks)),
    ):
        if got is None or relative_error(want.to(dtype), got) > tolerance:
            return False
    angles = torch.rand(1, 2, 32, generator=g) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    q, k = torch.randn(1, 2, 4, 64, generator=g).to(dtype), torch.randn(1, 2, 2, 64, generator=g).to(dtype)
    want_q, want_k = apply_rotary(q.float().transpose(1, 2), k.float().transpose(1, 2), cos.float(), sin.float())
    if not _rope(lib, q, k, cos, sin):
        return False
    if max(relative_error(want_q, q.transpose(1, 2)), relative_error(want_k, k.transpose(1, 2))) > tolerance:
        return False
    router = gate_up[:, 0].contiguous()  # [4, 64]
    routed = _route(lib, x, router, 2, True, False)
    want_weights, want_ids = route(x.float(), router.float(), 2, True, False)
    return routed is not None and torch.equal(routed[1], want_ids) and relative_error(want_weights, routed[0]) < 1e-4


@functools.cache
def available() -> bool:
    """Whether the C kernels are built, loaded and checked on this machine."""
    return _library() is not None


def library() -> ctypes.CDLL | None:
    """The built, loaded and checked library, or None (see `available`)."""
    return _library()


def _applies(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """x and the weight on the CPU, x in a dtype the C file takes and in the scales' dtype."""
    return x.is_cpu and scales.is_cpu and x.dtype is scales.dtype and x.dtype in DTYPES


def _gemv(
    fn: Any, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *group: int, scaled: bool = True
) -> torch.Tensor | None:
    """One kernel call ``fn(x, dtype, M, K, codes[, scales][, group], N, y, threads)`` -> y [..., N].
    `scales` says the compute dtype and device even where the kernel takes none (bf16: `scaled`
    false, an empty tensor)."""
    if not (_applies(x, scales) and codes.is_cpu and codes.is_contiguous() and scales.is_contiguous()):
        return None
    x = x.contiguous()
    k, n = x.shape[-1], codes.shape[0]
    y = x.new_empty((*x.shape[:-1], n))
    rc = fn(
        x.data_ptr(), DTYPES[x.dtype], x.numel() // k, k, codes.data_ptr(), *((scales.data_ptr(),) if scaled else ()),
        *group, n, y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return None if rc else y


def _int8(lib: ctypes.CDLL, x: torch.Tensor, w: Int8Weight) -> torch.Tensor | None:
    return _gemv(lib.moemesh_int8_gemv, x, w.codes, w.scales)


def _int4(lib: ctypes.CDLL, x: torch.Tensor, w: Int4Weight) -> torch.Tensor | None:
    return _gemv(lib.moemesh_int4_gemv, x, w.packed, w.scale_zeros, w.group)


def _bf16(lib: ctypes.CDLL, x: torch.Tensor, w: Bf16Weight) -> torch.Tensor | None:
    return _gemv(lib.moemesh_bf16_gemv, x, w.bits, w.scales, scaled=False)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, cast_after_weight: bool) -> torch.Tensor | None:
    """`kernels.layers.RMSNorm` in one call (to fp32 rounding: the squares are summed in another
    order); None where it does not apply (not the CPU, another dtype, or no library)."""
    lib = _library()
    return None if lib is None else _rmsnorm(lib, x, weight, eps, cast_after_weight)


def _rmsnorm(
    lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float, cast_after_weight: bool
) -> torch.Tensor | None:
    code, wcode = DTYPES.get(x.dtype), DTYPES.get(weight.dtype)
    if code is None or wcode is None or not (cast_after_weight or wcode == code):
        return None
    if not (x.is_cpu and weight.is_cpu and x.is_contiguous() and weight.is_contiguous()):
        return None
    h = x.shape[-1]
    y = torch.empty_like(x)
    rc = lib.moemesh_rmsnorm(
        x.data_ptr(), code, x.numel() // h, h, weight.data_ptr(), wcode, eps, cast_after_weight, y.data_ptr()
    )
    return None if rc else y


def gemv(x: torch.Tensor, kind: str, data: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor | None:
    """`int8_gemv` / `int4_gemv` / `bf16_gemv` on a `kernels.qspan.QuantTensor`'s buffers as they are: a
    projection's decode call without building its weight or the dispatch of `kernels.quant.linear`
    (a `[1, 1024] x [256, 1024]` int4 projection: 14 against 17.5 us, ~5 of them the kernel)."""
    lib = _library()
    if lib is None:
        return None
    if kind == "int8":
        return _gemv(lib.moemesh_int8_gemv, x, data, scales)
    if kind == "bf16":
        return _gemv(lib.moemesh_bf16_gemv, x, data, scales, scaled=False)
    return _gemv(lib.moemesh_int4_gemv, x, data, scales, group)


def int8_gemv(x: torch.Tensor, w: Int8Weight) -> torch.Tensor | None:
    """``x [..., K] @ w.T`` for int8 weights ``[N, K]``; None where the C kernel does not apply
    (no library, not the CPU, x not in the scales' dtype)."""
    lib = _library()
    return None if lib is None else _int8(lib, x, w)


def int4_gemv(x: torch.Tensor, w: Int4Weight) -> torch.Tensor | None:
    """``x [..., K] @ w.T`` for int4 weights ``[N, K]`` in torch's layout; None as for `int8_gemv`."""
    lib = _library()
    return None if lib is None else _int4(lib, x, w)


def bf16_gemv(x: torch.Tensor, w: Bf16Weight) -> torch.Tensor | None:
    """``x [..., K] @ w.T`` for bf16 weights ``[N, K]``, x in any dtype the C file takes (the
    weight's compute dtype); None as for `int8_gemv`."""
    lib = _library()
    return None if lib is None else _bf16(lib, x, w)


@functools.cache
def bf16_matmul_hardware() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX-512 BF16), where oneDNN's bf16
    matmul is the fast one for prefill-sized calls."""
    flags = clib.cpu_flags().split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def dequantize(w: Int8Weight | Int4Weight) -> torch.Tensor | None:
    """`kernels.quant.dequantize(w, dtype)` in one call, in the scales' dtype, ``[N, K]`` (an int4
    weight comes as the transposed view of a contiguous ``[K, N]``); None where it does not apply."""
    lib = _library()
    return None if lib is None else _dequantize(lib, w)


def _dequantize(lib: ctypes.CDLL, w: Int8Weight | Int4Weight) -> torch.Tensor | None:
    from kernels.quant import Int8Weight

    kind, data = (8, w.codes) if isinstance(w, Int8Weight) else (4, w.packed)
    scales = w.scales if isinstance(w, Int8Weight) else w.scale_zeros
    if data.dim() != 2 or scales.dtype not in DTYPES or not (data.is_cpu and scales.is_cpu):
        return None
    if not (data.is_contiguous() and scales.is_contiguous()):
        return None
    n, k = w.shape
    out = scales.new_empty((n, k) if kind == 8 else (k, n))
    group = 0 if isinstance(w, Int8Weight) else w.group
    rc = lib.moemesh_dequantize(
        kind, data.data_ptr(), scales.data_ptr(), DTYPES[scales.dtype], n, k, group, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return None if rc else (out if kind == 8 else out.t())


def _experts(w: QuantWeight) -> tuple[int, torch.Tensor, torch.Tensor, int] | None:
    """(kind, codes, scales, group) of a stack of quantized experts, None unless contiguous."""
    from kernels.quant import Bf16Weight, Int8Weight

    if isinstance(w, Bf16Weight):
        kind, codes, scales, group = 16, w.bits, w.scales, 0
    elif isinstance(w, Int8Weight):
        kind, codes, scales, group = 8, w.codes, w.scales, 0
    else:
        kind, codes, scales, group = 4, w.packed, w.scale_zeros, w.group
    if not (codes.is_cpu and codes.is_contiguous() and scales.is_contiguous()):
        return None
    return kind, codes, scales, group


def moe(
    x: torch.Tensor,  # [M, H]
    ids: torch.Tensor,  # [M, k] int64
    weights: torch.Tensor,  # [M, k]
    gate_up: QuantWeight,  # [E, 2I, H]
    down: QuantWeight,  # [E, H, I]
) -> torch.Tensor | None:  # [M, H]
    """A MoE layer's experts for up to `MAX_ROWS` tokens in one call (`kernels.moe`'s dispatch and
    sums; see the C file); None where it does not apply (no library, more rows, not the CPU,
    another dtype, unlike or non-contiguous stacks)."""
    lib = _library()
    return None if lib is None else _moe(lib, x, ids, weights, gate_up, down)


def _moe(
    lib: ctypes.CDLL, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: QuantWeight, down: QuantWeight
) -> torch.Tensor | None:
    a, b = _experts(gate_up), _experts(down)
    if a is None or b is None or a[0] != b[0] or a[3] != b[3] or x.dim() != 2:
        return None
    kind, gu_codes, gu_scales, group = a
    _, dn_codes, dn_scales, _ = b
    m, h = x.shape
    e, i = gate_up.shape[0], down.shape[-1]
    if m > MAX_ROWS or not _applies(x, gu_scales) or dn_scales.dtype is not x.dtype:
        return None
    if (
        tuple(gate_up.shape) != (e, 2 * i, h)
        or tuple(down.shape) != (e, h, i)
        or ids.shape[0] != m
        or weights.shape != ids.shape
    ):
        return None
    x, ids = x.contiguous(), ids.to(torch.int64).contiguous()
    rw = weights.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    rc = lib.moemesh_moe(
        kind, x.data_ptr(), DTYPES[x.dtype], m, h, ids.shape[1], ids.data_ptr(), rw.data_ptr(), e, i, group,
        gu_codes.data_ptr(), gu_scales.data_ptr(), dn_codes.data_ptr(), dn_scales.data_ptr(), y.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return None if rc else y


def attend(
    q: torch.Tensor,  # [1, Hq, 1, D]
    k: torch.Tensor,  # [1, Hkv, S, D]
    v: torch.Tensor,  # [1, Hkv, S, Dv]
    scale: float,
    sinks: torch.Tensor | None = None,  # [Hq] GPT-OSS's sink logits
) -> torch.Tensor | None:  # [1, Hq, 1, Dv]
    """One query token's attention over all S keys of one session in one call, in fp32 (see the
    C file); None where it does not apply (no library, not the CPU, another dtype, more rows
    or tokens, positions not contiguous). Takes the tensors as attention has them: indexing
    them down to 2-D would cost more than the call."""
    lib = _library()
    return None if lib is None else _attend(lib, q, k, v, scale, sinks)


def _attend(
    lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sinks: torch.Tensor | None
) -> torch.Tensor | None:
    code = DTYPES.get(q.dtype)
    if code is None or not (q.is_cpu and k.is_cpu and v.is_cpu) or not (q.dtype is k.dtype is v.dtype):
        return None
    (b, hq, t, d), (_, hkv, s, _), dv = q.shape, k.shape, v.shape[-1]
    if b != 1 or t != 1 or q.stride(-1) != 1 or k.stride()[2:] != (d, 1) or v.stride()[2:] != (dv, 1):
        return None
    if hq % hkv or not s or k.shape[0] != 1 or v.shape[0] != 1:
        return None
    sink = None if sinks is None else sinks.to(torch.float32).contiguous()
    y = q.new_empty((1, hq, 1, dv))
    rc = lib.moemesh_attend(
        q.data_ptr(), code, hq, d, q.stride(1), k.data_ptr(), k.stride(1), v.data_ptr(), v.stride(1), hkv, s, dv,
        scale, None if sink is None else sink.data_ptr(), y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return None if rc else y


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """`kernels.rope.apply_rotary` ("half" style) on q [B, T, Hq, D] and k [B, T, Hk, D] in
    place, in one call, in fp32 rounded once; False (nothing done) where it does not apply
    (no library, not the CPU, other dtypes, cos/sin [B, T, D] not one per row, not contiguous)."""
    lib = _library()
    return lib is not None and _rope(lib, q, k, cos, sin)


def _rope(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    code = DTYPES.get(q.dtype)
    if code is None or not (q.dtype is k.dtype is cos.dtype is sin.dtype):
        return False
    b, t, hq, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or cos.shape != (b, t, d) or sin.shape != (b, t, d):
        return False
    tensors = (q, k, cos, sin)
    if not all(x.is_cpu and x.is_contiguous() for x in tensors):
        return False
    rc = lib.moemesh_rope(
        q.data_ptr(), hq, k.data_ptr(), k.shape[2], code, b * t, d, cos.data_ptr(), sin.data_ptr()
    )  # fmt: skip
    return rc == 0


def route(
    x: torch.Tensor,  # [M, H]
    router: torch.Tensor,  # [E, H]
    top_k: int,
    normalize: bool,
    weights_in_model_dtype: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:  # weights [M, k] (fp32, or x's dtype), ids [M, k]
    """`kernels.moe.route` (softmax over all experts, then top-k) for up to `MAX_ROWS` tokens
    in one call, logits in fp32; None where it does not apply."""
    lib = _library()
    return None if lib is None else _route(lib, x, router, top_k, normalize, weights_in_model_dtype)


def _route(
    lib: ctypes.CDLL, x: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool, weights_in_model_dtype: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    code, wcode = DTYPES.get(x.dtype), DTYPES.get(router.dtype)
    if code is None or wcode is None or x.dim() != 2 or x.shape[0] > MAX_ROWS:
        return None
    if not (x.is_cpu and router.is_cpu and x.is_contiguous() and router.is_contiguous()):
        return None
    m, h = x.shape
    ids = torch.empty((m, top_k), dtype=torch.int64)
    weights = torch.empty((m, top_k), dtype=torch.float32)
    rc = lib.moemesh_route(
        x.data_ptr(), code, m, h, router.data_ptr(), wcode, router.shape[0], top_k, normalize,
        weights_in_model_dtype, ids.data_ptr(), weights.data_ptr(),
    )  # fmt: skip
    if rc:
        return None
    return (weights.to(x.dtype) if weights_in_model_dtype else weights), ids
