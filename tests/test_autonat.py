"""AutoNAT reaches a verdict in a small swarm and says why when it cannot; a client's route error
names the cause the swarm knows (peers behind NAT without a relay), not only the missing layers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.client.known import KnownPeers, NatBlocked
from node.errors import RouteError
from node.mesh.autonat import AutoNATConfig, decide
from node.plan.peers import PeerView
from node.plan.routing import best_chain
from node.testing.launch import DaemonProcess, start_daemon
from protocol.mesh_pb2 import Reachability

UNKNOWN, PUBLIC, PRIVATE = (
    Reachability.REACHABILITY_UNKNOWN,
    Reachability.REACHABILITY_PUBLIC,
    Reachability.REACHABILITY_PRIVATE,
)


def test_a_verdict_needs_the_confirmations_and_a_small_swarm_settles_for_all_its_peers() -> None:
    config = AutoNATConfig()  # 3 confirmations, small swarm after 3 checks
    assert decide(UNKNOWN, 3, 1, config, 1)[0] == PUBLIC
    assert decide(UNKNOWN, 0, 3, config, 1)[0] == PRIVATE
    verdict, why = decide(UNKNOWN, 1, 0, config, 1)  # one peer: not yet
    assert verdict == UNKNOWN and "1 of the 3 agreeing answers" in why
    assert decide(UNKNOWN, 1, 0, config, 3) == (PUBLIC, "1 of 1 peers dialed us back")  # all a small swarm has
    assert decide(UNKNOWN, 0, 2, config, 3)[0] == PRIVATE
    verdict, why = decide(UNKNOWN, 1, 1, config, 5)  # they disagree: no verdict, and it says so
    assert verdict == UNKNOWN and "1 peers dialed us back and 1 could not" in why
    assert decide(UNKNOWN, 0, 0, config, 9) == (UNKNOWN, "undecided: no peer has answered a dial-back request yet")
    assert decide(PUBLIC, 0, 1, config, 9)[0] == PUBLIC  # a verdict changes only with the confirmations


def _view(peer: str, start: int, end: int) -> PeerView:
    return PeerView(peer_id=peer, address=f"{peer}:1", start=start, end=end, num_layers=6, model_id="m")


def _route_error(known: KnownPeers) -> RouteError:
    try:
        best_chain(known.peers, known.num_layers)
    except RouteError as e:
        return known.explain(e)
    raise AssertionError("a chain was found")


def test_missing_layers_served_only_behind_nat_are_named_as_such() -> None:
    reachable = [_view("b", 3, 6)]
    no_relay = KnownPeers("m", 6, reachable, behind_nat=(NatBlocked("a", 0, 3, relays=False),))
    assert str(_route_error(no_relay)) == "layers 0:3 are served only by peers behind NAT and no relay is available"
    dead_relay = KnownPeers("m", 6, reachable, behind_nat=(NatBlocked("a", 0, 3, relays=True),))
    assert "behind NAT whose relays could not be reached" in str(_route_error(dead_relay))
    partly = KnownPeers("m", 6, [_view("c", 5, 6)], behind_nat=(NatBlocked("a", 0, 3, relays=False),))
    assert str(_route_error(partly)) == (
        "layers 0:3 are served only by peers behind NAT and no relay is available; no known peer serves layers 3:5 of 6"
    )
    plain = KnownPeers("m", 6, reachable)
    assert str(_route_error(plain)) == "no known peer serves layers 0:3 of 6"


def _wait_for_line(daemon: DaemonProcess, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := [line for line in daemon.log if text in line]:
            return found[0]
        if daemon.process.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"no {text!r} in:\n" + "\n".join(daemon.log[-30:]))


@pytest.mark.slow
def test_two_public_daemons_reach_a_verdict_with_the_default_confirmations(tmp_path: Path) -> None:
    first = start_daemon(["--identity", str(tmp_path / "a.key")])
    try:
        second = start_daemon(["--identity", str(tmp_path / "b.key"), "--bootstrap", first.multiaddr])
        try:
            for daemon in (first, second):
                _wait_for_line(daemon, "moemesh: reachability: public", 60)
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_clients_route_error_names_the_nat_from_the_records(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from node.client import Client
    from protocol import PROTOCOL_VERSION
    from protocol.mesh_pb2 import PeerRecord, ShardAd

    def record(start: int, end: int, reachability: int, grpc: str = "") -> PeerRecord:
        shard = ShardAd(model_id="m", model_name="tiny", start=start, end=end, num_layers=6, throughput=1.0)
        return PeerRecord(
            shards=[shard], protocol_version=PROTOCOL_VERSION, reachability=reachability,  # type: ignore[arg-type]
            grpc_addresses=[grpc] if grpc else [], tls_fingerprint="ab" * 32,
        )  # fmt: skip

    natted = {"a": record(0, 3, PRIVATE)}  # behind NAT, no relay: its record has no circuit address
    both = {**natted, "b": record(3, 6, PUBLIC, "127.0.0.1:9")}  # public, but not answering here
    nat = "layers 0:3 are served only by peers behind NAT and no relay is available"
    for records, expected in [
        (natted, f"{nat}; no known peer serves layers 3:6 of 6"),  # nothing reachable at all
        (both, f"{nat}; no known peer serves layers 3:6 of 6"),  # b did not answer: no known peer for 3:6
    ]:
        with Client(bootstrap=["/ip4/127.0.0.1/tcp/9"]) as client:
            fake = SimpleNamespace(model=lambda model_id, records=records: ("m", SimpleNamespace(records=records)))
            monkeypatch.setattr(client.finder, "_swarm", lambda fake=fake: fake)
            with pytest.raises(RouteError) as caught:
                client.route()
        assert str(caught.value) == expected
