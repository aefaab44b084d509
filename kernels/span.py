"""The forward pass of a contiguous span of decoder layers, with a per-session KV cache.

Plain eager PyTorch over the layers of `kernels.layers`, whose operation order mirrors
transformers 5, so a pipeline of spans reproduces the single-process model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kernels.cache import KVCache
from kernels.config import ModelConfig
from kernels.errors import ShapeError
from kernels.layers import Attention, DecoderLayer, LatentAttention, MoEBlock, RMSNorm
from kernels.packed import PackedLinear
from kernels.qspan import QuantLinear
from kernels.quant import scales_of
from kernels.rope import Rotary

if TYPE_CHECKING:
    from kernels.fused import FusedDecode

__all__ = ["SpanModel"]


class SpanModel(nn.Module):
    """Layers [start, end) of a model; the embedding when start == 0, norm + head when end == L.

    ``forward`` takes token ids ``[B, T]`` (first span) or hidden states ``[B, T, H]``, and
    returns hidden states ``[B, T, H]`` or, on the last span, logits ``[B, T', V]`` where
    ``T' = 1`` if ``last_only`` else ``T``.
    """

    quantization = "none"  # set by kernels.qspan.quantize_span: "none" | "int8" | "int4"

    def __init__(self, cfg: ModelConfig, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= cfg.num_layers:
            raise ValueError(f"span [{start}, {end}) is not inside the model's {cfg.num_layers} layers")
        self.cfg, self.start, self.end = cfg, start, end
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if start == 0 else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, start + i) for i in range(end - start))
        self.rotary = Rotary(cfg.rope, complex_pairs=cfg.rope_style == "complex")
        self.is_last = end == cfg.num_layers
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_cast_after_weight) if self.is_last else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.is_last else None
        self._exact = True
        self._fused: dict[tuple[int, int], FusedDecode | None] = {}  # one-call decode plans, per layer range

    @property
    def is_first(self) -> bool:
        return self.embed_tokens is not None

    def set_exact(self, exact: bool) -> None:
        """Whether the span computes with transformers' own ops, bit for bit (the default), or,
        where no one's bits bind it (a quantized span), with faster ones: fp32 decode
        attention and router, one-call RMSNorms."""
        for module in self.modules():
            if isinstance(module, Attention | LatentAttention | RMSNorm | MoEBlock):
                module.exact = exact
        self._exact = exact
        self._fused.clear()

    def _apply(self, *args: Any, **kwargs: Any) -> SpanModel:  # .to(), .half(), ...: the plans' pointers go stale
        self._fused.clear()
        return super()._apply(*args, **kwargs)

    def _fused_decode(self, first: int, last: int) -> FusedDecode | None:
        """Layers [first, last) as one C call per decode step (kernels.fused), where they all
        have what it takes; never for an exact span."""
        if self._exact:
            return None
        if (first, last) not in self._fused:
            from kernels.fused import plan

            self._fused[first, last] = plan(self.layers[first:last], self.dtype)
        return self._fused[first, last]

    def new_cache(self, max_length: int, batch: int = 1, layers: tuple[int, int] | None = None) -> KVCache:
        """A cache for `layers` (local [first, last), default all) holding up to `max_length` tokens."""
        first, last = layers or (0, len(self.layers))
        heads, key_dim, value_dim = self._cache_shape
        windows = [self.cfg.window(self.start + i) for i in range(first, last)]
        return KVCache(
            last - first,
            heads,
            key_dim,
            max_length,
            self.dtype,
            self.device,
            batch,
            value_dim=value_dim,
            windows=windows,
        )

    @property
    def _cache_shape(self) -> tuple[int, int, int]:
        """(heads, key width, value width) of one cached position of one layer."""
        cfg = self.cfg
        if cfg.mla is not None:  # the kv latent and the shared rotary key, one "head"
            return 1, cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim
        return cfg.num_kv_heads, cfg.head_dim, cfg.head_dim

    def cache_bytes(self, max_length: int, layers: tuple[int, int] | None = None, batch: int = 1) -> int:
        """Bytes of `new_cache(max_length, batch, layers)`, for every family (MLA, sliding windows)."""
        first, last = layers or (0, len(self.layers))
        heads, key_dim, value_dim = self._cache_shape
        slots = sum(KVCache.slots_for(max_length, self.cfg.window(self.start + i)) for i in range(first, last))
        return batch * heads * slots * (key_dim + value_dim) * self.dtype.itemsize

    @property
    def _probe_weight(self) -> torch.Tensor:
        layer = self.layers[0]
        assert isinstance(layer, DecoderLayer)
        o_proj = layer.self_attn.o_proj  # norms and routers may stay fp32
        if isinstance(o_proj, PackedLinear):  # packed weights are bf16 on the CPU
            return torch.empty(0, dtype=o_proj.dtype)
        if isinstance(o_proj, QuantLinear):  # its scales are in the compute dtype, on its device
            return scales_of(o_proj.weight.value)
        assert isinstance(o_proj, nn.Linear)
        return o_proj.weight

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
        x = x.to(self.device)  # inputs may come from the CPU (the wire) to a span on an accelerator
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
            if cache.batch != 1:
                raise ShapeError("decode takes caches of batch 1 (one per session)")
            cache.check_step(position, 1)
        x = x.to(self.device)
        h = self._run(x, torch.tensor(positions)[:, None], caches, positions, first, last)  # [B, 1, H]
        for cache, position in zip(caches, positions, strict=True):
            cache.length = position + 1
        return self._head(h, last, last_only=True)

    def _layers(self, layers: tuple[int, int] | None, caches: Sequence[KVCache]) -> tuple[int, int]:
        first, last = layers or (0, len(self.layers))
        if not 0 <= first < last <= len(self.layers) or any(c.num_layers != last - first for c in caches):
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
        if self.embed_tokens is not None and first == 0:
            h = self.embed_tokens(x)  # [B, T, H]
            if self.cfg.embedding_multiplier != 1.0:
                h = h * self.cfg.embedding_multiplier
        else:
            h = x
        rope = self.rotary(positions.to(h.device), h.dtype)
        if h.shape[1] == 1 and (fused := self._fused_decode(first, last)) is not None:
            y = fused(h, rope, caches, starts)
            if y is not None:
                return y
        for i in range(first, last):
            h = self.layers[i](h, rope, caches, i - first, starts)
        return h

    def _head(self, h: torch.Tensor, last: int, last_only: bool) -> torch.Tensor:
        if self.norm is None or self.lm_head is None or last != len(self.layers):
            return h
        h = self.norm(h)
        logits = self.lm_head(h[:, -1:] if last_only else h)  # [B, T', V]
        return logits / self.cfg.logits_scaling if self.cfg.logits_scaling != 1.0 else logits
