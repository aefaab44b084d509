"""Server-to-server push: each hop sends its output straight to the next; the last hop's logits
come to the client. Pushed logits and tokens equal client-relayed ones and transformers'; a
hop killed, told to stop, or hung in pushed mode changes no token (every hop in turn, in one
generation, on a chain of three hops with a spare for each)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_reference

from node.client import Client, ClientConfig
from node.client.stream import ask_info
from node.testing.launch import ServerProcess, local_swarm

pytestmark = pytest.mark.slow  # processes on loopback

SPANS = [(0, 1), (1, 3), (3, 4)]
CHUNKS = [(0, 5), (5, 11), (11, 12), (12, 13), (13, 14)]  # prefill, chunked prefill, decode steps
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
TOKENS = 48
DISTURB_AT = (12, 24, 36)  # after these many tokens, the hop in use at 0, 1, 2 is disturbed
CONFIG = ClientConfig(decode_timeout_s=3.0, retry_backoff_s=0.1)  # a peer silent for 3 s hangs


def _pushed_steps(client: Client, server: ServerProcess) -> int:
    return ask_info(client.channel(server.pinned), server.pinned, 10.0).capacity.pushed_steps


@pytest.fixture(scope="module")
def chain(tiny_models: dict[str, Path]) -> Iterator[list[ServerProcess]]:
    with local_swarm(tiny_models["mixtral"], SPANS) as servers:
        yield servers


@pytest.mark.parametrize("push", [True, False], ids=["pushed", "relayed"])
def test_logits_equal_transformers_pushed_and_relayed(
    push: bool, chain: list[ServerProcess], tiny_models: dict[str, Path]
) -> None:
    ref = load_reference(tiny_models["mixtral"])
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(3))
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=ref.config)
    with torch.no_grad():
        expected = [
            ref(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits[0].numpy() for a, b in CHUNKS
        ]
    with Client([s.pinned for s in chain]) as client:
        before = [_pushed_steps(client, s) for s in chain]
        with client.session(32, push=push) as session:
            assert session.push is push
            for (a, b), want in zip(CHUNKS, expected, strict=True):
                got = session.step(ids[0, a:b].tolist(), last_only=False)
                assert np.abs(got - want).max() == 0.0
        pushed = [_pushed_steps(client, s) - n for s, n in zip(chain, before, strict=True)]
    # with push, hops 1 and 2 got every step from the hop before them, never from the client
    assert pushed == ([0, len(CHUNKS), len(CHUNKS)] if push else [0, 0, 0])


def test_pushed_tokens_equal_relayed_and_transformers(chain: list[ServerProcess], tiny_models: dict[str, Path]) -> None:
    ref = load_reference(tiny_models["mixtral"])
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
    reference = out[0, len(PROMPT) :].tolist()
    runs = {}
    for push in (True, False):
        with Client([s.pinned for s in chain], config=ClientConfig(push=push)) as client:
            runs[push] = list(client.generate(PROMPT, 24, stop_at_eos=False))
    assert runs[True] == runs[False]
    eos = ref.generation_config.eos_token_id
    assert runs[True][: len(reference)] == reference
    assert len(reference) == 24 or reference[-1] in (eos if isinstance(eos, list) else [eos])


def _generate(
    client: Client, servers: list[ServerProcess], push: bool, disturb: Callable[[ServerProcess], None] | None
) -> tuple[list[int], list[str]]:
    """Greedy TOKENS tokens; after each of DISTURB_AT, disturb the server running hop 0, 1, then 2."""
    by_address = {s.pinned: s for s in servers}
    tokens: list[int] = []
    with client.session(len(PROMPT) + TOKENS + 1, push=push) as session:
        logits = session.step(PROMPT)
        while len(tokens) < TOKENS:
            tokens.append(int(np.argmax(logits)))
            if disturb is not None and len(tokens) in DISTURB_AT:
                assert [(h.start, h.end) for h in session.hops] == SPANS
                disturb(by_address[session.hops[DISTURB_AT.index(len(tokens))].address])
            logits = session.step([tokens[-1]])
    return tokens, list(session.recoveries)


def _kill(victim: ServerProcess) -> None:
    victim.process.kill()
    victim.process.wait(10)


def _terminate(victim: ServerProcess) -> None:  # --grace 0: its sessions must move at once
    victim.process.terminate()
    try:
        victim.process.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the server did not stop: " + "\n".join(victim.log[-15:])) from None


STOPPED: list[ServerProcess] = []


def _stop(victim: ServerProcess) -> None:  # stops answering without closing anything
    os.kill(victim.process.pid, signal.SIGSTOP)
    STOPPED.append(victim)


@pytest.mark.parametrize(
    ("disturb", "why"),
    [(_kill, "moved from"), (_terminate, "shutting down"), (_stop, "no answer within")],
    ids=["sigkill", "sigterm", "sigstop"],
)
def test_a_failing_hop_in_pushed_mode_changes_no_token(
    disturb: Callable[[ServerProcess], None], why: str, tiny_models: dict[str, Path]
) -> None:
    spans = [span for span in SPANS for _ in range(2)]  # a spare for every hop
    with local_swarm(tiny_models["mixtral"], spans, extra_args=["--grace", "0"]) as servers:
        try:
            with Client([s.pinned for s in servers], config=CONFIG) as client:
                expected, _ = _generate(client, servers, False, None)
                undisturbed, recoveries = _generate(client, servers, True, None)
                assert undisturbed == expected and not recoveries
                tokens, recoveries = _generate(client, servers, True, disturb)
        finally:
            for victim in STOPPED:
                if victim.process.poll() is None:
                    os.kill(victim.process.pid, signal.SIGCONT)
            STOPPED.clear()
    assert tokens == expected
    assert len(recoveries) == 3 and all(why in note for note in recoveries), recoveries


def test_a_warm_spare_takes_over_with_nothing_to_replay(tiny_models: dict[str, Path]) -> None:
    """With warm spares, a second peer of the hop's layers runs every step beside it; killed, the
    hop is replaced by it at once, and the tokens are those of an undisturbed run."""
    with local_swarm(tiny_models["mixtral"], [(0, 4), (0, 4)]) as servers:
        with Client([s.pinned for s in servers], config=ClientConfig(warm_spares=True)) as client:
            expected = list(client.generate(PROMPT, 32, stop_at_eos=False))
            assert not client.recoveries
            by_address = {s.pinned: s for s in servers}
            tokens: list[int] = []
            with client.session(len(PROMPT) + 33) as session:
                logits = session.step(PROMPT)
                while len(tokens) < 32:
                    tokens.append(int(np.argmax(logits)))
                    if len(tokens) == 10:
                        _kill(by_address[session.hops[0].address])
                    logits = session.step([tokens[-1]])
    assert tokens == expected
    (note,) = client.recoveries
    assert "its warm spare, 0 steps replayed" in note, note
