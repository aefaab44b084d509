"""One peer view from three sources: a DHT record, a CRDT member and an Info answer each become
`PeerView`s that routing and placement read alike; a peer speaking another protocol version
is never routed through."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc
import pytest

from crdt import Member
from node.client import Client, Hop, plan_route
from node.errors import RouteError
from node.plan.peers import (
    PeerView,
    check_version,
    compatible,
    peer_from_info,
    peers_from_members,
    peers_from_record,
)
from node.plan.placement import block_capacity, propose_move
from node.plan.routing import best_chain
from node.tls import make_certificate
from protocol import PROTOCOL_VERSION, VersionMismatchError
from protocol.mesh_pb2 import PeerRecord, Reachability, ShardAd
from protocol.shard_pb2 import Capacity, InfoRequest, InfoResponse
from protocol.shard_pb2_grpc import ShardServicer, add_ShardServicer_to_server


def record(
    address: str, *spans: tuple[int, int, float], model: str = "m", version: int = PROTOCOL_VERSION
) -> PeerRecord:
    ads = [ShardAd(model_id=model, model_name="tiny", start=s, end=e, num_layers=4, throughput=t) for s, e, t in spans]
    return PeerRecord(
        grpc_addresses=[address],
        shards=ads,
        protocol_version=version,
        reachability=Reachability.REACHABILITY_PUBLIC,
    )


def test_a_record_becomes_one_view_per_span_of_the_model() -> None:
    r = record("10.0.0.1:7001", (0, 2, 50.0), (2, 4, 25.0))
    r.shards.append(ShardAd(model_id="other", start=0, end=4, num_layers=4, throughput=9.0))
    views = peers_from_record("pidA", r, "m", rtt_s=0.002)
    assert views == [
        PeerView(
            "pidA",
            0,
            2,
            50.0,
            address="10.0.0.1:7001",
            model_id="m",
            num_layers=4,
            rtt_s=0.002,
            protocol_version=1,
            quantization="none",  # a record without the field: full precision
            device="cpu",  # likewise: a CPU
        ),
        PeerView(
            "pidA",
            2,
            4,
            25.0,
            address="10.0.0.1:7001",
            model_id="m",
            num_layers=4,
            rtt_s=0.002,
            protocol_version=1,
            quantization="none",  # a record without the field: full precision
            device="cpu",  # likewise: a CPU
        ),
    ]
    assert views[0].block_seconds == pytest.approx(0.02)
    r.reachability = Reachability.REACHABILITY_PRIVATE  # behind NAT: only a tunnel reaches it
    assert {v.address for v in peers_from_record("pidA", r, "m")} == {""}
    assert {v.address for v in peers_from_record("pidA", r, "m", address="127.0.0.1:5000")} == {"127.0.0.1:5000"}
    assert peers_from_record("pidA", r, "nope") == []


def test_routing_over_record_views_weighs_throughput_and_round_trips() -> None:
    slow_whole = peers_from_record("a", record("a:1", (0, 4, 10.0)), "m")  # 0.1 s per block
    fast_halves = peers_from_record("b", record("b:1", (0, 2, 100.0)), "m") + peers_from_record(
        "c", record("c:1", (2, 4, 100.0)), "m"
    )
    hops = best_chain([*slow_whole, *fast_halves], 4)
    assert hops == [Hop("b:1", 0, 2, "b"), Hop("c:1", 2, 4, "c")]  # 2 ms + 40 ms beats 1 ms + 400 ms
    # unmeasured peers cost the same per block, so the fewest hops win
    unmeasured = [PeerView("x", 0, 4, address="x:1"), PeerView("y", 0, 2, address="y:1"), PeerView("z", 2, 4)]
    assert [h.peer for h in best_chain(unmeasured, 4)] == ["x"]


def test_members_become_views_of_live_serving_spans_and_place_alike() -> None:
    now = 1000.0
    live = now + 30

    def member(pid: str, start: int, end: int, state: str = "serving", **changes: object) -> Member:
        m = Member(pid, ("127.0.0.1:1",), "m", start, end, throughput=10.0, lease_until=live, num_layers=4, state=state)
        return replace(m, **changes)  # type: ignore[arg-type]

    members = {
        m.peer_id: m
        for m in (
            member("a", 0, 2),
            member("c", 0, 2, state="loading", max_layers=3),
            member("old", 2, 4, lease_until=now - 1),  # lease expired
            member("leaving", 2, 4, state="draining"),
            member("other", 2, 4, model_id="n"),
            member("empty", 2, 2),
        )
    }
    views = peers_from_members(members, "m", now)
    assert sorted(v.peer_id for v in views) == ["a", "c"]
    c = next(v for v in views if v.peer_id == "c")
    assert (c.start, c.end, c.throughput, c.can_hold, c.address, c.protocol_version) == (
        0,
        2,
        10.0,
        3,
        "127.0.0.1:1",
        None,
    )
    # the same answers placement gave over the members' numbers
    assert block_capacity(views, 4) == [10.0, 10.0, 0.0, 0.0]
    move = propose_move(views, "c", 4)
    assert move is not None and (move.start, move.end) == (1, 4)  # it holds 3 layers: the uncovered ones and one more


def _info(start: int, end: int, version: int = PROTOCOL_VERSION) -> InfoResponse:
    capacity = Capacity(max_length=2048, active_sessions=2, draining=True, kv_free_bytes=99, batched_steps=7)
    return InfoResponse(
        model_id="m",
        model_name="tiny",
        start=start,
        end=end,
        num_layers=4,
        vocab_size=128,
        version="1.2",
        protocol_version=version,
        capacity=capacity,
    )


def test_an_info_answer_becomes_a_view_with_its_limits_and_load() -> None:
    info = peer_from_info("h:1", _info(0, 4), rtt_s=0.003)
    assert (info.peer_id, info.address, info.start, info.end, info.num_layers, info.rtt_s) == (
        "h:1",
        "h:1",
        0,
        4,
        4,
        0.003,
    )
    assert (info.model_name, info.vocab_size, info.max_length, info.version) == ("tiny", 128, 2048, "1.2")
    assert (info.active_sessions, info.draining, info.kv_free_bytes, info.batched_steps) == (2, True, 99, 7)
    assert plan_route([info]) == [Hop("h:1", 0, 4, "h:1")]


def test_a_peer_of_another_protocol_version_is_left_out() -> None:
    ours, theirs = peer_from_info("ok:1", _info(0, 4)), peer_from_info("new:1", _info(0, 4, version=999))
    check_version(ours)
    check_version(PeerView("member", 0, 4))  # the CRDT member does not say: not refused
    with pytest.raises(VersionMismatchError, match="new:1 speaks moemesh protocol 999, this node speaks 1") as e:
        check_version(theirs)
    assert (e.value.peer, e.value.theirs, e.value.ours) == ("new:1", 999, PROTOCOL_VERSION)
    unset = peers_from_record("old", record("o:1", (0, 4, 1.0), version=0), "m")  # a record from before versions
    usable, refused = compatible([ours, theirs, *unset])
    assert usable == [ours] and [r.peer for r in refused] == ["new:1", "old"]
    assert plan_route([ours, theirs]) == [Hop("ok:1", 0, 4, "ok:1")]  # the only one we can talk to
    with pytest.raises(VersionMismatchError):
        plan_route([theirs])


class _InfoOnly(ShardServicer):
    """A peer that answers Info only, saying whatever it is told to."""

    def __init__(self, answer: InfoResponse) -> None:
        self.answer = answer

    def Info(self, request: InfoRequest, context: grpc.ServicerContext) -> InfoResponse:  # noqa: N802
        return self.answer


@pytest.fixture
def info_server() -> Iterator[Callable[[InfoResponse], str]]:
    """Start in-process gRPC servers answering Info over TLS: append an InfoResponse, get its
    pinned address (host:port#fingerprint)."""
    servers: list[grpc.Server] = []
    certificate = make_certificate()

    def start(answer: InfoResponse) -> str:
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        add_ShardServicer_to_server(_InfoOnly(answer), server)
        port = server.add_secure_port("127.0.0.1:0", certificate.server_credentials())
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}#{certificate.fingerprint}"

    yield start
    for server in servers:
        server.stop(None)


def test_the_client_does_not_route_through_a_peer_of_another_protocol_version(
    info_server: Callable[[InfoResponse], str],
) -> None:
    newer = info_server(_info(0, 4, version=999))
    with Client([newer]) as client, pytest.raises(VersionMismatchError, match="speaks moemesh protocol 999"):
        client.route()
    head, tail = info_server(_info(0, 2)), info_server(_info(2, 4, version=999))
    with Client([head, tail]) as client:
        with pytest.raises(RouteError, match=f"layers 2:4 of 4; another protocol version: {tail} speaks"):
            client.route()
    whole = info_server(_info(0, 4))
    with Client([newer, whole]) as client:
        assert client.route() == ("m", [Hop(whole, 0, 4, whole)])
