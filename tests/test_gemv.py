"""fp32 decode matmuls split over the CPU's threads (kernels.gemv): F.linear's bits, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import SplitLinear, gemv, split_available, split_span
from kernels.gemv import MIN_SPLIT_ELEMENTS, applies, gemv_split, split_exact
from shards import Checkpoint

INEXACT = "this CPU's BLAS gives a split gemv other bits than F.linear (split_exact): the split stays off here"


@pytest.mark.parametrize(("n", "k"), [(1024, 512), (1376, 512), (4099, 256), (32000, 64), (777, 1000)])
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_split_gemv_gives_f_linears_bits(n: int, k: int, parts: int) -> None:
    if not split_exact():
        pytest.skip(INEXACT)
    g = torch.Generator().manual_seed(n * k + parts)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(1, 1, k, generator=g), torch.randn(n, generator=g)
    with torch.inference_mode():
        got = gemv_split(x, w, parts=parts)
        assert got.shape == (1, 1, n)
        assert torch.equal(got, F.linear(x, w))
        assert torch.equal(gemv_split(x, w, b, parts=parts), F.linear(x, w, b))
    assert torch.equal(gemv_split(x[0], w, parts=parts), F.linear(x[0], w))  # outside inference mode too


def test_split_applies_only_to_one_row_fp32_cpu_weights_big_enough() -> None:
    w = torch.randn(MIN_SPLIT_ELEMENTS // 256, 256)
    with torch.no_grad():
        assert applies(torch.randn(1, 256), w) and applies(torch.randn(1, 1, 256), w)
        assert not applies(torch.randn(2, 256), w)  # a batch of rows is a gemm: F.linear
        assert not applies(torch.randn(1, 256).bfloat16(), w.bfloat16())
        assert not applies(torch.randn(1, 128), torch.randn(16, 128))  # too small to gain
    assert not applies(torch.randn(1, 256), w.requires_grad_())  # autograd: F.linear


def test_split_linear_is_an_nn_linear_with_the_same_state() -> None:
    lin = torch.nn.Linear(256, 4096)
    split = SplitLinear(256, 4096, device="meta")
    split.weight, split.bias = lin.weight, lin.bias
    assert isinstance(split, torch.nn.Linear) and split.state_dict().keys() == lin.state_dict().keys()
    with torch.inference_mode():
        for x in (torch.randn(1, 256), torch.randn(5, 256), torch.randn(2, 1, 256)):
            assert torch.equal(split(x), lin(x))


def test_probe_answers_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(split_available(), bool)
    assert split_exact() or not split_available()  # never a split with other bits
    if not split_exact():  # and then no span takes it
        lin = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
        assert split_span(lin) == 0 and type(lin[0]) is torch.nn.Linear
    split_available.cache_clear()
    monkeypatch.setenv("MOEMESH_NO_SPLIT", "1")
    try:
        assert split_available() is False
    finally:
        split_available.cache_clear()


@pytest.mark.parametrize("bias", [False, True])
def test_split_span_decodes_transformers_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    """A Llama whose MLP and head are big enough to split decodes the bits transformers' does."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    if not split_exact():
        pytest.skip(INEXACT)
    monkeypatch.setattr(gemv, "split_available", lambda: True)  # split here whatever the speed probe said

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4100, attention_bias=bias, mlp_bias=bias, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(tmp_path).eval()  # BLAS's bits depend on alignment: both load the file
    span = Checkpoint(tmp_path).load_span(0, 2, pack=False)
    assert split_span(span, probe=False) == 7  # per layer gate, up, down (1024 x 512, 512 x 1024); the head
    assert isinstance(span.lm_head, SplitLinear)
    cache, ref_cache = span.new_cache(32), DynamicCache(config=cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    position = 0
    with torch.inference_mode():
        for chunk in (ids[:, :5], *ids[:, 5:].split(1, dim=1)):  # a prefill, then one token at a time
            expected = ref(input_ids=chunk, past_key_values=ref_cache, use_cache=True).logits
            got = span(chunk, cache, position)
            position += chunk.shape[1]
            assert torch.equal(got, expected), f"max abs diff {(got - expected).abs().max()}"
