"""The decoder layers a span is made of: RMSNorm, attention (grouped-query, with sinks and
sliding windows, or DeepSeek's latent attention), the dense MLP and the MoE block.

Plain eager PyTorch in transformers 5's operation order (RMSNorm in fp32, rotary in fp32,
router softmax in fp32, experts accumulated in ascending expert order), so that a pipeline of
spans reproduces the single-process model exactly; `exact = False` on a module (a span bound
to no one's bits: `SpanModel.set_exact`) lets it take the one-call C kernels instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels import native
from kernels.attention import attention_decode_fp32, attention_sdpa, attention_sinks
from kernels.cache import KVCache
from kernels.config import ModelConfig
from kernels.moe import (
    ClampedSwiGLU,
    ExpertAct,
    experts_forward,
    experts_fused,
    linear_fp32,
    route,
    route_sigmoid_group,
    route_softmax_group,
    route_topk_softmax,
)
from kernels.packed import PackedTensor
from kernels.qspan import QuantTensor, as_weight
from kernels.rope import apply_rotary

__all__ = ["Attention", "DecoderLayer", "DenseMLP", "LatentAttention", "MoEBlock", "RMSNorm"]


class RMSNorm(nn.Module):
    exact = True  # transformers' ops, bit for bit; False: one C call (kernels.native.rmsnorm) instead of 8

    def __init__(self, dim: int, eps: float, cast_after_weight: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.cast_after_weight = cast_after_weight  # GPT-OSS: (w * x).to(dtype), its weights kept in fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.exact and (y := native.rmsnorm(x, self.weight, self.eps, self.cast_after_weight)) is not None:
            return y
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.cast_after_weight:
            return (self.weight * x).to(dtype)
        return self.weight * x.to(dtype)


def _attend(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, T, D] new keys (or latents)
    v: torch.Tensor,  # [B, Hkv, T, Dv]
    caches: Sequence[KVCache],  # one cache for all rows, or one per row (batched decode)
    layer: int,
    positions: Sequence[int],
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],  # (q, k_all, v_all, kv_offset)
) -> torch.Tensor:  # [B, T, Hq * Dv]
    if len(caches) == 1:
        out = attend(q, *caches[0].update(layer, positions[0], k, v))  # [B, Hq, T, Dv]
    else:  # row i is another session: its own cache, its own length
        out = torch.cat(
            [
                attend(q[i : i + 1], *c.update(layer, p, k[i : i + 1], v[i : i + 1]))
                for i, (c, p) in enumerate(zip(caches, positions, strict=True))
            ]
        )
    b, _, t, _ = out.shape
    return out.transpose(1, 2).contiguous().reshape(b, t, -1).contiguous()


class Attention(nn.Module):
    """Grouped-query attention: optional q/k norms, qkv clamp, sliding window, attention sinks."""

    # True: transformers' ops; False: rotary in one C call, one-token decode attends in fp32 (attention_decode_fp32)
    exact = True

    def __init__(self, cfg: ModelConfig, global_index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else cfg.head_dim**-0.5
        self.window = cfg.window(global_index)
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        norm_dims = {"": None, "head": (cfg.head_dim, cfg.head_dim), "full": (q_dim, kv_dim)}[cfg.qk_norm]
        self.q_norm = RMSNorm(norm_dims[0], cfg.rms_norm_eps) if norm_dims else None
        self.k_norm = RMSNorm(norm_dims[1], cfg.rms_norm_eps) if norm_dims else None
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads)) if cfg.attention_sinks else None

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        rope: tuple[torch.Tensor, torch.Tensor],
        caches: Sequence[KVCache],  # one cache for all rows, or one per row (batched decode)
        layer: int,
        positions: Sequence[int],  # where each cache's new tokens go
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, Hq*D | Hkv*D]
        if self.cfg.qk_norm == "full" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.clip_qkv is not None:
            c = self.cfg.clip_qkv
            q, k, v = q.clamp_(min=-c, max=c), k.clamp_(min=-c, max=c), v.clamp_(min=-c, max=c)
        q = q.view(b, t, -1, self.head_dim)  # [B, T, Hq, D]
        k = k.view(b, t, -1, self.head_dim)  # [B, T, Hkv, D]
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        if self.cfg.qk_norm == "head" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if not self.exact and native.rope(q, k, *rope):  # in place, one C call
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, Hq|Hkv, T, D]
        else:
            q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), *rope)  # [B, Hq|Hkv, T, D]
        sinks, window, scale, exact = self.sinks, self.window, self.scale, self.exact

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
            if not exact:
                return attention_decode_fp32(q, k, v, scale, offset, window, sinks)
            if sinks is not None:
                return attention_sinks(q, k, v, scale, sinks, offset, window)
            return attention_sdpa(q, k, v, scale, offset, window)

        return self.o_proj(_attend(q, k, v, caches, layer, positions, attend))


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention; the cache holds the normalised kv latent and the
    shared rotary key (transformers' layout), expanded to per-head keys and values each step."""

    exact = True  # as Attention's

    def __init__(self, cfg: ModelConfig, global_index: int) -> None:
        super().__init__()
        assert cfg.mla is not None
        m = self.mla = cfg.mla
        self.cfg = cfg
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else m.qk_head_dim**-0.5
        h, heads = cfg.hidden_size, cfg.num_heads
        if m.q_lora_rank is None:
            self.q_proj: nn.Linear | None = nn.Linear(h, heads * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, m.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, 1e-6)  # transformers leaves these at the default eps
            self.q_b_proj = nn.Linear(m.q_lora_rank, heads * m.qk_head_dim, bias=False)
            self.q_proj = None
        self.kv_a_proj_with_mqa = nn.Linear(h, m.kv_lora_rank + m.qk_rope_head_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * m.v_head_dim, h, bias=cfg.o_bias)

    def _expand(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1, S, r] latents and [B, 1, S, R] rotary keys -> keys [B, H, S, N + R], values [B, H, S, V]."""
        m = self.mla
        b, _, s, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, s, -1, m.qk_nope_head_dim + m.v_head_dim).transpose(1, 2)
        k_nope, values = torch.split(kv, [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k_rot = k_rot.expand(-1, k_nope.shape[1], -1, -1)
        keys = kv.new_empty(*kv.shape[:-1], m.qk_head_dim)
        keys[..., : m.qk_nope_head_dim].copy_(k_nope)
        keys[..., m.qk_nope_head_dim :].copy_(k_rot)
        return keys, values

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        rope: tuple[torch.Tensor, torch.Tensor],
        caches: Sequence[KVCache],
        layer: int,
        positions: Sequence[int],
    ) -> torch.Tensor:
        m = self.mla
        b, t, _ = x.shape
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, -1, m.qk_head_dim).transpose(1, 2)  # [B, Hq, T, N + R]
        q_pass, q_rot = torch.split(q, [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_rot = torch.split(self.kv_a_proj_with_mqa(x), [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(b, 1, t, m.kv_lora_rank)  # [B, 1, T, r]
        k_rot = k_rot.view(b, 1, t, m.qk_rope_head_dim)  # [B, 1, T, R]
        q_rot, k_rot = apply_rotary(q_rot, k_rot, *rope, style=self.cfg.rope_style)
        q = torch.cat((q_pass, q_rot), dim=-1)
        scale = self.scale
        sdpa = attention_sdpa if self.exact else attention_decode_fp32

        def attend(q: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor, offset: int) -> torch.Tensor:
            return sdpa(q, *self._expand(latent, k_rot), scale, offset)

        return self.o_proj(_attend(q, latent, k_rot, caches, layer, positions, attend))


class DenseMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        width = cfg.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """router -> experts (dispatch, run, combine) [+ a shared expert, optionally gated]."""

    # True: transformers' router; False: routing in fp32 (in C, or moe.linear_fp32), quantized experts in one C call
    exact = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.router = nn.Parameter(torch.empty(e, h))  # [E, H]
        self.router_bias = nn.Parameter(torch.empty(e)) if cfg.router_bias else None  # [E]
        self.score_bias = nn.Parameter(torch.empty(e)) if cfg.router == "sigmoid_group" else None  # [E]
        if cfg.expert_style == "gpt_oss":
            # [E, H, 2I] interleaved, [E, I, H]; quantized or packed in place after loading
            self.gate_up: nn.Parameter | QuantTensor | PackedTensor = nn.Parameter(torch.empty(e, h, 2 * i))
            self.down: nn.Parameter | QuantTensor | PackedTensor = nn.Parameter(torch.empty(e, i, h))
            self.gate_up_bias: nn.Parameter | None = nn.Parameter(torch.empty(e, 2 * i))
            self.down_bias: nn.Parameter | None = nn.Parameter(torch.empty(e, h))
        else:
            self.gate_up = nn.Parameter(torch.empty(e, 2 * i, h))  # [E, 2I, H]
            self.down = nn.Parameter(torch.empty(e, h, i))  # [E, H, I]
            self.gate_up_bias = self.down_bias = None
        self.shared = DenseMLP(cfg, cfg.shared_expert_size) if cfg.shared_expert_size else None
        self.shared_gate = nn.Linear(h, 1, bias=False) if cfg.shared_expert_gate else None

    def _route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.router == "sigmoid_group":
            assert self.score_bias is not None
            return route_sigmoid_group(
                flat,
                self.router,
                self.score_bias,
                cfg.top_k,
                cfg.n_group,
                cfg.topk_group,
                cfg.norm_topk_prob,
                cfg.routed_scaling_factor,
            )
        if cfg.router == "softmax_group":
            return route_softmax_group(
                flat, self.router, cfg.top_k, cfg.n_group, cfg.topk_group, cfg.group_limited, cfg.routed_scaling_factor
            )
        if not self.exact and cfg.router == "softmax_topk":
            fast = native.route(flat, self.router, cfg.top_k, cfg.norm_topk_prob, cfg.router_weights_in_model_dtype)
            if fast is not None:
                return fast
        linear = F.linear if self.exact else linear_fp32
        if cfg.router == "topk_softmax":
            upcast = self.router_bias is None
            return route_topk_softmax(flat, self.router, self.router_bias, cfg.top_k, upcast, linear)
        return route(flat, self.router, cfg.top_k, cfg.norm_topk_prob, cfg.router_weights_in_model_dtype, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [B*T, H]
        shared = self.shared(flat) if self.shared is not None else None  # [B*T, H]
        weights, ids = self._route(flat)  # [B*T, k] each
        act: ExpertAct = F.silu
        if self.gate_up_bias is not None and self.down_bias is not None:
            act = ClampedSwiGLU(self.gate_up_bias, self.down_bias, self.cfg.swiglu_alpha, self.cfg.swiglu_limit)
        gate_up, down = as_weight(self.gate_up), as_weight(self.down)  # quantized or not
        out = None if self.exact or act is not F.silu else experts_fused(flat, ids, weights, gate_up, down)
        if out is None:
            out = experts_forward(flat, ids, weights, gate_up, down, act)  # [B*T, H]
        if shared is not None:
            if self.shared_gate is not None:
                shared = F.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, global_index: int) -> None:
        super().__init__()
        self.residual_multiplier = cfg.residual_multiplier
        cast_after = cfg.norm_cast_after_weight
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cast_after)
        self.self_attn: nn.Module = LatentAttention(cfg, global_index) if cfg.mla else Attention(cfg, global_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cast_after)
        self.mlp: nn.Module = MoEBlock(cfg) if cfg.is_moe_layer(global_index) else DenseMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        caches: Sequence[KVCache],
        layer: int,
        positions: Sequence[int],
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, caches, layer, positions)
        x = x + (h * self.residual_multiplier if self.residual_multiplier != 1.0 else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (h * self.residual_multiplier if self.residual_multiplier != 1.0 else h)
