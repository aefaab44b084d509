"""A session's KV cache for the layers of one span: preallocated slots, local layer indices."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.errors import CacheError, CacheFullError

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of one session, one ``[B, Hkv, slots, D]`` pair of tensors per layer.

    Layers are numbered locally (0 = the span's first layer); positions are absolute
    (0 = the first token of the sequence), whatever span holds the cache. A layer with a
    sliding window W keeps only the last W - 1 positions (a ring of slots), as transformers'
    sliding cache layer does: a step attends to those plus its own tokens. Keys and values
    may differ in width (`value_dim`): DeepSeek's latent attention caches the normalised kv
    latent as "keys" and the shared rotary key as "values", one head each.
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
        *,
        value_dim: int | None = None,
        windows: Sequence[int | None] | None = None,
    ) -> None:
        if max_length < 1:
            raise CacheError(f"max_length must be positive, got {max_length}")
        self.windows = tuple(windows) if windows is not None else (None,) * num_layers
        if len(self.windows) != num_layers:
            raise CacheError(f"{len(self.windows)} windows for {num_layers} layers")
        self.slots = tuple(self.slots_for(max_length, w) for w in self.windows)
        value_dim = head_dim if value_dim is None else value_dim
        self.keys = [torch.empty(batch, num_kv_heads, s, head_dim, dtype=dtype, device=device) for s in self.slots]
        self.values = [torch.empty(batch, num_kv_heads, s, value_dim, dtype=dtype, device=device) for s in self.slots]
        self.num_layers, self.batch = num_layers, batch
        self.max_length = max_length
        self.length = 0  # positions 0..length-1 have been written

    @staticmethod
    def slots_for(max_length: int, window: int | None) -> int:
        """How many positions a layer keeps: all of them, or the last window - 1."""
        return max_length if window is None else min(max_length, window - 1)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    @staticmethod
    def bytes_for(num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, dtype: torch.dtype) -> int:
        """Full-attention layers only; `SpanModel.cache_bytes` is right for every family."""
        return 2 * num_layers * num_kv_heads * head_dim * max_length * dtype.itemsize

    def check_step(self, position: int, new_tokens: int) -> None:
        """Raise unless `new_tokens` tokens can be written starting at `position`."""
        if position < 0 or position > self.length:
            raise CacheError(f"position {position} is not in 0..{self.length} (the cache holds {self.length} tokens)")
        if position + new_tokens > self.max_length:
            raise CacheFullError(f"{position} + {new_tokens} tokens exceeds the session's max length {self.max_length}")
        if position < self.length and any(self.length > s for s, w in zip(self.slots, self.windows, strict=True) if w):
            raise CacheError(f"cannot rewind to {position}: a sliding-window layer no longer holds those positions")

    def update(
        self,
        layer: int,
        position: int,
        k: torch.Tensor,  # [B, Hkv, T, D]
        v: torch.Tensor,  # [B, Hkv, T, Dv]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:  # keys, values [B, Hkv, S, D|Dv]; absolute position of key 0
        end = position + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        if self.windows[layer] is None:
            keys[:, :, position:end] = k
            values[:, :, position:end] = v
            return keys[:, :, :end], values[:, :, :end], 0
        slots = self.slots[layer]
        kept = min(position, slots)
        # the ring slots of the kept positions, in order
        past = torch.arange(position - kept, position, device=keys.device) % max(slots, 1)
        k_all = torch.cat([keys[:, :, past], k], dim=2)  # [B, Hkv, kept + T, D]
        v_all = torch.cat([values[:, :, past], v], dim=2)
        n = min(k.shape[2], slots)
        if n:
            ring = torch.arange(end - n, end, device=keys.device) % slots
            keys[:, :, ring] = k[:, :, k.shape[2] - n :]
            values[:, :, ring] = v[:, :, k.shape[2] - n :]
        return k_all, v_all, position - kept
