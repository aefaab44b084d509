"""Memory-aware placement: a span's weight bytes known before loading, the window that fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILIES

from kernels import PackedTensor, SpanModel
from kernels.memory import SpanBytes
from shards import Checkpoint


def held_bytes(span: SpanModel) -> int:
    """What a loaded span holds: parameters, buffers (the rotary table aside) and packed weights."""
    tensors = [t for n, t in [*span.named_parameters(), *span.named_buffers()] if not n.endswith("inv_freq")]
    packed = sum(m.nbytes for m in span.modules() if isinstance(m, PackedTensor))
    return sum(t.numel() * t.element_size() for t in tensors) + packed


@pytest.mark.parametrize("mode", ["none", "bf16", "int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_span_bytes_match_what_a_loaded_span_holds(family: str, mode: str, tiny_models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(tiny_models[family])
    sizes = SpanBytes(checkpoint.config, torch.bfloat16, mode)
    for start, end in ((0, 2), (1, 3), (2, 4), (0, 4)):
        span = checkpoint.load_span(start, end, dtype=torch.bfloat16, quantize=mode)
        assert abs(sizes.span(start, end) - held_bytes(span)) <= 64 * (end - start)  # fp32 norms and routers


def test_blocks_that_fit_reserve_the_ends_and_shrink_with_quantization(tiny_models: dict[str, Path]) -> None:
    cfg = Checkpoint(tiny_models["mixtral"]).config
    full, int4 = SpanBytes(cfg, torch.bfloat16), SpanBytes(cfg, torch.bfloat16, "int4")
    assert full.blocks_that_fit(full.span(0, cfg.num_layers)) == cfg.num_layers
    two = full.embedding + full.head + 2 * full.per_block
    assert full.blocks_that_fit(two) == 2 and full.blocks_that_fit(two - 1) == 1
    assert full.blocks_that_fit(full.embedding) == 0
    assert int4.blocks_that_fit(two) > 2
