"""bf16 weights packed for oneDNN (kernels.packed): the same bits as plain weights, faster."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES

from kernels import PackedLinear, PackedTensor, pack_span, packing_available, weight_bytes_per_token
from kernels.packed import pack, packed_linear
from shards import Checkpoint

pytestmark = pytest.mark.skipif(not packing_available(), reason="this CPU's oneDNN has no packed bf16 matmul")


@pytest.mark.parametrize(("n", "k", "m"), [(64, 96, 1), (320, 64, 3), (5632 // 8, 1024, 17), (256, 48, 128)])
def test_packed_linear_gives_f_linears_bits(n: int, k: int, m: int) -> None:
    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(2, m, k, generator=g).bfloat16()
    assert torch.equal(packed_linear(x, pack(w)), F.linear(x, w))
    assert torch.equal(packed_linear(x[:, :, ::1].transpose(0, 1), pack(w)), F.linear(x.transpose(0, 1), w))
    stack = torch.randn(3, n, k, generator=g).bfloat16()
    packed = pack(stack)
    assert packed.shape == stack.shape and packed.nbytes == stack.numel() * 2
    for e in range(3):
        assert torch.equal(packed_linear(x, packed[e]), F.linear(x, stack[e]))


def test_pack_refuses_what_it_cannot_pack() -> None:
    with pytest.raises(ValueError, match="bf16"):
        pack(torch.randn(4, 4))
    with pytest.raises(ValueError, match="bf16"):
        packed_linear(torch.randn(1, 4), pack(torch.randn(4, 4).bfloat16()))


@pytest.mark.parametrize("mode", ["none", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_span_decodes_the_same_bits_as_plain(family: str, mode: str, tiny_models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(tiny_models[family])
    plain = checkpoint.load_span(0, 4, dtype=torch.bfloat16, quantize=mode, pack=False)
    packed = checkpoint.load_span(0, 4, dtype=torch.bfloat16, quantize=mode)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    if mode == "none":
        assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
        experts = [getattr(m, "gate_up", None) for m in packed.modules()]
        assert any(isinstance(e, PackedTensor) for e in experts) == (family != "llama")
    assert packed.dtype == torch.bfloat16 and packed.device.type == "cpu"
    assert weight_bytes_per_token(packed) == weight_bytes_per_token(plain)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    caches = [plain.new_cache(16), packed.new_cache(16)]
    position = 0
    for chunk in (ids[:, :6], ids[:, 6:7], ids[:, 7:8], ids[:, 8:]):
        a, b = (span(chunk, cache, position) for span, cache in zip((plain, packed), caches, strict=True))
        position += chunk.shape[1]
        assert torch.equal(a, b), f"max abs diff {(a.float() - b.float()).abs().max()}"
    batch = [plain.new_cache(4), plain.new_cache(4)], [packed.new_cache(4), packed.new_cache(4)]
    outs = [span.decode(torch.tensor([[3], [5]]), c, [0, 0]) for span, c in zip((plain, packed), batch, strict=True)]
    assert torch.equal(outs[0], outs[1])


def test_fp32_spans_are_not_packed(tiny_models: dict[str, Path]) -> None:
    span = Checkpoint(tiny_models["mixtral"]).load_span(0, 2)
    assert pack_span(span) == 0 and any(isinstance(m, torch.nn.Linear) for m in span.modules())
