"""Servers that batch many sessions: concurrent clients get exactly their tokens alone; a
client that goes away frees its session; a full peer is skipped; SIGTERM lets sessions finish."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for

from node.client import Client, ClientConfig, Hop
from node.errors import RouteError
from node.testing.launch import local_swarm, start_server_process

pytestmark = pytest.mark.slow  # processes on loopback: minutes (`make test-quick` skips)

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 16
TOKENS = 12


def _prompt(i: int) -> list[int]:
    rng = np.random.default_rng(i)
    return [int(t) for t in rng.integers(0, 256, size=3 + i % 7)]


def _alone(client: Client, prompt: list[int]) -> tuple[list[int], float]:
    """Greedy tokens of one session, and the smallest gap between the two best logits."""
    tokens: list[int] = []
    margin = float("inf")
    with client.session(len(prompt) + TOKENS) as session:
        logits = session.step(prompt)
        for _ in range(TOKENS):
            second, first = np.partition(logits, -2)[-2:]
            margin = min(margin, float(first - second))
            tokens.append(int(np.argmax(logits)))
            logits = session.step(tokens[-1:])
    return tokens, margin


def test_sixteen_concurrent_clients_get_exactly_their_tokens_alone(tiny_models: dict[str, Path]) -> None:
    with local_swarm(tiny_models["qwen3_moe"], [(0, 2), (2, 4)]) as servers:
        addresses = [s.pinned for s in servers]
        with Client(addresses) as client:
            alone = [_alone(client, _prompt(i)) for i in range(CLIENTS)]
        # Batched rows differ from a lone row by float rounding (~1e-6); the comparison is
        # meaningful only when no greedy choice is that close to a tie.
        assert min(margin for _, margin in alone) > 1e-4
        start = threading.Barrier(CLIENTS)

        def one(i: int) -> list[int]:
            with Client(addresses) as client:
                route = client.route()
                start.wait()
                return list(client.generate(_prompt(i), TOKENS, stop_at_eos=False, route=route))

        with ThreadPoolExecutor(CLIENTS) as pool:
            together = list(pool.map(one, range(CLIENTS)))
        assert together == [tokens for tokens, _ in alone]
        with Client(addresses) as client:
            infos = [client.info(a) for a in addresses]
        assert all(i.batched_steps > 0 for i in infos), infos  # the steps really ran batched
        assert all(i.active_sessions == 0 for i in infos), infos


def _active(address: str) -> int:
    with Client([address]) as client:
        return client.info(address).active_sessions


def test_a_client_that_goes_away_frees_its_session(tiny_models: dict[str, Path]) -> None:
    with local_swarm(tiny_models["mixtral"], [(0, 4)], extra_args=["--idle-timeout", "2"]) as (server,):
        config = ClientConfig(max_retries=2, retry_backoff_s=0.1)
        # closed without closing its session (the channel goes: the server sees a cancel)
        client = Client([server.pinned])
        session = client.session(32)
        session.step([1, 2, 3])
        assert _active(server.pinned) == 1
        client.close()
        wait_for(lambda: _active(server.pinned) == 0, 10, "freeing a cancelled session", every=0.1)

        # a client process killed mid-session
        script = (
            "import sys, time\n"
            "from node.client import Client\n"
            f"s = Client([{server.pinned!r}]).session(32)\n"
            "s.step([1, 2, 3]); print('open', flush=True); time.sleep(60)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
            assert _active(server.pinned) == 1
            proc.kill()
        finally:
            proc.kill()
            proc.wait(10)
        wait_for(lambda: _active(server.pinned) == 0, 10, "freeing a killed client's session", every=0.1)

        # a client that keeps its stream open but sends nothing: closed after --idle-timeout
        with Client([server.pinned], config=config) as client:
            session = client.session(32)
            session.step([1, 2, 3])
            assert _active(server.pinned) == 1
            wait_for(lambda: _active(server.pinned) == 0, 10, "closing an idle session", every=0.1)
            with pytest.raises(RouteError, match="no request for 2 s.* no known peer serves layers 0:4"):
                session.step([4])  # its only peer: nowhere to move the session


def test_a_peer_without_room_is_skipped_for_another(tiny_models: dict[str, Path]) -> None:
    model = tiny_models["mixtral"]
    # one session at most, and KV memory for 100 tokens of this model (1 KiB each)
    small = start_server_process(model, (0, 4), extra_args=["--max-sessions", "1", "--kv-budget-mb", "0.1"])
    try:
        with local_swarm(model, [(0, 4)]) as (spare,):
            with Client([small.pinned, spare.address]) as client:
                model_id, _ = client.route()
                on_small = (model_id, [Hop(small.pinned, 0, 4, small.pinned)])
                with client.session(200, route=on_small) as session:  # does not fit its KV budget
                    assert [h.address for h in session.hops] == [spare.address]
                assert "KV cache budget exhausted" in client.recoveries[-1]
                expected = list(client.generate([1, 2, 3], 6, stop_at_eos=False, route=on_small))
                with client.session(64, route=on_small):  # takes the small peer's only slot
                    tokens = list(client.generate([1, 2, 3], 6, stop_at_eos=False, route=on_small))
                assert tokens == expected
                assert "server is full" in client.recoveries[-1] and spare.address in client.recoveries[-1]
    finally:
        small.stop()


def test_sigterm_lets_open_sessions_finish_and_refuses_new_ones(tiny_models: dict[str, Path]) -> None:
    with local_swarm(tiny_models["mixtral"], [(0, 4)], extra_args=["--grace", "60"]) as (server,):
        with Client([server.pinned], config=ClientConfig(max_retries=1)) as client:
            route = client.route()
            expected = list(client.generate([5, 6, 7], 8, stop_at_eos=False, route=route))
            tokens = []
            generation = client.generate([5, 6, 7], 8, stop_at_eos=False, route=route)
            tokens.append(next(generation))
            server.process.terminate()
            wait_for(lambda: client.info(server.pinned).draining, 10, "draining", every=0.1)
            with pytest.raises(RouteError, match="shutting down: open the session on another peer"):
                client.session(16, route=route)  # refused, and there is no other peer
            tokens.extend(generation)  # the open session finishes on the draining server
            assert tokens == expected and not client.recoveries
            server.process.wait(20)  # and it exits as soon as that session closed, long before 60 s
