"""Spot-checks of peers' outputs (node.client.verify): a lying peer, one that answers in time
with the right shapes but perturbed activations (`node.testing.liar`), is caught within the
check budget the test sets, avoided, reported, its layers moved, and the tokens come out as
an honest run's. Real `moemesh serve` processes on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from node.client import Client, ClientConfig, Hop
from node.client.verify import relative_error, tolerance
from node.testing.launch import ServerProcess, named_servers

pytestmark = pytest.mark.slow  # processes on loopback

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
TOKENS = 24
LIAR = ("-m", "node.testing.liar", "1.0")


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path]) -> Iterator[dict[str, ServerProcess]]:
    serve = ("-m", "node")
    specs = {"head": ((0, 2), serve), "tail": ((2, 4), serve), "spare": ((2, 4), serve)}
    specs |= {"liar": ((2, 4), LIAR), "liar_head": ((0, 2), LIAR)}
    with named_servers(tiny_models["mixtral"], specs) as started:
        yield started


def _generate(peers: list[str], route: list[str], config: ClientConfig) -> tuple[list[int], Client]:
    """TOKENS greedy tokens along the peers named by `route` (one per hop: head 0:2, tail 2:4)."""
    client = Client(peers, config=config)
    model_id = client.route()[0]
    hops = [Hop(route[0], 0, 2, route[0]), Hop(route[1], 2, 4, route[1])]
    tokens = list(client.generate(PROMPT, TOKENS, stop_at_eos=False, route=(model_id, hops)))
    client.close()
    return tokens, client


@pytest.fixture(scope="module")
def honest(servers: dict[str, ServerProcess]) -> list[int]:
    head, tail = servers["head"].pinned, servers["tail"].pinned
    tokens, _ = _generate([head, tail], [head, tail], ClientConfig())
    return tokens


def test_without_checks_a_liar_changes_the_tokens(servers: dict[str, ServerProcess], honest: list[int]) -> None:
    """The liar lies enough to matter: unchecked, its tokens are not the honest ones (so the test below can fail)."""
    head, liar = servers["head"].pinned, servers["liar"].pinned
    tokens, client = _generate([head, liar], [head, liar], ClientConfig())
    assert tokens != honest
    assert client.verifications == []


@pytest.mark.parametrize("budget", [1, 3])
def test_a_lying_tail_is_caught_moved_and_the_tokens_are_honest(
    servers: dict[str, ServerProcess], honest: list[int], budget: int
) -> None:
    s = {name: server.pinned for name, server in servers.items()}
    config = ClientConfig(verify_probability=1.0, verify_steps=budget)
    tokens, client = _generate([s["head"], s["liar"], s["tail"], s["spare"]], [s["head"], s["liar"]], config)
    assert tokens == honest
    lied = [v for v in client.verifications if v.verdict == "lied"]
    assert [v.peer for v in lied] == [s["liar"]]
    assert "a third chain agrees with the verifier" in lied[0].note
    assert lied[0].error > lied[0].tolerance
    assert len(client.recoveries) == 1 and s["liar"] in client.recoveries[0]
    moved_to = [v for v in client.verifications if v.peer in (s["tail"], s["spare"])]
    assert moved_to and all(v.verdict == "ok" for v in moved_to)  # the replacement is checked too
    head = [v for v in client.verifications if v.peer == s["head"]]
    assert all(v.verdict == "unchecked" for v in head)  # no other peer serves 0:2 here: said so
    assert 1 <= len(head) <= budget  # the budget: checked steps per generation


def test_a_lying_first_hop_is_caught_with_one_other_peer(servers: dict[str, ServerProcess], honest: list[int]) -> None:
    """The first hop (token ids in, hidden states out) lies; the only other peer of its layers
    disagrees, and with no third to ask the hop is blamed."""
    s = {name: server.pinned for name, server in servers.items()}
    config = ClientConfig(verify_probability=1.0, verify_steps=1)
    tokens, client = _generate([s["liar_head"], s["head"], s["tail"]], [s["liar_head"], s["tail"]], config)
    assert tokens == honest
    lied = [v for v in client.verifications if v.verdict == "lied"]
    assert [v.peer for v in lied] == [s["liar_head"]] and lied[0].note == "no third chain to ask"


def test_honest_peers_pass_every_check(servers: dict[str, ServerProcess], honest: list[int]) -> None:
    s = {name: server.pinned for name, server in servers.items()}
    config = ClientConfig(verify_probability=1.0, verify_steps=TOKENS)
    tokens, client = _generate([s["head"], s["tail"], s["spare"]], [s["head"], s["tail"]], config)
    assert tokens == honest
    verdicts = {v.verdict for v in client.verifications}
    assert verdicts == {"ok", "unchecked"}  # the head has no other peer: unchecked, said so
    ok = [v for v in client.verifications if v.verdict == "ok"]
    assert len(ok) == TOKENS and all(v.error <= 1e-3 for v in ok)  # fp32: rounding only
    assert client.recoveries == []


def test_the_probability_is_per_generation(servers: dict[str, ServerProcess]) -> None:
    s = {name: server.pinned for name, server in servers.items()}
    with Client([s["head"], s["tail"], s["spare"]], config=ClientConfig(verify_probability=0.5)) as client:
        route = client.route()
        checked = 0
        for _ in range(16):
            before = len(client.verifications)
            list(client.generate(PROMPT, 2, stop_at_eos=False, route=route))
            checked += len(client.verifications) > before
    assert 2 <= checked <= 14  # binomial(16, 0.5): outside this 1 time in 240


def test_generate_prints_its_checks(servers: dict[str, ServerProcess]) -> None:
    s = {name: server.pinned for name, server in servers.items()}
    peers = ",".join([s["head"], s["liar"], s["tail"]])
    cmd = [sys.executable, "-m", "node", "generate", "--peers", peers, "--ids", "3,1,4", "--max-new-tokens", "4"]
    result = subprocess.run([*cmd, "--verify", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "spot-checks:" in result.stderr


def test_tolerance_follows_dtypes_and_quantization() -> None:
    fp32, bf16, int4 = ("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int4")
    assert tolerance(fp32, fp32) < tolerance(fp32, bf16) < tolerance(bf16, int4)
    a = np.ones((2, 4), np.float32)
    assert relative_error(a, a) == 0.0
    assert relative_error(a * 1.5, a) == pytest.approx(0.5)
    assert relative_error(a * np.nan, a) == float("inf")
