"""Decode-sized matmuls on int8 and int4 weights, and RMSNorm in one call, in C (`kernels/qgemv.c`).

For a few rows of activations (decode tokens) torch's packed CPU kernels read their weights
well below what the memory gives: `torch._weight_int8pack_mm` read int8 at ~11 GB/s on this
machine's AMD EPYC, slower per token than the packed bf16 matmul it was meant to beat. The
C kernels stream the codes once, convert them to fp32 in registers and sum in fp32 in one
fixed order per output (see the C file), so a row gets the same bits whatever rows share its
call, and `kernels.quant.linear_reference` (dequantize, then matmul) is their definition to
fp32 rounding, as it is for torch's kernels. Larger calls (prefill) keep torch's kernels.

The library is built on first use with the system C compiler (``cc -O3 -march=native
-fopenmp``) into ``$MOEMESH_CACHE/kernels/`` under a name keyed on the source, the compiler
and the CPU, and then loaded from there. It links the OpenMP runtime torch has already
loaded (the same soname), so its threads are torch's threads, not a second team fighting
them for the cores. Before first use it is checked against the reference on this CPU; where
no compiler is found, the build or the check fails, or ``MOEMESH_NO_NATIVE=1`` is set, torch's
kernels run instead (`available` says which).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kernels.quant import Int4Weight, Int8Weight

__all__ = ["MAX_ROWS", "NO_NATIVE_ENV", "available", "int4_gemv", "int8_gemv", "library_path", "load", "rmsnorm"]

log = logging.getLogger(__name__)

NO_NATIVE_ENV = "MOEMESH_NO_NATIVE"
MAX_ROWS = 8  # calls of up to this many rows take the C kernels; more (prefill) take torch's
SOURCE = Path(__file__).with_name("qgemv.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(cc: str) -> Path:
    """Where the library built by `cc` from this source for this CPU is kept."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join((SOURCE.read_text(), cc, version, " ".join(FLAGS), platform.machine(), _cpu_flags())).encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("MOEMESH_CACHE") or Path.home() / ".cache" / "moemesh")
    return root / "kernels" / f"qgemv-{key}.so"


def _build(cc: str, target: Path, extra: tuple[str, ...] = ()) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        command = [cc, *FLAGS, *extra, "-o", str(out), str(SOURCE)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-400:]}")
        os.replace(out, target)  # atomic: a concurrent build leaves one whole library


def load(path: Path) -> ctypes.CDLL:
    """The library at `path`, its functions typed."""
    lib = ctypes.CDLL(str(path))
    lib.moemesh_int8_gemv.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _PTR, _I64, _PTR, _INT]
    lib.moemesh_int4_gemv.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _INT]
    lib.moemesh_rmsnorm.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _INT, ctypes.c_float, _INT, _PTR]
    lib.moemesh_int8_gemv.restype = lib.moemesh_int4_gemv.restype = lib.moemesh_rmsnorm.restype = _INT
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(NO_NATIVE_ENV, "") not in ("", "0"):
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: int8/int4 decode runs on torch's kernels")
        return None
    try:
        path = library_path(cc)
        if not path.exists():
            _build(cc, path)
        lib = load(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native int8/int4 kernels unavailable (%s): torch's kernels run instead", e)
        return None
    return lib if _agrees(lib) else None


@torch.no_grad()
def _agrees(lib: ctypes.CDLL) -> bool:
    """Whether the built kernels match the reference on this CPU (a miscompile stays unused)."""
    from kernels.quant import linear_reference, quantize_int4, quantize_int8, relative_error
    from kernels.span import RMSNorm

    g = torch.Generator().manual_seed(0)
    for dtype in _DTYPES:
        w = torch.randn(160, 96, generator=g).to(dtype)
        x = torch.randn(3, 96, generator=g).to(dtype)
        for q, run in ((quantize_int8(w), _int8), (quantize_int4(w), _int4)):
            got, want = run(lib, x, q), linear_reference(x, q)  # type: ignore[arg-type]
            if got is None or relative_error(want, got) > (1e-5 if dtype == torch.float32 else 1e-2):
                log.warning("native int8/int4 kernels disagree with the reference here: torch's kernels run instead")
                return False
        norm = RMSNorm(96, 1e-6)  # exact: torch's own ops
        norm.weight.data = torch.randn(96, generator=g).to(dtype)
        y = torch.empty_like(x)
        code = _DTYPES[dtype]
        lib.moemesh_rmsnorm(x.data_ptr(), code, 3, 96, norm.weight.data_ptr(), code, 1e-6, 0, y.data_ptr())
        want = norm(x)
        if relative_error(want, y) > (1e-5 if dtype == torch.float32 else 1e-2):
            log.warning("the native RMSNorm disagrees with torch's here: torch's kernels run instead")
            return False
    return True


@functools.cache
def available() -> bool:
    """Whether the C kernels are built, loaded and checked on this machine."""
    return _library() is not None


def _applies(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """x and the weight on the CPU, x in a dtype the C file takes and in the scales' dtype."""
    return x.is_cpu and scales.is_cpu and x.dtype is scales.dtype and x.dtype in _DTYPES


def _gemv(fn: Any, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *group: int) -> torch.Tensor | None:
    """One kernel call ``fn(x, dtype, M, K, codes, scales[, group], N, y, threads)`` -> y [..., N]."""
    if not (_applies(x, scales) and codes.is_contiguous() and scales.is_contiguous()):
        return None
    x = x.contiguous()
    k, n = x.shape[-1], codes.shape[0]
    y = x.new_empty((*x.shape[:-1], n))
    rc = fn(
        x.data_ptr(), _DTYPES[x.dtype], x.numel() // k, k, codes.data_ptr(), scales.data_ptr(), *group, n,
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return None if rc else y


def _int8(lib: ctypes.CDLL, x: torch.Tensor, w: Int8Weight) -> torch.Tensor | None:
    return _gemv(lib.moemesh_int8_gemv, x, w.codes, w.scales)


def _int4(lib: ctypes.CDLL, x: torch.Tensor, w: Int4Weight) -> torch.Tensor | None:
    return _gemv(lib.moemesh_int4_gemv, x, w.packed, w.scale_zeros, w.group)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, cast_after_weight: bool) -> torch.Tensor | None:
    """`kernels.span.RMSNorm` in one call (to fp32 rounding: the squares are summed in another
    order); None where it does not apply (not the CPU, another dtype, or no library)."""
    lib, code, wcode = _library(), _DTYPES.get(x.dtype), _DTYPES.get(weight.dtype)
    if lib is None or code is None or wcode is None or not (cast_after_weight or wcode == code):
        return None
    if not (x.is_cpu and weight.is_cpu and x.is_contiguous() and weight.is_contiguous()):
        return None
    h = x.shape[-1]
    y = torch.empty_like(x)
    lib.moemesh_rmsnorm(
        x.data_ptr(), code, x.numel() // h, h, weight.data_ptr(), wcode, eps, cast_after_weight, y.data_ptr()
    )
    return y


def int8_gemv(x: torch.Tensor, w: Int8Weight) -> torch.Tensor | None:
    """``x [..., K] @ w.T`` for int8 weights ``[N, K]``; None where the C kernel does not apply
    (no library, not the CPU, x not in the scales' dtype)."""
    lib = _library()
    return None if lib is None else _int8(lib, x, w)


def int4_gemv(x: torch.Tensor, w: Int4Weight) -> torch.Tensor | None:
    """``x [..., K] @ w.T`` for int4 weights ``[N, K]`` in torch's layout; None as for `int8_gemv`."""
    lib = _library()
    return None if lib is None else _int4(lib, x, w)
