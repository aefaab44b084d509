"""The compute layer: fast paths agree with references, spans reproduce transformers exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, load_reference

from kernels import (
    CacheError,
    CacheFullError,
    KVCache,
    ShapeError,
    attention_reference,
    attention_sdpa,
    combine,
    dispatch,
    experts_dense,
    experts_forward,
    experts_gathered,
    experts_grouped,
    experts_one_token,
    experts_reference,
    quantize,
    route,
    run_experts,
)
from shards import Checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_grouped_experts_match_reference_bit_for_bit(tokens: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 32, generator=g).to(dtype)
    router = torch.randn(8, 32, generator=g).to(dtype)
    gate_up = torch.randn(8, 2 * 24, 32, generator=g).to(dtype)
    down = torch.randn(8, 32, 24, generator=g).to(dtype)
    weights, ids = route(x, router, 2, normalize=True, weights_in_model_dtype=False)
    ref = experts_reference(x, ids, weights, gate_up, down, F.silu)
    fast = experts_grouped(x, ids, weights, gate_up, down, F.silu)
    assert torch.equal(ref, fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_model_dtype", [False, True])
def test_one_token_experts_match_reference_bit_for_bit(dtype: torch.dtype, in_model_dtype: bool) -> None:
    g = torch.Generator().manual_seed(7)
    gate_up = torch.randn(8, 2 * 24, 32, generator=g).to(dtype)
    down = torch.randn(8, 32, 24, generator=g).to(dtype)
    router = torch.randn(8, 32, generator=g).to(dtype)
    for _ in range(8):
        x = torch.randn(1, 32, generator=g).to(dtype)
        weights, ids = route(x, router, 3, normalize=True, weights_in_model_dtype=in_model_dtype)
        ref = experts_reference(x, ids, weights, gate_up, down, F.silu)
        assert torch.equal(experts_one_token(x, ids, weights, gate_up, down, F.silu), ref)
        assert torch.equal(experts_forward(x, ids, weights, gate_up, down, F.silu), ref)  # the CPU's choice


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_sync_free_expert_paths_agree_with_reference(tokens: int, mode: str) -> None:
    """The accelerator's paths (gathered weights, all experts weighted) computed here on the CPU:
    within fp32 rounding of the reference, quantized experts too."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=g)
    gate_up, down = (
        quantize(torch.randn(8, 2 * 32, 64, generator=g), mode),
        quantize(torch.randn(8, 64, 32, generator=g), mode),
    )
    weights, ids = route(x, torch.randn(8, 64, generator=g), 2, normalize=True, weights_in_model_dtype=False)
    ref = experts_reference(x, ids, weights, gate_up, down, F.silu)
    torch.testing.assert_close(experts_gathered(x, ids, weights, gate_up, down, F.silu), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(experts_dense(x, ids, weights, gate_up, down, F.silu), ref, rtol=1e-4, atol=1e-4)


def test_dispatch_plan_covers_each_choice_once_and_combines_remote_outputs_exactly() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 32, generator=g)
    gate_up = torch.randn(8, 2 * 24, 32, generator=g)
    down = torch.randn(8, 32, 24, generator=g)
    weights, ids = route(x, torch.randn(8, 32, generator=g), 2, normalize=True, weights_in_model_dtype=False)
    plan = dispatch(ids)
    assert list(plan.experts) == sorted(set(ids.flatten().tolist()))
    pairs = sorted(
        (int(t), int(s)) for ts, ss in zip(plan.tokens, plan.slots, strict=True) for t, s in zip(ts, ss, strict=True)
    )
    assert pairs == sorted((t, s) for t in range(9) for s in range(2))
    for e, ts, ss in zip(plan.experts, plan.tokens, plan.slots, strict=True):
        assert all(int(ids[t, s]) == e for t, s in zip(ts, ss, strict=True))
    # experts run "elsewhere": only the rows each expert needs travel, the weights stay there
    remote = [
        run_experts(x[ts], plan.__class__((e,), (torch.arange(len(ts)),), (ss,)), gate_up, down, F.silu)[0]
        for e, ts, ss in zip(plan.experts, plan.tokens, plan.slots, strict=True)
    ]
    out = combine(remote, plan, weights, torch.zeros_like(x))
    assert torch.equal(out, experts_reference(x, ids, weights, gate_up, down, F.silu))


