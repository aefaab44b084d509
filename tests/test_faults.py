"""Generation that survives peers failing: a swarm of daemons with redundant peers for the
layers 2:4; in the middle of a 64-token generation the peer running them is killed, told to
stop, or hangs, and the client finishes with exactly the tokens of an undisturbed run."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from node.client import Client, ClientConfig, Hop, Sampling
from node.testing.launch import DaemonProcess, local_swarm, start_daemon

pytestmark = pytest.mark.slow  # processes on loopback: minutes (`make test-quick` skips)

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
TOKENS = 64
DISTURB_AT = 24  # tokens produced before the peer fails
GREEDY = Sampling()
SAMPLED = Sampling(temperature=0.8, top_p=0.9, seed=7)
TAILS = ("t1", "t2", "t3", "t4")
CONFIG = ClientConfig(decode_timeout_s=3.0, retry_backoff_s=0.1)  # a peer silent for 3 s hangs


@pytest.fixture(scope="module")
def swarm(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DaemonProcess]]:
    keys = tmp_path_factory.mktemp("keys")
    model = str(tiny_models["mixtral"])
    common = ["--model", model, "--ttl", "60", "--grace", "0"]
    daemons: dict[str, DaemonProcess] = {}
    try:
        daemons["head"] = start_daemon([*common, "--layers", "0:2", "--identity", str(keys / "head.key")])
        boot = daemons["head"].multiaddr

        def tail(name: str) -> DaemonProcess:
            return start_daemon([*common, "--layers", "2:4", "--bootstrap", boot, "--identity", str(keys / name)])

        with ThreadPoolExecutor(len(TAILS)) as pool:
            futures = {name: pool.submit(tail, name) for name in TAILS}
            try:
                for name, future in futures.items():
                    daemons[name] = future.result()
            finally:  # keep every one that started, so that it is stopped below
                for name, future in futures.items():
                    if name not in daemons and future.exception() is None:
                        daemons[name] = future.result()
        yield daemons
    finally:
        for d in daemons.values():
            if d.process.poll() is None:
                os.kill(d.process.pid, signal.SIGCONT)  # a test that failed may have left one stopped
            d.terminate()
        for d in daemons.values():
            d.stop()


def _generate(
    swarm: dict[str, DaemonProcess], sampling: Sampling, disturb: Callable[[DaemonProcess], None] | None = None
) -> tuple[list[int], list[str]]:
    """Generate TOKENS tokens; after DISTURB_AT of them, `disturb` the peer running layers 2:4."""
    with Client(bootstrap=[swarm["head"].multiaddr], config=CONFIG) as client:
        model_id, hops = client.route()
        assert [(h.start, h.end) for h in hops] == [(0, 2), (2, 4)]
        victim = next(d for d in swarm.values() if d.pinned == hops[1].address)  # host:port#fingerprint
        tokens = []
        for i, token in enumerate(
            client.generate(PROMPT, TOKENS, sampling=sampling, stop_at_eos=False, route=(model_id, hops))
        ):
            tokens.append(token)
            if disturb is not None and i + 1 == DISTURB_AT:
                disturb(victim)
        return tokens, client.recoveries


@pytest.fixture(scope="module")
def undisturbed(swarm: dict[str, DaemonProcess]) -> dict[Sampling, list[int]]:
    runs = {}
    for sampling in (GREEDY, SAMPLED):
        tokens, recoveries = _generate(swarm, sampling)
        assert len(tokens) == TOKENS and not recoveries
        runs[sampling] = tokens
    assert runs[GREEDY] != runs[SAMPLED]
    return runs


def test_a_peer_that_hangs_is_replaced(swarm: dict[str, DaemonProcess], undisturbed: dict[Sampling, list[int]]) -> None:
    stopped: list[DaemonProcess] = []

    def hang(victim: DaemonProcess) -> None:  # stops answering without closing anything
        os.kill(victim.process.pid, signal.SIGSTOP)
        stopped.append(victim)

    try:
        tokens, recoveries = _generate(swarm, GREEDY, hang)
    finally:
        for victim in stopped:
            os.kill(victim.process.pid, signal.SIGCONT)
    assert tokens == undisturbed[GREEDY]
    assert len(recoveries) == 1 and "no answer within" in recoveries[0], recoveries
    assert f"{DISTURB_AT} steps replayed" in recoveries[0]  # the prompt chunk and 23 decode steps


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_sigkill_of_a_peer_mid_generation_changes_no_token(
    sampling: Sampling, swarm: dict[str, DaemonProcess], undisturbed: dict[Sampling, list[int]]
) -> None:
    def kill(victim: DaemonProcess) -> None:
        victim.kill()
        victim.process.wait(10)

    tokens, recoveries = _generate(swarm, sampling, kill)
    assert tokens == undisturbed[sampling]
    assert len(recoveries) == 1 and "layers 2:4 moved" in recoveries[0], recoveries


def test_sigterm_tells_the_session_to_move_and_no_token_changes(
    swarm: dict[str, DaemonProcess], undisturbed: dict[Sampling, list[int]]
) -> None:
    def terminate(victim: DaemonProcess) -> None:  # --grace 0: its sessions must move at once
        victim.terminate()
        try:
            victim.process.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the daemon did not stop: " + "\n".join(victim.log[-15:])) from None
        assert any("draining 1 open sessions" in line for line in victim.log), victim.log[-5:]

    tokens, recoveries = _generate(swarm, GREEDY, terminate)
    assert tokens == undisturbed[GREEDY]
    assert len(recoveries) == 1 and "shutting down" in recoveries[0], recoveries


def test_lost_layers_move_to_a_chain_of_smaller_peers(tiny_models: dict[str, Path]) -> None:
    """The one peer holding every layer dies; two peers holding halves take over, each rebuilt
    from the replayed steps (the second from the first's replayed outputs)."""
    with local_swarm(tiny_models["qwen3_moe"], [(0, 4), (0, 2), (2, 4)]) as (whole, head, tail):
        with Client([s.pinned for s in (whole, head, tail)], config=CONFIG) as client:
            model_id, _ = client.route()
            on_whole = (model_id, [Hop(whole.address, 0, 4, whole.address)])
            expected = list(client.generate(PROMPT, 32, stop_at_eos=False, route=on_whole))
            tokens = []
            for token in client.generate(PROMPT, 32, stop_at_eos=False, route=on_whole):
                tokens.append(token)
                if len(tokens) == 10:
                    whole.process.kill()
                    whole.process.wait(10)
            assert tokens == expected
            (note,) = client.recoveries
            assert f"to {head.pinned} [0:2], {tail.pinned} [2:4], 10 steps replayed" in note, note
