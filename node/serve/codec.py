"""torch tensors <-> protocol Tensor messages (validated before torch sees the bytes)."""

from __future__ import annotations

import torch

from protocol import check_tensor, make_tensor
from protocol.shard_pb2 import Tensor

__all__ = ["TORCH_DTYPES", "from_message", "to_message"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def to_message(t: torch.Tensor) -> Tensor:
    name = _NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"{t.dtype} cannot travel on the wire")
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return make_tensor(name, t.shape, data)


def from_message(msg: Tensor, what: str = "input") -> torch.Tensor:
    """Decode `msg` (raises protocol.InvalidTensorError when it is malformed)."""
    meta = check_tensor(msg, what=what)
    dtype = TORCH_DTYPES[meta.dtype]
    if meta.numel == 0:
        return torch.empty(meta.shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(meta.shape)
