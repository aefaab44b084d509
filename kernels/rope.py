"""Rotary position embeddings for every rope_type, following transformers' `modeling_rope_utils`.

`Rotary` gives each span its own cos/sin at absolute positions (default, `linear`, `dynamic`,
`llama3`, `yarn` with its attention factor); `apply_rotary` turns q and k in the three
layouts the families use (halves, interleaved pairs, complex pairs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.config import RopeConfig

__all__ = ["Rotary", "apply_rotary", "yarn_mscale"]


def yarn_mscale(scale: float, mscale: float = 1) -> float:
    """YaRN's magnitude scaling for a context `scale`x longer (DeepSeek also scales softmax by it)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """transformers' `_compute_yarn_parameters`, step for step."""
    base, dim, factor = rope.theta, rope.dim, rope.factor
    original = rope.original_max_position_embeddings or rope.max_position_embeddings
    if factor is None:
        factor = rope.max_position_embeddings / original
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no singularity
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _llama3(rope: RopeConfig) -> torch.Tensor:
    """transformers' `_compute_llama3_parameters`, step for step."""
    assert rope.factor is not None and rope.low_freq_factor is not None and rope.high_freq_factor is not None
    inv_freq = _default_inv_freq(rope.theta, rope.dim)
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_context = rope.original_max_position_embeddings or rope.max_position_embeddings
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _default_inv_freq(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))  # [D/2]


class Rotary(nn.Module):
    """Rotary position embedding at absolute positions (each span owns one), for every rope_type.

    The inverse frequencies follow transformers' `modeling_rope_utils`; `dynamic` recomputes
    them from each sequence's length, as transformers' `dynamic_rope_update` does.
    """

    inv_freq: torch.Tensor

    def __init__(self, rope: RopeConfig, complex_pairs: bool = False) -> None:
        super().__init__()
        self.rope = rope
        self.complex_pairs = complex_pairs  # DeepSeek-V2: (real, imag) of polar(1, freqs) [B, T, D/2], in fp32
        self.attention_scaling = 1.0
        if rope.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn(rope)
        elif rope.rope_type == "llama3":
            inv_freq = _llama3(rope)
        elif rope.rope_type == "linear":
            assert rope.factor is not None
            inv_freq = _default_inv_freq(rope.theta, rope.dim) / rope.factor
        else:  # default, and dynamic below its original length
            inv_freq = _default_inv_freq(rope.theta, rope.dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _dynamic_inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        rope = self.rope
        assert rope.factor is not None
        max_pos = rope.max_position_embeddings
        seq_len = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device))
        base = rope.theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (rope.dim / (rope.dim - 2))
        return _default_inv_freq(base, rope.dim).to(seq_len.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope.rope_type == "dynamic":  # each row is its own sequence: its own frequencies
            rows = []
            for row in positions:  # [T]
                seq_len = torch.max(row) + 1
                inv = self._dynamic_inv_freq(seq_len) if seq_len > self.rope.max_position_embeddings else self.inv_freq
                rows.append(row[..., None].float() * inv.float())
            freqs = torch.stack(rows)  # [B, T, D/2]
        else:
            freqs = positions[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        if self.complex_pairs:
            freqs_cis = torch.polar(torch.ones_like(freqs), freqs) * self.attention_scaling  # [B, T, D/2]
            return freqs_cis.real, freqs_cis.imag
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, T, D]
    cos: torch.Tensor,  # [B, T, D]
    sin: torch.Tensor,
    style: str = "half",  # "interleave", "complex": pairs (x0, x1), (x2, x3), ... rotate together (DeepSeek)
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D] ([B, 1, T, D/2] for complex)
    if style == "complex":  # DeepSeek-V2: in fp32 complex arithmetic, back to the input dtype
        freqs_cis = torch.complex(cos, sin)

        def turn(x: torch.Tensor) -> torch.Tensor:
            pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(pairs * freqs_cis).flatten(3).type_as(x)

        return turn(q), turn(k)
    if style == "interleave":
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        q1, q2, k1, k2 = q[..., 0::2], q[..., 1::2], k[..., 0::2], k[..., 1::2]
        return (
            torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1),
            torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1),
        )
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
