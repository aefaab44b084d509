"""The replicated swarm state converges whatever the network does to its updates."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import BadUpdateError, Load, Member, NotOwnerError, Replica, SwarmState, decode_frame, encode_frame
from protocol.swarm_pb2 import SyncFrame

PEERS = ["p0", "p1", "p2", "p3"]

write = st.tuples(st.just("write"), st.integers(0, 3), st.integers(0, 64), st.floats(0, 100, allow_nan=False))
reap = st.tuples(st.just("reap"), st.integers(0, 3), st.floats(0, 100, allow_nan=False), st.just(0))
deliver = st.tuples(st.just("deliver"), st.integers(0, 3), st.integers(0, 10_000), st.booleans())
sync = st.tuples(st.just("sync"), st.integers(0, 3), st.integers(0, 3), st.just(0))
leave = st.tuples(st.just("leave"), st.integers(0, 3), st.just(0), st.just(0))
operations = st.lists(st.one_of(write, write, reap, deliver, deliver, deliver, sync, leave), max_size=60)


class Network:
    """Replicas whose pushed updates wait in an in-flight pool: delivered late, out of order, twice, or never."""

    def __init__(self, groups: list[set[int]] | None = None) -> None:
        self.replicas = [SwarmState(p, client_id=i + 1) for i, p in enumerate(PEERS)]
        self.in_flight: list[tuple[int, bytes]] = []  # (destination, update)
        self.groups = groups
        self._subs = [r.observe(self._pusher(i)) for i, r in enumerate(self.replicas)]

    def linked(self, a: int, b: int) -> bool:
        return self.groups is None or any(a in g and b in g for g in self.groups)

    def _pusher(self, source: int) -> Any:
        def push(update: bytes) -> None:
            for dest in range(len(self.replicas)):
                if dest != source and self.linked(source, dest):
                    self.in_flight.append((dest, update))

        return push

    def run(self, op: tuple[Any, ...]) -> None:
        kind, a, b, c = op
        if kind == "write":
            r = self.replicas[a]
            r.set_member(Member(r.local_peer, (f"127.0.0.1:{b}",), "m", 0, b, b * 1000, c, "v", c))
            r.set_load(Load(active_sessions=b, free_kv_tokens=b * 16, queue_length=b % 3))
            r.set_rtts({PEERS[(a + 1) % 4]: c})
        elif kind == "reap":
            self.replicas[a].reap(b)
        elif kind == "leave":
            self.replicas[a].leave()
        elif kind == "deliver" and self.in_flight:
            dest, update = self.in_flight[b % len(self.in_flight)]
            if not c:  # c: duplicate, i.e. deliver but keep it in flight
                self.in_flight.remove((dest, update))
            self.replicas[dest].apply(update)
        elif kind == "sync" and a != b and self.linked(a, b):
            src, dst = self.replicas[a], self.replicas[b]
            dst.apply(src.diff(dst.state_vector()))

    def heal(self) -> None:
        """Drop the partition and run push-pull anti-entropy rounds (every pair, both ways)."""
        self.groups = None
        for _ in range(2):
            for src in self.replicas:
                for dst in self.replicas:
                    if src is not dst:
                        dst.apply(src.diff(dst.state_vector()))

    def converged(self) -> bool:
        first = self.replicas[0].snapshot()
        return all(r.snapshot() == first for r in self.replicas[1:])


@settings(max_examples=150, deadline=None)
@given(operations)
def test_any_interleaving_duplication_reordering_and_delay_converges(ops: list[tuple[Any, ...]]) -> None:
    net = Network()
    for op in ops:
        net.run(op)
    for dest, update in list(net.in_flight):  # late deliveries, in any order, even twice
        net.replicas[dest].apply(update)
    net.heal()
    assert net.converged()


@settings(max_examples=100, deadline=None)
@given(operations, operations)
def test_a_partitioned_swarm_converges_after_it_heals(
    before: list[tuple[Any, ...]], during: list[tuple[Any, ...]]
) -> None:
    net = Network()
    for op in before:
        net.run(op)
    net.groups = [{0, 1}, {2, 3}]
    net.in_flight.clear()  # the partition loses everything in flight
    for op in during:
        net.run(op)
    net.in_flight.clear()
    net.heal()
    assert net.converged()


def test_only_the_owner_writes_its_member_record() -> None:
    state = SwarmState("a")
    with pytest.raises(NotOwnerError):
        state.set_member(Member("b"))


def test_reads_cast_numbers_back_to_ints() -> None:
    a, b = SwarmState("a", 1), SwarmState("b", 2)
    a.set_member(Member("a", ("h:1",), "m", 2, 5, 1 << 33, 12.5, "0.1", 10.0))
    a.set_load(Load(3, 4096, 1))
    b.apply(a.diff())
    member, load = b.members()["a"], b.loads()["a"]
    assert (member.start, member.end, member.capacity_bytes) == (2, 5, 1 << 33)
    assert isinstance(member.start, int) and isinstance(load.free_kv_tokens, int)


def test_expired_leases_are_reaped_by_anyone_and_the_owner_can_come_back() -> None:
    a, b = SwarmState("a", 1), SwarmState("b", 2)
    a.set_member(Member("a", lease_until=10.0))
    b.apply(a.diff())
    assert b.reap(now=11.0) == ["a"] and b.members() == {}
    a.apply(b.diff(a.state_vector()))
    assert a.members() == {}
    a.set_member(Member("a", lease_until=30.0))  # still alive: it renews
    b.apply(a.diff(b.state_vector()))
    assert set(b.members()) == {"a"}


def test_garbage_from_a_peer_is_refused() -> None:
    with pytest.raises(BadUpdateError):
        SwarmState("a").apply(b"\xff\xfe\xfd")


# -- the sync protocol's logic (crdt.Replica): frames, epochs, compaction ----------------------


def converse(a: Replica, b: Replica) -> int:
    """One anti-entropy conversation a -> b, as the wire runs it; returns the bytes exchanged."""
    frame: SyncFrame | None = a.pull()
    sent = 0
    sides = [b, a]
    turn = 0
    while frame is not None and turn < 6:
        data = encode_frame(frame)
        sent += len(data)
        frame = sides[turn % 2].receive(decode_frame(data))
        turn += 1
    return sent


def flush(replicas: list[Replica], linked: Any = lambda a, b: True) -> None:
    for i, r in enumerate(replicas):
        update = r.take_outbox()
        if update is not None:
            for j, other in enumerate(replicas):
                if j != i and linked(i, j):
                    answer = other.receive(r.push(update))
                    if answer is not None:  # epochs differ: finish the conversation
                        back = r.receive(answer)
                        if back is not None:
                            other.receive(back)


replica_op = st.one_of(
    write, write, reap, leave, sync, st.tuples(st.just("compact"), st.integers(0, 3), st.just(0), st.just(0))
)


def run_replica_op(replicas: list[Replica], op: tuple[Any, ...], linked: Any) -> None:
    kind, a, b, c = op
    r = replicas[a]
    if kind == "write":
        r.set_member(Member(r.local_peer, (f"127.0.0.1:{b}",), "m", 0, b, b * 1000, c, "v", c))
        r.set_load(Load(active_sessions=b, free_kv_tokens=b * 16, queue_length=b % 3))
        r.set_rtts({PEERS[(a + 1) % 4]: c})
    elif kind == "reap":
        r.reap(b)
    elif kind == "leave":
        r.leave()
    elif kind == "compact":
        r.compact()
    elif kind == "sync" and a != b and linked(a, b):
        converse(replicas[a], replicas[b])
    flush(replicas, linked)


@settings(max_examples=100, deadline=None)
@given(st.lists(replica_op, max_size=40), st.lists(replica_op, max_size=40))
def test_replicas_converge_through_frames_with_compactions_and_a_partition(
    before: list[tuple[Any, ...]], during: list[tuple[Any, ...]]
) -> None:
    replicas = [Replica(p, client_id=i + 1) for i, p in enumerate(PEERS)]
    for op in before:
        run_replica_op(replicas, op, lambda a, b: True)
    groups = [{0, 1}, {2, 3}]
    for op in during:
        run_replica_op(replicas, op, lambda a, b: any(a in g and b in g for g in groups))
    for _ in range(3):  # healed: every pair holds a conversation both ways
        for a in replicas:
            for b in replicas:
                if a is not b:
                    converse(a, b)
    first = replicas[0]
    assert all(r.epoch == first.epoch for r in replicas)
    assert all(r.state.snapshot() == first.state.snapshot() for r in replicas[1:])


def test_a_compacted_document_is_small_and_adopted_with_its_owners_records() -> None:
    a, b = Replica("a", 1), Replica("b", 2)
    for i in range(200):  # churn: short-lived writers leave tombstones behind
        ghost = SwarmState(f"ghost{i}", client_id=100 + i)
        ghost.set_member(Member(f"ghost{i}", ("h:1",), "m", 0, 4, 1, 1.0, "v", 0.0))
        a.state.apply(ghost.diff())
    a.set_member(Member("a", lease_until=100.0))
    b.set_member(Member("b", lease_until=100.0))
    converse(b, a)
    a.reap(now=50.0)  # every ghost's lease ended
    grown = a.encoded_size()
    assert not a.maybe_compact(bound_bytes=grown)
    assert a.maybe_compact(bound_bytes=grown // 2)
    assert a.epoch == (1, "a") and a.encoded_size() < grown / 4
    converse(b, a)  # b is behind: it gets a's whole document and rewrites its own record into it
    assert b.epoch == (1, "a") and b.adopted == 1
    flush([a, b])
    assert set(a.state.members()) == set(b.state.members()) == {"a", "b"}


def test_a_garbage_frame_is_refused() -> None:
    with pytest.raises(BadUpdateError):
        decode_frame(b"\xff\xff\xff")
    with pytest.raises(BadUpdateError):
        Replica("a").receive(SyncFrame(kind=SyncFrame.PUSH, update=b"\x01\x02\x03"))
