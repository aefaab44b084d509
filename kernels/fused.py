"""A quantized span's decode step, all its layers in one C call (`moemesh_layers` in
kernels/qgemv.c).

With each piece of a layer already one C call (`kernels.native`), an int4 bench-model token
still spent ~3 of its ~13 ms in Python and the dispatcher between them: the projections'
wrappers, cache writes, residual adds, views, ~115 ops a layer. `moemesh_layers` runs the same
pieces in the same order with the same roundings, so a session's step gets the op-by-op
path's bits (the tests compare them): what changes is only who calls the pieces. (Rows of
one batched cache too get their lone bits here, where op by op their attention is torch's.)

It takes the layers whose every piece the C file has:
- grouped-query attention without biases, clamps, sinks or a sliding window, with or without
  per-head q/k norms (Mixtral, Qwen3-MoE), half-style rotary over the whole head;
- softmax top-k routing to quantized SiLU experts, no shared expert;
- RMSNorms in the compute dtype, unit residuals;
and up to `native.MAX_ROWS` rows of one token each, whose caches are plain slots. Anything
else, and every span where the library is not built, runs op by op.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from kernels import native
from kernels.cache import KVCache
from kernels.layers import Attention, DecoderLayer, MoEBlock, RMSNorm
from kernels.qspan import QuantLinear, QuantTensor

__all__ = ["FusedDecode", "plan"]

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_KIND = {"int8": 8, "int4": 4, "bf16": 16}


class _QProj(ctypes.Structure):
    _fields_ = [("kind", _I64), ("codes", _PTR), ("scales", _PTR), ("N", _I64), ("K", _I64), ("G", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _PTR),
        ("post_norm", _PTR),
        ("eps", _F32),
        ("q", _QProj),
        ("k", _QProj),
        ("v", _QProj),
        ("o", _QProj),
        ("q_norm", _PTR),
        ("k_norm", _PTR),
        ("Hq", _I64),
        ("Hkv", _I64),
        ("D", _I64),
        ("scale", _F32),
        ("router", _PTR),
        ("router_dtype", _I64),
        ("E", _I64),
        ("top_k", _I64),
        ("normalize", _I64),
        ("round_weights", _I64),
        ("moe_kind", _I64),
        ("I", _I64),
        ("G", _I64),
        ("gu_codes", _PTR),
        ("gu_scales", _PTR),
        ("dn_codes", _PTR),
        ("dn_scales", _PTR),
    ]


def _norm(norm: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    if not isinstance(norm, RMSNorm) or norm.exact or norm.cast_after_weight:
        return None
    w = norm.weight
    return w if w.dtype is dtype and w.is_cpu and w.is_contiguous() else None


def _quant(t: object, dtype: torch.dtype) -> tuple[str, torch.Tensor, torch.Tensor, int] | None:
    if not isinstance(t, QuantTensor) or t.scales.dtype is not dtype:
        return None
    if not (t.data.is_cpu and t.data.is_contiguous() and t.scales.is_contiguous()):
        return None
    return t.kind, t.data, t.scales, t.group


def _proj(linear: nn.Module, dtype: torch.dtype, keep: list[torch.Tensor]) -> _QProj | None:
    if not isinstance(linear, QuantLinear) or linear.bias is not None:
        return None
    q = _quant(linear.weight, dtype)
    if q is None:
        return None
    kind, codes, scales, group = q
    keep += [codes, scales]
    return _QProj(_KIND[kind], codes.data_ptr(), scales.data_ptr(), linear.out_features, linear.in_features, group)


def _layer(layer: nn.Module, dtype: torch.dtype, keep: list[torch.Tensor]) -> _Layer | None:
    """The C description of `layer`, or None unless the C file has every piece of it."""
    if not isinstance(layer, DecoderLayer) or layer.residual_multiplier != 1.0:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(attn, Attention) or not isinstance(mlp, MoEBlock) or attn.exact or mlp.exact:
        return None
    cfg = attn.cfg
    if cfg.qk_norm not in ("", "head") or cfg.clip_qkv is not None or attn.window is not None:
        return None
    if attn.sinks is not None or cfg.rope.dim != cfg.head_dim:
        return None
    if cfg.router != "softmax_topk" or mlp.shared is not None or mlp.gate_up_bias is not None:
        return None
    input_norm, post_norm = _norm(layer.input_layernorm, dtype), _norm(layer.post_attention_layernorm, dtype)
    if input_norm is None or post_norm is None or layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
        return None  # (one eps per layer in C)
    qk_norms: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if cfg.qk_norm == "head":
        assert attn.q_norm is not None and attn.k_norm is not None
        qk_norms = _norm(attn.q_norm, dtype), _norm(attn.k_norm, dtype)
        if any(n is None for n in qk_norms) or {attn.q_norm.eps, attn.k_norm.eps} != {layer.input_layernorm.eps}:
            return None
    q, k, v, o = (_proj(p, dtype, keep) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    gate_up, down, router = _quant(mlp.gate_up, dtype), _quant(mlp.down, dtype), mlp.router
    if q is None or k is None or v is None or o is None or gate_up is None or down is None:
        return None
    if router.dtype not in native.DTYPES or not (router.is_cpu and router.is_contiguous()) or cfg.head_dim > 1024:
        return None
    (gu_kind, gu_codes, gu_scales, group), (dn_kind, dn_codes, dn_scales, dn_group) = gate_up, down
    if gu_kind != dn_kind or group != dn_group:
        return None
    keep += [t for t in (input_norm, post_norm, *qk_norms, router) if t is not None]
    return _Layer(
        input_norm.data_ptr(), post_norm.data_ptr(), layer.input_layernorm.eps, q, k, v, o,
        *(0 if n is None else n.data_ptr() for n in qk_norms),
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, attn.scale,
        router.data_ptr(), native.DTYPES[router.dtype], cfg.num_experts, cfg.top_k, cfg.norm_topk_prob,
        cfg.router_weights_in_model_dtype, _KIND[gu_kind], cfg.moe_intermediate_size, group,
        gu_codes.data_ptr(), gu_scales.data_ptr(), dn_codes.data_ptr(), dn_scales.data_ptr(),
    )  # fmt: skip


class FusedDecode:
    """Layers [first, last) of a span as one C call per decode step (see the module)."""

    def __init__(self, lib: ctypes.CDLL, layers: list[_Layer], keep: list[torch.Tensor], dtype: torch.dtype) -> None:
        self._lib, self._keep, self.dtype = lib, keep, dtype  # keep: the tensors the pointers point into
        self._layers = (_Layer * len(layers))(*layers)
        self._n = len(layers)
        self._head_dim, self._hidden = layers[0].D, layers[0].q.K
        self._kv_heads = layers[0].Hkv  # (one config: every layer has the same heads and width)

    def __call__(
        self,
        h: torch.Tensor,  # [M, 1, H] hidden states of one token of each row
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [M or 1, 1, D]
        caches: Sequence[KVCache],  # one per row (each of batch 1), or one of batch M
        positions: Sequence[int],  # where each cache's new token goes
    ) -> torch.Tensor | None:  # [M, 1, H], the caches written; None (nothing done) where it does not apply
        m, t, hidden = h.shape
        cos, sin = rope
        if t != 1 or not 1 <= m <= native.MAX_ROWS or hidden != self._hidden or h.dtype is not self.dtype:
            return None
        if not h.is_cpu:
            return None
        if cos.shape[1:] != (1, self._head_dim) or cos.shape[0] not in (1, m) or sin.shape != cos.shape:
            return None
        if not (cos.dtype is sin.dtype is self.dtype):
            return None
        rows = self._rows(caches, positions, m)
        if rows is None:
            return None
        keys, values, where, slots = rows
        x = h.contiguous().clone()  # the caller's input stays as it was
        cos, sin = cos.expand(m, 1, -1).contiguous(), sin.expand(m, 1, -1).contiguous()  # one position for all rows
        rc = self._lib.moemesh_layers(
            self._layers, self._n, native.DTYPES[self.dtype], m, hidden, x.data_ptr(), keys, values, where, slots,
            cos.data_ptr(), sin.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if rc:  # every shape was checked above: only an allocation can fail, with the caches half written
            raise MemoryError(f"the native decode step failed (code {rc})")
        return x

    def _rows(self, caches: Sequence[KVCache], positions: Sequence[int], m: int) -> tuple[object, ...] | None:
        """Per layer and row, the row's key and value slots [Hkv, S, D]; positions and slot counts."""
        if len(caches) == 1 and len(positions) == 1:
            cache, position = caches[0], positions[0]
            if cache.batch != m:
                return None
            pairs = [(cache, b, position) for b in range(m)]
        elif len(caches) == m == len(positions) and all(c.batch == 1 for c in caches):
            pairs = [(c, 0, p) for c, p in zip(caches, positions, strict=True)]
        else:
            return None
        n = self._n
        keys, values = (_PTR * (n * m))(), (_PTR * (n * m))()
        for r, (cache, b, position) in enumerate(pairs):
            if cache.num_layers != n or any(w is not None for w in cache.windows):
                return None
            # without windows a KVCache's layers share one shape, dtype and device: its first says
            k, v = cache.keys[0], cache.values[0]
            if k.shape[1:] != (self._kv_heads, cache.slots[0], self._head_dim) or v.shape != k.shape:
                return None
            if k.dtype is not self.dtype or not (k.is_cpu and k.is_contiguous() and v.is_contiguous()):
                return None
            if not 0 <= position < cache.slots[0]:  # the C call writes there: never out of the slots
                return None
            row = b * k.stride(0) * k.element_size()
            keys[r::m] = [t.data_ptr() + row for t in cache.keys]
            values[r::m] = [t.data_ptr() + row for t in cache.values]
        where = (_I64 * m)(*(p for _, _, p in pairs))
        slots = (_I64 * m)(*(c.slots[0] for c, _, _ in pairs))
        return keys, values, where, slots


def plan(layers: Iterable[nn.Module], dtype: torch.dtype) -> FusedDecode | None:
    """The one-call decode of `layers` in `dtype`, or None where the C file lacks a piece of one
    of them (or the library is not built here)."""
    lib = native.library()
    if lib is None:
        return None
    keep: list[torch.Tensor] = []
    described = [_layer(layer, dtype, keep) for layer in layers]
    if not described or any(d is None for d in described):
        return None
    return FusedDecode(lib, [d for d in described if d is not None], keep, dtype)
