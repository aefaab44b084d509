"""A session's KV cache for the layers of one span: preallocated slots, local layer indices."""

from __future__ import annotations

import torch

from kernels.errors import CacheError, CacheFullError

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of one session, ``[L, B, Hkv, max_length, D]`` each.

    Layers are numbered locally (0 = the span's first layer); positions are absolute
    (0 = the first token of the sequence), whatever span holds the cache.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch: int = 1,
    ) -> None:
        if max_length < 1:
            raise CacheError(f"max_length must be positive, got {max_length}")
        shape = (num_layers, batch, num_kv_heads, max_length, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0  # positions 0..length-1 hold valid entries

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def bytes_for(num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * max_length * dtype.itemsize

    def check_step(self, position: int, new_tokens: int) -> None:
        """Raise unless `new_tokens` tokens can be written starting at `position`."""
        if position < 0 or position > self.length:
            raise CacheError(f"position {position} is not in 0..{self.length} (the cache holds {self.length} tokens)")
        if position + new_tokens > self.max_length:
            raise CacheFullError(f"{position} + {new_tokens} tokens exceeds the session's max length {self.max_length}")

    def update(
        self,
        layer: int,
        position: int,
        k: torch.Tensor,  # [B, Hkv, T, D]
        v: torch.Tensor,  # [B, Hkv, T, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [B, Hkv, position + T, D] views
        end = position + k.shape[2]
        self.keys[layer, :, :, position:end] = k
        self.values[layer, :, :, position:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
