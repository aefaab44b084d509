"""Eight daemons on loopback share one swarm state: the same member set everywhere soon after
a change, a killed daemon reaped after its lease, `--layers auto` covering the model and then
adding capacity where the swarm is weakest, and a hole refilled by exactly one mover."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import moemesh_status, wait_for

from crdt import Member
from node.client import Client, Hop
from node.client.stream import HopStream
from node.mesh.reader import SwarmReader
from node.plan.peers import peers_from_members
from node.plan.placement import block_capacity, choose_span, mover_rank
from node.testing.launch import DaemonProcess, start_daemon
from protocol import make_tensor

pytestmark = pytest.mark.slow  # processes on loopback: minutes (`make test-quick` skips)

LEASE = "5"
SYNC = ["--lease", LEASE, "--sync-interval", "0.5"]
CONVERGE_S = 30.0  # generous: two cores shared by eight daemons and other test runs


class Views:
    """Reads each daemon's replica over the sync protocol, through one client."""

    def __init__(self, reader: SwarmReader, daemons: dict[str, DaemonProcess]) -> None:
        self.reader = reader
        self.daemons = daemons

    def of(self, name: str) -> dict[str, Member]:
        state = self.reader.swarm_state(self.daemons[name].multiaddr)
        assert state is not None, f"{name} did not share its swarm state"
        return state.members()

    def member_sets(self, names: list[str]) -> dict[str, frozenset[str]]:
        return {n: frozenset(self.of(n)) for n in names}

    def span(self, name: str, via: str = "boot") -> tuple[int, int, str]:
        m = self.of(via)[self.daemons[name].peer_id]
        return m.start, m.end, m.state


@pytest.fixture(scope="module")
def swarm(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Views]:
    keys = tmp_path_factory.mktemp("keys")
    daemons: dict[str, DaemonProcess] = {}
    try:
        daemons["boot"] = start_daemon(["--identity", str(keys / "boot.key"), *SYNC])
        boot = daemons["boot"].multiaddr
        with SwarmReader([boot]) as reader:
            yield Views(reader, daemons)
    finally:
        for d in daemons.values():
            d.terminate()
        for d in daemons.values():
            d.stop()


class _HeldSession:
    """A raw session on one daemon's span (its first layer takes ids or hidden states)."""

    def __init__(self, address: str, model_id: str, start: int, end: int) -> None:
        self.client = Client([address])
        hop = Hop(address, start, end, address)
        self.stream = HopStream(self.client.channel(address), hop, model_id, 64, self.client.config)
        self.first = start == 0
        self.position = 0
        self.steps(1)

    def steps(self, n: int) -> None:
        for _ in range(n):
            if self.first:
                tensor = make_tensor("int64", (1, 1), np.array([7], dtype="<i8").tobytes())
            else:
                tensor = make_tensor("float32", (1, 1, 64), np.zeros(64, dtype="<f4").tobytes())
            self.stream.step(tensor, self.position, True)
            self.position += 1

    def close(self) -> None:
        self.stream.close()
        self.client.close()


def _start(views: Views, name: str, args: list[str], keys: Path) -> None:
    boot = views.daemons["boot"].multiaddr
    views.daemons[name] = start_daemon([*args, "--bootstrap", boot, "--identity", str(keys / f"{name}.key"), *SYNC])


