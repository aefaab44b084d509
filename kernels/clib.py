"""Building and loading the C library of `kernels.native` (`kernels/qgemv.c`).

The library is built on first use with the system C compiler (``cc -O3 -march=native
-fopenmp``) into ``$MOEMESH_CACHE/kernels/`` under a name keyed on the source, the compiler,
its flags and the CPU, and then loaded from there; a build is written beside its target and
renamed into place, so processes building at once leave one whole library. Whether the
library is then used is `kernels.native`'s decision (its check against the reference).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["FLAGS", "SOURCE", "build", "compiler", "cpu_flags", "int4_block", "library_path", "load"]

SOURCE = Path(__file__).with_name("qgemv.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
INT4_BLOCKS = (64, 32)  # torch's int4 CPU layouts: output channels per block (AVX-512 builds, AVX2 ones)
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_flags() -> str:
    """This CPU's feature flags as /proc/cpuinfo lists them (part of the library's key)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def int4_block() -> int:
    """Output channels per block of the int4 byte layout (`kernels.quant.pack_int4`): the one
    torch's CPU packer writes here (64 where torch runs its AVX-512 kernels, 32 on AVX2), so that
    one packing serves its prefill kernel and our decode kernels; 64 where torch's is neither.
    The probe puts one code at channel block / 2: the high nibble of the first byte in that layout."""
    for block in INT4_BLOCKS:
        q = torch.zeros(2 * max(INT4_BLOCKS), 32, dtype=torch.int32)
        q[block // 2, 0] = 1
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        except (RuntimeError, AttributeError):
            break
        if int(packed.flatten()[0]) == 16:
            return block
    return INT4_BLOCKS[0]


def _flags() -> tuple[str, ...]:
    return (*FLAGS, f"-DBLOCK={int4_block()}")


def library_path(cc: str) -> Path:
    """Where the library built by `cc` from this source for this CPU is kept."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join((SOURCE.read_text(), cc, version, " ".join(_flags()), platform.machine(), cpu_flags())).encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("MOEMESH_CACHE") or Path.home() / ".cache" / "moemesh")
    return root / "kernels" / f"qgemv-{key}.so"


def build(cc: str, target: Path, extra: tuple[str, ...] = ()) -> None:
    """Compile the source into `target` (`extra`: more compiler flags); RuntimeError if it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        command = [cc, *_flags(), *extra, "-o", str(out), str(SOURCE), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-400:]}")
        os.replace(out, target)  # atomic: a concurrent build leaves one whole library


def load(path: Path) -> ctypes.CDLL:
    """The library at `path`, its functions typed."""
    lib = ctypes.CDLL(str(path))
    lib.moemesh_int8_gemv.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _PTR, _I64, _PTR, _INT]
    lib.moemesh_int4_gemv.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _INT]
    lib.moemesh_bf16_gemv.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _I64, _PTR, _INT]
    lib.moemesh_rmsnorm.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _INT, ctypes.c_float, _INT, _PTR]
    lib.moemesh_moe.argtypes = [_INT, _PTR, _INT, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, *[_PTR] * 5, _INT]
    lib.moemesh_attend.argtypes = [_PTR, _INT, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64]
    lib.moemesh_attend.argtypes += [ctypes.c_float, _PTR, _PTR, _INT]
    lib.moemesh_rope.argtypes = [_PTR, _I64, _PTR, _I64, _INT, _I64, _I64, _PTR, _PTR]
    lib.moemesh_route.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _INT, _I64, _I64, _INT, _INT, _PTR, _PTR]
    lib.moemesh_layers.argtypes = [_PTR, _I64, _INT, _I64, _I64, *[_PTR] * 7, _INT]
    lib.moemesh_dequantize.argtypes = [_INT, _PTR, _PTR, _INT, _I64, _I64, _I64, _PTR, _INT]
    for fn in (
        lib.moemesh_int8_gemv, lib.moemesh_int4_gemv, lib.moemesh_bf16_gemv, lib.moemesh_rmsnorm, lib.moemesh_moe,
        lib.moemesh_attend, lib.moemesh_rope, lib.moemesh_route, lib.moemesh_layers, lib.moemesh_dequantize,
    ):  # fmt: skip
        fn.restype = _INT
    return lib
