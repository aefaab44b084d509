"""The forward pass of a contiguous span of decoder layers, with a per-session KV cache.

Plain eager PyTorch. The operation order mirrors transformers 5 (RMSNorm in fp32, rotary
in fp32, router softmax in fp32, experts accumulated in ascending expert order), so a
pipeline of spans reproduces the single-process model exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import attention_sdpa
from kernels.cache import KVCache
from kernels.config import ModelConfig
from kernels.errors import ShapeError
from kernels.moe import experts_forward, route
from kernels.quant import QuantTensor, as_weight

__all__ = ["Attention", "DecoderLayer", "DenseMLP", "MoEBlock", "RMSNorm", "Rotary", "SpanModel"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding at absolute positions (each span owns one)."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # [D/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        rope: tuple[torch.Tensor, torch.Tensor],
        caches: Sequence[KVCache],  # one cache for all rows, or one per row (batched decode)
        layer: int,
        positions: Sequence[int],  # where each cache's new tokens go
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim)  # [B, T, Hq, D]
        k = self.k_proj(x).view(b, t, -1, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), *rope)  # [B, Hq|Hkv, T, D]
        if len(caches) == 1:
            k_all, v_all = caches[0].update(layer, positions[0], k, v)  # [B, Hkv, position + T, D]
            out = attention_sdpa(q, k_all, v_all, self.scale)  # [B, Hq, T, D]
        else:  # row i is another session: its own cache, its own length
            out = torch.cat(
                [
                    attention_sdpa(q[i : i + 1], *c.update(layer, p, k[i : i + 1], v[i : i + 1]), self.scale)
                    for i, (c, p) in enumerate(zip(caches, positions, strict=True))
                ]
            )
        out = out.transpose(1, 2).contiguous().reshape(b, t, -1).contiguous()  # [B, T, Hq*D]
        return self.o_proj(out)


class DenseMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.router = nn.Parameter(torch.empty(e, h))  # [E, H]
        self.gate_up: nn.Parameter | QuantTensor = nn.Parameter(torch.empty(e, 2 * i, h))  # [E, 2I, H]
        self.down: nn.Parameter | QuantTensor = nn.Parameter(torch.empty(e, h, i))  # [E, H, I]
        self.act: Callable[[torch.Tensor], torch.Tensor] = F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [B*T, H]
        weights, ids = route(
            flat, self.router, self.cfg.top_k, self.cfg.norm_topk_prob, self.cfg.router_weights_in_model_dtype
        )  # [B*T, k] each
        gate_up, down = as_weight(self.gate_up), as_weight(self.down)  # quantized or not
        out = experts_forward(flat, ids, weights, gate_up, down, self.act)  # [B*T, H]
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, global_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoEBlock(cfg) if cfg.is_moe_layer(global_index) else DenseMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        caches: Sequence[KVCache],
        layer: int,
        positions: Sequence[int],
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, caches, layer, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class SpanModel(nn.Module):
    """Layers [start, end) of a model; the embedding when start == 0, norm + head when end == L.

    ``forward`` takes token ids ``[B, T]`` (first span) or hidden states ``[B, T, H]``, and
    returns hidden states ``[B, T, H]`` or, on the last span, logits ``[B, T', V]`` where
    ``T' = 1`` if ``last_only`` else ``T``.
    """

    quantization = "none"  # set by kernels.quant.quantize_span: "none" | "int8" | "int4"

    def __init__(self, cfg: ModelConfig, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= cfg.num_layers:
            raise ValueError(f"span [{start}, {end}) is not inside the model's {cfg.num_layers} layers")
        self.cfg, self.start, self.end = cfg, start, end
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if start == 0 else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, start + i) for i in range(end - start))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.is_last = end == cfg.num_layers
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.is_last else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.is_last else None

    @property
    def is_first(self) -> bool:
        return self.embed_tokens is not None

    def new_cache(self, max_length: int, batch: int = 1, layers: tuple[int, int] | None = None) -> KVCache:
        """A cache for `layers` (local [first, last), default all) holding up to `max_length` tokens."""
        first, last = layers or (0, len(self.layers))
        weight = self._probe_weight
        cfg = self.cfg
        return KVCache(last - first, cfg.num_kv_heads, cfg.head_dim, max_length, weight.dtype, weight.device, batch)

    @property
    def _probe_weight(self) -> torch.Tensor:
        layer = self.layers[0]
        assert isinstance(layer, DecoderLayer)
        return layer.input_layernorm.weight

    @property
    def device(self) -> torch.device:
        return self._probe_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._probe_weight.dtype

    def check_input(self, x: torch.Tensor, first: int = 0) -> None:
        """Raise ShapeError unless `x` is what local layer `first` of this span takes."""
        if self.is_first and first == 0:
            if x.dim() != 2 or x.dtype != torch.int64:
                raise ShapeError(f"layer 0 takes int64 token ids [batch, tokens], got {x.dtype} {list(x.shape)}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.cfg.vocab_size):
                raise ShapeError(f"token ids must be in 0..{self.cfg.vocab_size - 1}")
        elif x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size or x.dtype != self.dtype:
            raise ShapeError(
                f"layer {self.start + first} takes {str(self.dtype).removeprefix('torch.')} hidden states"
                f" [batch, tokens, {self.cfg.hidden_size}], got {str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
            )
        if x.shape[1] == 0:
            raise ShapeError("the input holds no tokens")

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache,
        position: int,
        last_only: bool = False,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run local layers [first, last) (default: all) on `x` at absolute `position`.

        `cache` must hold exactly those layers. Token ids are embedded when local layer 0 is
        the model's first; logits come out when `last` is the model's last layer.
        """
        first, last = self._layers(layers, [cache])
        self.check_input(x, first)
        t = x.shape[1]
        cache.check_step(position, t)
        positions = torch.arange(position, position + t)[None]  # [1, T]
        h = self._run(x, positions, [cache], [position], first, last)
        cache.length = position + t
        return self._head(h, last, last_only)

    @torch.inference_mode()
    def decode(
        self,
        x: torch.Tensor,  # [B, 1] token ids or [B, 1, H] hidden states: one new token of B sessions
        caches: Sequence[KVCache],  # session i's cache (batch 1 each), all for local layers `layers`
        positions: Sequence[int],  # session i's token goes to positions[i]
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """One decode step of several sessions as one batched forward (continuous batching).

        Projections, experts and the head run once over the B rows; attention runs per
        session over its own cache. Returns hidden states [B, 1, H] or logits [B, 1, V].
        """
        first, last = self._layers(layers, caches)
        if x.shape[:2] != (len(caches), 1) or len(positions) != len(caches):
            raise ShapeError(f"decode takes one token per session: {len(caches)} caches, input {list(x.shape)}")
        self.check_input(x, first)
        for cache, position in zip(caches, positions, strict=True):
            if cache.keys.shape[1] != 1:
                raise ShapeError("decode takes caches of batch 1 (one per session)")
            cache.check_step(position, 1)
        h = self._run(x, torch.tensor(positions)[:, None], caches, positions, first, last)  # [B, 1, H]
        for cache, position in zip(caches, positions, strict=True):
            cache.length = position + 1
        return self._head(h, last, last_only=True)

    def _layers(self, layers: tuple[int, int] | None, caches: Sequence[KVCache]) -> tuple[int, int]:
        first, last = layers or (0, len(self.layers))
        if not 0 <= first < last <= len(self.layers) or any(c.keys.shape[0] != last - first for c in caches):
            raise ShapeError(f"local layers [{first}, {last}) do not match the span or its cache")
        return first, last

    def _run(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,  # [1 or B, T] absolute positions of x's tokens
        caches: Sequence[KVCache],
        starts: Sequence[int],
        first: int,
        last: int,
    ) -> torch.Tensor:
        h = self.embed_tokens(x) if self.embed_tokens is not None and first == 0 else x  # [B, T, H]
        rope = self.rotary(positions.to(h.device), h.dtype)
        for i in range(first, last):
            h = self.layers[i](h, rope, caches, i - first, starts)
        return h

    def _head(self, h: torch.Tensor, last: int, last_only: bool) -> torch.Tensor:
        if self.norm is None or self.lm_head is None or last != len(self.layers):
            return h
        h = self.norm(h)
        return self.lm_head(h[:, -1:] if last_only else h)  # [B, T', V]
