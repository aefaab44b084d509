"""Causal self-attention over a session's KV cache.

`attention_sdpa` calls torch's scaled_dot_product_attention exactly as transformers'
sdpa integration does for the same query/key lengths (no mask and ``is_causal`` for a
fresh prefill, no mask for one-token decode, an explicit boolean mask for chunked
prefill), so that a span reproduces transformers' numbers bit for bit.
`attention_reference` is the eager softmax(QK^T)V definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_reference", "attention_sdpa", "causal_mask", "repeat_kv"]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * groups, S, D]."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def causal_mask(q_len: int, past: int, device: torch.device) -> torch.Tensor:
    """Boolean [1, 1, q_len, past + q_len]: query i (absolute past + i) sees keys 0..past + i."""
    q_pos = torch.arange(past, past + q_len, device=device)[:, None]
    k_pos = torch.arange(past + q_len, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


def attention_sdpa(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, past + T, D]
    v: torch.Tensor,  # [B, Hkv, past + T, D]
    scale: float,
) -> torch.Tensor:  # [B, H, T, D]
    groups = q.shape[1] // k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    if q_len == 1 or q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=q_len > 1, enable_gqa=groups > 1)
    mask = causal_mask(q_len, kv_len - q_len, q.device)
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=scale)


def attention_reference(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, past + T, D]
    v: torch.Tensor,  # [B, Hkv, past + T, D]
    scale: float,
) -> torch.Tensor:  # [B, H, T, D]
    groups = q.shape[1] // k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, T, S]
    mask = causal_mask(q_len, kv_len - q_len, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
