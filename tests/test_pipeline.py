"""Pipelines of serving processes on loopback reproduce single-process transformers exactly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, load_reference

from node.client import Client
from node.testing.launch import ServerProcess, local_swarm

SPANS = {2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}
CHUNKS = [(0, 5), (5, 11), (11, 12), (12, 13), (13, 14)]  # prefill, chunked prefill, decode steps


def _reference_logits(ref: object, ids: torch.Tensor) -> list[np.ndarray]:
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=ref.config)  # type: ignore[attr-defined]
    out = []
    with torch.no_grad():
        for a, b in CHUNKS:
            out.append(ref(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits[0].numpy())  # type: ignore[operator]
    return out


def _reference_tokens(ref: object, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])  # an explicit mask: token 0 is no padding here
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)  # type: ignore[attr-defined]
    return out[0, len(prompt) :].tolist()


def _assert_same_tokens(ours: list[int], reference: list[int], eos: set[int]) -> None:
    # transformers stops at its EOS; the client here runs without a tokenizer, so it does not.
    assert ours[: len(reference)] == reference
    assert len(reference) == len(ours) or reference[-1] in eos


@pytest.fixture(
    scope="module", params=[(f, p) for f in FAMILIES for p in (2, 3)], ids=lambda fp: f"{fp[0]}-{fp[1]}span"
)
def pipeline(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Iterator[tuple[str, list[ServerProcess]]]:
    family, parts = request.param
    with local_swarm(tiny_models[family], SPANS[parts]) as servers:
        yield family, servers


def test_logits_and_greedy_tokens_match_transformers(
    pipeline: tuple[str, list[ServerProcess]], tiny_models: dict[str, Path]
) -> None:
    family, servers = pipeline
    ref = load_reference(tiny_models[family])
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(3))
    expected = _reference_logits(ref, ids)
    with Client([s.pinned for s in servers]) as client:
        _, hops = client.route()
        assert [(h.start, h.end) for h in hops] == [s.layers for s in servers]
        with client.session(32) as session:
            for (a, b), want in zip(CHUNKS, expected, strict=True):
                got = session.step(ids[0, a:b].tolist(), last_only=False)
                assert got.shape == want.shape
                assert np.abs(got - want).max() == 0.0
        prompt = ids[0, :9].tolist()
        ours = list(client.generate(prompt, 16, stop_at_eos=False))
    eos = ref.generation_config.eos_token_id
    _assert_same_tokens(ours, _reference_tokens(ref, prompt, 16), set(eos if isinstance(eos, list) else [eos]))


def test_concurrent_sessions_do_not_disturb_each_other(
    pipeline: tuple[str, list[ServerProcess]], tiny_models: dict[str, Path]
) -> None:
    family, servers = pipeline
    ref = load_reference(tiny_models[family])
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (1, 14), generator=gen) for _ in range(2)]
    expected = [_reference_logits(ref, p) for p in prompts]
    with Client([s.pinned for s in servers]) as client:
        # Interleaved steps of two sessions on the same servers.
        with client.session(32) as one, client.session(32) as two:
            for i, (a, b) in enumerate(CHUNKS):
                for session, p, want in ((one, prompts[0], expected[0]), (two, prompts[1], expected[1])):
                    assert np.array_equal(session.step(p[0, a:b].tolist(), last_only=False), want[i])
        # Truly concurrent generations from threads.
        results: dict[int, list[int]] = {}

        def run(k: int) -> None:
            results[k] = list(client.generate(prompts[k][0].tolist(), 10, stop_at_eos=False))

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    eos = ref.generation_config.eos_token_id
    for k in range(2):
        _assert_same_tokens(
            results[k], _reference_tokens(ref, prompts[k][0].tolist(), 10), set(eos if isinstance(eos, list) else [eos])
        )
