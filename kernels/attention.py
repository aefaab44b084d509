"""Causal self-attention over a session's KV cache.

`attention_sdpa` calls torch's scaled_dot_product_attention exactly as transformers'
sdpa integration does for the same query/key lengths (no mask and ``is_causal`` for a
fresh prefill, no mask for one-token decode, an explicit boolean mask for chunked
prefill), so that a span reproduces transformers' numbers bit for bit.
`attention_reference` is the eager softmax(QK^T)V definition. `attention_sinks` is GPT-OSS's
eager attention, whose softmax also covers a learned per-head sink logit.

Keys may start after position 0 (`kv_offset`): a sliding-window layer keeps only its window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import native

__all__ = [
    "attention_decode_fp32",
    "attention_mask",
    "attention_reference",
    "attention_sdpa",
    "attention_sinks",
    "causal_mask",
    "repeat_kv",
]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * groups, S, D]."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def causal_mask(q_len: int, past: int, device: torch.device) -> torch.Tensor:
    """Boolean [1, 1, q_len, past + q_len]: query i (absolute past + i) sees keys 0..past + i."""
    return attention_mask(q_len, past + q_len, past, 0, None, device)


def attention_mask(
    q_len: int, kv_len: int, q_offset: int, kv_offset: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean [1, 1, q_len, kv_len]: may query q_offset + i see key kv_offset + j (causal, within `window`)."""
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    k_pos = torch.arange(kv_offset, kv_offset + kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask[None, None]


def _needs_mask(q_len: int, kv_len: int, q_offset: int, window: int | None) -> bool:
    """transformers' rule for handing sdpa an explicit mask (`_ignore_causal_mask_sdpa`), without padding."""
    if window is not None and kv_len >= window:
        return True
    return not (q_len == 1 or kv_len == q_len or q_offset == 0)


def attention_sdpa(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]: keys of positions kv_offset..kv_offset + S - 1
    v: torch.Tensor,  # [B, Hkv, S, Dv]
    scale: float,
    kv_offset: int = 0,
    window: int | None = None,
) -> torch.Tensor:  # [B, H, T, Dv]
    groups = q.shape[1] // k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    q_offset = kv_offset + kv_len - q_len
    if not _needs_mask(q_len, kv_len, q_offset, window):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=q_len > 1, enable_gqa=groups > 1)
    mask = attention_mask(q_len, kv_len, q_offset, kv_offset, window, q.device)
    if q_len == 1 and groups > 1:  # transformers' pack_gqa: the query heads of a kv head become its "rows"
        b, h, _, d = q.shape
        out = F.scaled_dot_product_attention(q.reshape(b, h // groups, groups, d), k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, h, 1, v.shape[-1])
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=scale)


def attention_decode_fp32(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, Dv]
    scale: float,
    kv_offset: int = 0,
    window: int | None = None,
    sinks: torch.Tensor | None = None,  # [H] GPT-OSS's sink logits
) -> torch.Tensor:  # [B, H, T, Dv]
    """One-token decode attention on the CPU in fp32, rounded back once: a quantized span's.

    One C call (`kernels.native.attend`) where it is built: the cache is read as it is, with
    none of the ~10 dispatcher ops around an SDPA call. Else torch's fp32 SDPA on casts: bf16
    SDPA on a CPU without AMX took 150 us against fp32's 37 (136 keys, 16 heads of 64, 4 kv
    heads; 600 against 92 at 512 keys). Neither is transformers' bf16 arithmetic, so only
    spans not bound to transformers' bits use it (quantized ones: `kernels.qspan.quantize_span`)."""
    decode = q.shape[2] == 1 and q.device.type == "cpu"
    if decode and (y := native.attend(q, k, v, scale, sinks)) is not None:  # a decode step sees every cached key
        return y
    if sinks is not None:
        return attention_sinks(q, k, v, scale, sinks, kv_offset, window)
    if not decode or q.dtype == torch.float32:
        return attention_sdpa(q, k, v, scale, kv_offset, window)
    return attention_sdpa(q.float(), k.float(), v.float(), scale, kv_offset, window).to(q.dtype)


def attention_reference(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, Dv]
    scale: float,
    kv_offset: int = 0,
    window: int | None = None,
) -> torch.Tensor:  # [B, H, T, Dv]
    groups = q.shape[1] // k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, T, S]
    mask = attention_mask(q_len, kv_len, kv_offset + kv_len - q_len, kv_offset, window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def attention_sinks(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    scale: float,
    sinks: torch.Tensor,  # [H] one learned logit per head
    kv_offset: int = 0,
    window: int | None = None,
) -> torch.Tensor:  # [B, H, T, D]
    """GPT-OSS eager attention: an additive float mask, the sink logit in the softmax, then dropped."""
    b, _, q_len, _ = q.shape
    groups = q.shape[1] // k.shape[1]
    kv_len = k.shape[2]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, T, S]
    allowed = attention_mask(q_len, kv_len, kv_offset + kv_len - q_len, kv_offset, window, q.device)
    zero = torch.zeros((), device=q.device, dtype=q.dtype)
    scores = scores + torch.where(allowed, zero, torch.finfo(q.dtype).min)
    logits = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(b, -1, q_len, -1)], dim=-1)  # [B, H, T, S + 1]
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]  # the sink's share is dropped
    return torch.matmul(probs.to(v.dtype), v)
