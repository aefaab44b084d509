"""How many bytes a span's weights take, at a dtype and a quantization, without loading it.

The sizes follow `kernels.quant.quantize`'s choices (int4 where the packed kernel takes the
shape, int8 otherwise; the LM head int8 in int4 mode); a test checks them against loaded
spans. Placement uses them to take the largest window that fits in a memory budget.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.config import ModelConfig
from kernels.quant import INT4_GROUP, INT4_N_BLOCK

__all__ = ["SpanBytes", "layer_bytes", "quantized_nbytes", "span_bytes"]


def quantized_nbytes(shape: torch.Size | tuple[int, ...], mode: str, dtype: torch.dtype) -> int:
    """Bytes of a weight ``[..., N, K]`` once `kernels.quant.quantize(w, mode)` has run."""
    *lead, n, k = shape
    copies = math.prod(lead)
    if mode == "none":
        return copies * n * k * dtype.itemsize
    if mode == "bf16":
        return copies * n * k * 2  # no scales
    if mode == "int4" and k % INT4_GROUP == 0 and n % INT4_N_BLOCK == 0:
        return copies * (n * k // 2 + (k // INT4_GROUP) * n * 2 * dtype.itemsize)
    return copies * (n * k + n * dtype.itemsize)  # int8 codes and one scale per output channel


def _module_bytes(module: nn.Module, mode: str, dtype: torch.dtype) -> int:
    total = 0
    quantized: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            quantized.add(id(sub.weight))
            total += quantized_nbytes(sub.weight.shape, mode, dtype)
        gate_up, down = getattr(sub, "gate_up", None), getattr(sub, "down", None)
        if isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter):
            expert_mode = "none" if getattr(sub, "gate_up_bias", None) is not None else mode  # GPT-OSS: kept
            for w in (gate_up, down):
                quantized.add(id(w))
                total += quantized_nbytes(w.shape, expert_mode, dtype)
    for p in module.parameters():
        if id(p) not in quantized:
            total += p.numel() * dtype.itemsize  # norms, routers, biases (a few stay fp32: a rounding error)
    return total


def layer_bytes(cfg: ModelConfig, index: int, dtype: torch.dtype, mode: str = "none") -> int:
    """Bytes of decoder layer `index`'s weights at `dtype`, quantized as `mode`."""
    from kernels.layers import DecoderLayer

    with torch.device("meta"):
        layer = DecoderLayer(cfg, index)
    return _module_bytes(layer, mode, dtype)


class SpanBytes:
    """Per-layer weight bytes of a model at one dtype and quantization, and its ends' extras."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, mode: str = "none") -> None:
        self.cfg, self.dtype, self.mode = cfg, dtype, mode
        # layers differ only by kind (dense or MoE, attention window does not change weights)
        kinds: dict[bool, int] = {}
        self.layers = []
        for i in range(cfg.num_layers):
            moe = cfg.is_moe_layer(i)
            if moe not in kinds:
                kinds[moe] = layer_bytes(cfg, i, dtype, mode)
            self.layers.append(kinds[moe])
        h, v = cfg.hidden_size, cfg.vocab_size
        self.embedding = v * h * dtype.itemsize
        head_mode = "int8" if mode == "int4" else mode
        self.head = quantized_nbytes((v, h), head_mode, dtype) + h * dtype.itemsize  # + the final norm

    @property
    def per_block(self) -> int:
        """The largest layer's bytes: what a window must budget for each of its blocks."""
        return max(self.layers)

    def span(self, start: int, end: int) -> int:
        """Bytes of layers [start, end) as loaded, with the embedding and the head where they belong."""
        extra = (self.embedding if start == 0 else 0) + (self.head if end == self.cfg.num_layers else 0)
        return sum(self.layers[start:end]) + extra

    def blocks_that_fit(self, budget: int) -> int:
        """How many blocks fit in `budget` bytes wherever the window lands (the ends' extras reserved)."""
        room = budget - self.embedding - self.head
        return max(0, min(self.cfg.num_layers, room // self.per_block))


def span_bytes(cfg: ModelConfig, start: int, end: int, dtype: torch.dtype, mode: str = "none") -> int:
    return SpanBytes(cfg, dtype, mode).span(start, end)