def test_eight_daemons_share_the_state_place_themselves_and_reap(
    swarm: Views, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = str(tiny_models["mixtral"])
    auto = ["--model", model, "--layers", "auto", "--grace", "5"]

    # Three daemons with --layers auto on an empty swarm cover every layer.
    for name, max_layers in (("a0", "2"), ("a1", "2"), ("a2", "1")):
        _start(swarm, name, [*auto, "--max-layers", max_layers], tmp_path)
        wait_for(lambda n=name: swarm.daemons[n].peer_id in swarm.of("boot"), CONVERGE_S, f"{name} in boot's view")
    members = swarm.of("boot")
    (model_id,) = {m.model_id for m in members.values() if m.model_id}
    servers = peers_from_members(members, model_id, time.time())
    assert len(servers) == 3
    before = block_capacity(servers, 4)
    assert min(before) > 0, f"three auto daemons left a block uncovered: {before}"

    # A fourth adds capacity where the swarm is weakest (computed here from the view it joined).
    windows = {s: sorted(before[s : s + 2]) for s in range(3)}
    weakest = {s for s, w in windows.items() if w == min(windows.values())}
    _start(swarm, "a3", [*auto, "--max-layers", "2"], tmp_path)
    wait_for(lambda: swarm.daemons["a3"].peer_id in swarm.of("boot"), CONVERGE_S, "a3 in boot's view")
    start, end, _ = swarm.span("a3")
    assert end - start == 2 and start in weakest, (start, before)
    assert (start, end) == choose_span(before, 2)

    # Eight daemons in all; after the last joins, every one holds the same member set.
    _start(swarm, "b0", ["--model", model, "--layers", "0:4"], tmp_path)
    _start(swarm, "b1", [], tmp_path)
    _start(swarm, "b2", [], tmp_path)
    names = list(swarm.daemons)
    assert len(names) == 8
    everyone = frozenset(d.peer_id for d in swarm.daemons.values())
    took = wait_for(
        lambda: set(swarm.member_sets(names).values()) == {everyone}, CONVERGE_S, "all eight views agreeing"
    )
    print(f"eight daemons agreed on the member set {took:.1f} s after the last one joined")
    loads = {n: swarm.reader.swarm_state(swarm.daemons[n].multiaddr) for n in ("boot", "a3")}
    assert all(s is not None and swarm.daemons["b0"].peer_id in s.loads() for s in loads.values())

    # A killed daemon (no goodbye) is reaped everywhere once its lease ends.
    swarm.daemons["b0"].kill()
    killed = swarm.daemons["b0"].peer_id
    alive = [n for n in names if n != "b0"]
    took = wait_for(
        lambda: all(killed not in ms for ms in swarm.member_sets(alive).values()),
        float(LEASE) + CONVERGE_S,
        "the killed daemon's record being reaped everywhere",
    )
    print(f"the killed daemon was reaped everywhere {took:.1f} s after SIGKILL (lease {LEASE} s)")

    # Killing the only server of the last block leaves a hole; exactly one auto daemon moves to fill it.
    spans = {n: swarm.span(n)[:2] for n in ("a0", "a1", "a2", "a3")}
    last = [n for n, (s, e) in spans.items() if e == 4]
    victim = last[0]
    movers = [n for n in spans if n != victim]
    left = [
        s
        for s in peers_from_members(swarm.of("boot"), model_id, time.time())
        if s.peer_id != swarm.daemons[victim].peer_id
    ]
    ranks = {n: mover_rank(left, swarm.daemons[n].peer_id, 4) for n in movers}
    first = [n for n, rank in ranks.items() if rank == 0]  # what every daemon computes from the same view
    assert len(first) == 1, ranks
    # A session open on the mover when it decides to move is served until it closes.
    mover = swarm.daemons[first[0]]
    held = _HeldSession(mover.grpc_address, model_id, *spans[first[0]])
    swarm.daemons[victim].kill()
    wait_for(lambda: any("moving to layers" in line for line in mover.log), float(LEASE) + 2 * CONVERGE_S, "a move")
    assert any("draining 1 open sessions" in line for line in mover.log), mover.log[-10:]
    held.steps(3)  # still answered while the mover drains
    assert not any("moved to layers" in line for line in mover.log)  # it waits for the open session
    held.close()

    def covered_again() -> bool:
        view = swarm.of("boot")
        if swarm.daemons[victim].peer_id in view:
            return False
        capacity = block_capacity(peers_from_members(view, model_id, time.time()), 4)
        return min(capacity) > 0 and all(view[swarm.daemons[n].peer_id].state == "serving" for n in movers)

    took = wait_for(covered_again, float(LEASE) + 2 * CONVERGE_S, "a daemon moving to the uncovered block")
    print(f"the hole was refilled {took:.1f} s after the only server of it was killed")
    time.sleep(3)  # long enough for a herd to show: the others' rebalance checks run every 0.5 s
    moved = [n for n in movers if swarm.span(n)[:2] != spans[n]]
    assert len(moved) == 1, (moved, spans, {n: swarm.span(n) for n in movers})
    assert moved == first, (moved, ranks)
    log = swarm.daemons[moved[0]].log
    assert any("moving to layers" in line and "draining" in line for line in log), log[-20:]


def test_status_shows_the_crdt_view(swarm: Views) -> None:
    boot = swarm.daemons["boot"].multiaddr
    crdt = moemesh_status(boot)["crdt"]
    live = {n: d for n, d in swarm.daemons.items() if d.process.poll() is None}
    assert {m["peer_id"] for m in crdt["members"]} == {d.peer_id for d in live.values()}
    serving = [m for m in crdt["members"] if m["model_id"]]
    assert serving and all(m["load"] is not None and m["load"]["free_kv_tokens"] > 0 for m in serving)
    assert crdt["rtt_ms"] and all(ms > 0 for row in crdt["rtt_ms"].values() for ms in row.values())
    (model,) = crdt["models"].values()
    assert model["num_layers"] == 4 and model["bottleneck"] > 0
    text = moemesh_status(boot, json_output=False)
    assert "swarm state (CRDT)" in text and "RTT ms" in text
