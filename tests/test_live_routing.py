"""Live routing: a peer slowed down mid-generation (SIGSTOP bursts: stopped most of the time,
running a moment in between) loses its traffic: the open session moves off it with no token
changed, and a new session of the client that measured it goes to its replica."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from node.client import Client, ClientConfig
from node.client.session import InferenceSession
from node.testing.launch import ServerProcess, local_swarm

pytestmark = pytest.mark.slow  # processes on loopback

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
TOKENS = 40
SLOW_FROM = 14  # tokens before the bursts start: the session knows every hop's normal pace by then
CONFIG = ClientConfig(decode_timeout_s=5.0, retry_backoff_s=0.1)


@contextlib.contextmanager
def bursts(victim: ServerProcess, stopped_s: float = 0.3, running_s: float = 0.02) -> Iterator[None]:
    """Stop the process most of the time (never long enough to look dead) while inside."""
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            os.kill(victim.process.pid, signal.SIGSTOP)
            done.wait(stopped_s)
            os.kill(victim.process.pid, signal.SIGCONT)
            done.wait(running_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
        os.kill(victim.process.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def swarm(tiny_models: dict[str, Path]) -> Iterator[list[ServerProcess]]:
    with local_swarm(tiny_models["mixtral"], [(0, 2), (2, 4), (2, 4)]) as servers:
        yield servers


def _decode(session: InferenceSession, tokens: list[int], until: int) -> None:
    logits = session.step(PROMPT) if not tokens else session.step([tokens[-1]])
    while len(tokens) < until:
        tokens.append(int(np.argmax(logits)))
        if len(tokens) < until:
            logits = session.step([tokens[-1]])


def test_an_open_session_moves_off_a_peer_that_became_slow(swarm: list[ServerProcess]) -> None:
    by_address = {s.pinned: s for s in swarm}
    with Client([s.pinned for s in swarm], config=CONFIG) as client:
        expected = list(client.generate(PROMPT, TOKENS, stop_at_eos=False))
        assert not client.recoveries
        tokens: list[int] = []
        with client.session(len(PROMPT) + TOKENS + 1) as session:
            _decode(session, tokens, SLOW_FROM)
            victim = by_address[session.hops[1].address]
            with bursts(victim):
                _decode(session, tokens, TOKENS)
            assert session.hops[1].address != victim.pinned
    assert tokens == expected
    (note,) = client.recoveries
    assert "slower than at the session's start" in note and f"moved from {victim.pinned}" in note, note


def test_a_new_session_goes_around_a_peer_measured_slow(swarm: list[ServerProcess]) -> None:
    by_address = {s.pinned: s for s in swarm}
    config = ClientConfig(decode_timeout_s=5.0, slow_factor=0)  # sessions stay: only routing may go around it
    with Client([s.pinned for s in swarm], config=config) as client:
        tokens: list[int] = []
        with client.session(len(PROMPT) + TOKENS + 1) as session:
            _decode(session, tokens, SLOW_FROM)
            victim = by_address[session.hops[1].address]
            assert client.slowdown(victim.pinned) < 4  # about its normal pace so far (a shared machine is noisy)
            with bursts(victim):
                _decode(session, tokens, TOKENS)
            assert session.hops[1].address == victim.pinned and not client.recoveries
        assert client.slowdown(victim.pinned) > 4
        _, hops = client.route()  # the bursts are over: its round trip is fine again, its pace is not forgotten
        assert hops[1].address != victim.pinned