@pytest.mark.parametrize(("q_len", "past"), [(1, 0), (1, 9), (6, 0), (4, 7)])
def test_sdpa_attention_matches_eager_reference(q_len: int, past: int) -> None:
    g = torch.Generator().manual_seed(q_len * 31 + past)
    q = torch.randn(1, 4, q_len, 16, generator=g)
    k = torch.randn(1, 2, past + q_len, 16, generator=g)
    v = torch.randn(1, 2, past + q_len, 16, generator=g)
    torch.testing.assert_close(attention_sdpa(q, k, v, 0.25), attention_reference(q, k, v, 0.25))


def test_cache_refuses_gaps_and_overflow() -> None:
    cache = KVCache(1, 2, 8, max_length=4, dtype=torch.float32)
    with pytest.raises(CacheError, match="position 1"):
        cache.check_step(1, 1)  # nothing cached yet: position must be 0
    with pytest.raises(CacheFullError, match="max length 4"):
        cache.check_step(0, 5)
    cache.check_step(0, 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_spans_reproduce_transformers_exactly_with_chunked_prefill(family: str, tiny_models: dict[str, Path]) -> None:
    from transformers.cache_utils import DynamicCache

    folder = tiny_models[family]
    ref = load_reference(folder)
    checkpoint = Checkpoint(folder)
    spans = [checkpoint.load_span(0, 1), checkpoint.load_span(1, 3), checkpoint.load_span(3, 4)]
    caches = [s.new_cache(64) for s in spans]
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(7))
    ref_cache = DynamicCache(config=ref.config)
    position = 0
    for chunk in (ids[:, :5], ids[:, 5:11], ids[:, 11:12], ids[:, 12:13], ids[:, 13:]):  # prefill, chunk, decode
        with torch.no_grad():
            expected = ref(input_ids=chunk, past_key_values=ref_cache, use_cache=True).logits
        h = chunk
        for span, cache in zip(spans, caches, strict=True):
            h = span(h, cache, position)
        position += chunk.shape[1]
        assert torch.equal(h, expected), f"max abs diff {(h - expected).abs().max()}"


def test_span_rejects_wrong_inputs(tiny_models: dict[str, Path]) -> None:
    span = Checkpoint(tiny_models["mixtral"]).load_span(1, 2)
    cache = span.new_cache(8)
    with pytest.raises(ShapeError, match="hidden states"):
        span(torch.zeros(1, 2, 63), cache, 0)
    with pytest.raises(ShapeError, match="hidden states"):
        span(torch.zeros(1, 2), cache, 0)
    first = Checkpoint(tiny_models["mixtral"]).load_span(0, 1)
    with pytest.raises(ShapeError, match="token ids must be in"):
        first(torch.tensor([[256]]), first.new_cache(8), 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_decode_of_several_sessions_matches_each_session_alone(
    family: str, tiny_models: dict[str, Path]
) -> None:
    checkpoint = Checkpoint(tiny_models[family])
    head, tail = checkpoint.load_span(0, 2), checkpoint.load_span(2, 4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, n), generator=g) for n in (3, 7, 1, 12)]

    def prefill(ids: torch.Tensor) -> tuple[list[KVCache], torch.Tensor]:
        caches = [head.new_cache(32), tail.new_cache(32)]
        logits = tail(head(ids, caches[0], 0), caches[1], 0, last_only=True)
        return caches, logits[:, -1].argmax(-1, keepdim=True)

    alone = [prefill(p) for p in prompts]
    batched = [prefill(p) for p in prompts]
    for _ in range(4):
        expected = []
        for caches, token in alone:
            position = caches[0].length
            expected.append(tail(head(token, caches[0], position), caches[1], position)[:, -1])
        tokens = torch.cat([token for _, token in batched])  # [B, 1]
        positions = [caches[0].length for caches, _ in batched]
        hidden = head.decode(tokens, [c[0] for c, _ in batched], positions)
        logits = tail.decode(hidden, [c[1] for c, _ in batched], positions)[:, -1]  # [B, V]
        torch.testing.assert_close(logits, torch.cat(expected), rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), torch.cat(expected).argmax(-1))
        alone = [(c, e.argmax(-1, keepdim=True)) for (c, _), e in zip(alone, expected, strict=True)]
        batched = [(c, logits[i : i + 1].argmax(-1, keepdim=True)) for i, (c, _) in enumerate(batched)]
    assert [c[1].length for c, _ in batched] == [c[1].length for c, _ in alone] == [len(p[0]) + 4 for p in prompts]
    with pytest.raises(ShapeError, match="one token per session"):
        head.decode(torch.zeros(2, 2, dtype=torch.int64), [c[0] for c, _ in batched[:2]], [0, 0])
