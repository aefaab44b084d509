"""Tensor messages: raw bytes + dtype + shape, validated before anyone reads them.

Pure Python (no torch, no numpy): the validation runs on untrusted input before any
framework touches the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protocol.errors import InvalidTensorError
from protocol.shard_pb2 import DType, Tensor

__all__ = ["DTYPE_NAMES", "ITEMSIZE", "TensorMeta", "check_tensor", "make_tensor"]

ITEMSIZE: dict[int, int] = {DType.FLOAT32: 4, DType.BFLOAT16: 2, DType.FLOAT16: 2, DType.INT64: 8}
DTYPE_NAMES: dict[int, str] = {
    DType.FLOAT32: "float32",
    DType.BFLOAT16: "bfloat16",
    DType.FLOAT16: "float16",
    DType.INT64: "int64",
}
_BY_NAME: dict[str, Any] = {name: code for code, name in DTYPE_NAMES.items()}
MAX_DIMS = 4
MAX_DIM_SIZE = 2**31 - 1  # no real tensor is longer on one axis; bounds what a hostile shape can make torch do


@dataclass(frozen=True)
class TensorMeta:
    dtype: str  # one of DTYPE_NAMES' values
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def make_tensor(dtype: str, shape: Sequence[int], data: bytes) -> Tensor:
    """Build a Tensor message; the caller vouches that `data` is `shape` of `dtype`."""
    if dtype not in _BY_NAME:
        raise InvalidTensorError(f"dtype {dtype!r} cannot travel (allowed: {', '.join(_BY_NAME)})")
    return Tensor(dtype=_BY_NAME[dtype], shape=list(shape), data=data)


def check_tensor(tensor: Tensor, *, what: str = "tensor") -> TensorMeta:
    """Validate dtype, rank, each dimension and the byte length; return the decoded metadata."""
    if tensor.dtype not in ITEMSIZE:
        raise InvalidTensorError(f"{what}: dtype {tensor.dtype} is not one of {', '.join(_BY_NAME)}")
    shape = tuple(int(d) for d in tensor.shape)
    if not 1 <= len(shape) <= MAX_DIMS:
        raise InvalidTensorError(f"{what}: rank {len(shape)} is outside 1..{MAX_DIMS}")
    if any(not 0 <= d <= MAX_DIM_SIZE for d in shape):
        raise InvalidTensorError(f"{what}: shape {list(shape)} has a dimension outside 0..{MAX_DIM_SIZE}")
    meta = TensorMeta(DTYPE_NAMES[tensor.dtype], shape)
    expected = meta.numel * ITEMSIZE[tensor.dtype]
    if len(tensor.data) != expected:
        raise InvalidTensorError(
            f"{what}: {len(tensor.data)} bytes do not hold a {meta.dtype} tensor of shape {list(shape)}"
            f" ({expected} bytes)"
        )
    return meta
