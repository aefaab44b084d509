"""The replicated swarm state of signed entries converges whatever the network does to its updates."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair

from crdt import BadUpdateError, Limits, Load, Member, NotOwnerError, Replica, SwarmState, decode_frame, encode_frame
from node.mesh.identity import Libp2pSigner, Libp2pVerifier
from protocol.swarm_pb2 import SyncFrame

SIGNERS = [Libp2pSigner(create_new_key_pair()) for _ in range(4)]
PEERS = [s.peer_id for s in SIGNERS]
VERIFIER = Libp2pVerifier()


class Clock:
    """One fake clock for the whole swarm (unix seconds), so that leases expire when a test says."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def state(i: int, clock: Clock, client_id: int | None = None) -> SwarmState:
    return SwarmState(VERIFIER, SIGNERS[i], clock=clock, client_id=client_id)


def replica(i: int, clock: Clock, client_id: int | None = None, limits: Limits | None = None) -> Replica:
    return Replica(VERIFIER, SIGNERS[i], clock=clock, client_id=client_id, limits=limits)


write = st.tuples(st.just("write"), st.integers(0, 3), st.integers(0, 64), st.floats(0, 100, allow_nan=False))
reap = st.tuples(st.just("reap"), st.integers(0, 3), st.floats(0, 100, allow_nan=False), st.just(0))
deliver = st.tuples(st.just("deliver"), st.integers(0, 3), st.integers(0, 10_000), st.booleans())
sync = st.tuples(st.just("sync"), st.integers(0, 3), st.integers(0, 3), st.just(0))
leave = st.tuples(st.just("leave"), st.integers(0, 3), st.just(0), st.just(0))
operations = st.lists(st.one_of(write, write, reap, deliver, deliver, deliver, sync, leave), max_size=60)


class Network:
    """Replicas whose pushed updates wait in an in-flight pool: delivered late, out of order, twice, or never.

    Time is one clock for all (a reap first moves it on), so that leases expire alike everywhere."""

    def __init__(self, groups: list[set[int]] | None = None) -> None:
        self.clock = Clock()
        self.replicas = [state(i, self.clock, client_id=i + 1) for i in range(len(PEERS))]
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
            write_all(self.replicas[a], a, b, self.clock.now + c)
        elif kind == "reap":
            self.clock.now += b
            self.replicas[a].reap(self.clock.now)
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
        """Drop the partition and run push-pull anti-entropy rounds (every pair, both ways) until
        nothing changes: a repair made in one round reaches the others in the next."""
        self.groups = None
        for _ in range(8):
            before = [r.state_vector() for r in self.replicas]
            for src in self.replicas:
                for dst in self.replicas:
                    if src is not dst:
                        dst.apply(src.diff(dst.state_vector()))
            if [r.state_vector() for r in self.replicas] == before and len(set(before)) == 1:
                return

    def converged(self) -> bool:
        first = self.replicas[0].snapshot()
        return all(r.snapshot() == first for r in self.replicas[1:])


def write_all(r: SwarmState | Replica, i: int, b: int, lease_until: float) -> None:
    r.set_member(Member(PEERS[i], (f"127.0.0.1:{b}",), "m", 0, b, b * 1000, lease_until % 50, "v", lease_until))
    r.set_load(Load(active_sessions=b, free_kv_tokens=b * 16, queue_length=b % 3))
    r.set_rtts({PEERS[(i + 1) % 4]: lease_until % 50})


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
    with pytest.raises(NotOwnerError):
        state(0, Clock()).set_member(Member(PEERS[1]))
    with pytest.raises(NotOwnerError):  # a read-only replica (a status client) writes nothing
        SwarmState(VERIFIER).set_member(Member(PEERS[0]))


def test_reads_cast_numbers_back_to_ints() -> None:
    clock = Clock()
    a, b = state(0, clock, 1), state(1, clock, 2)
    a.set_member(Member(PEERS[0], ("h:1",), "m", 2, 5, 1 << 33, 12.5, "0.1", 1010.0))
    a.set_load(Load(3, 4096, 1))
    b.apply(a.diff())
    member, load = b.members()[PEERS[0]], b.loads()[PEERS[0]]
    assert (member.start, member.end, member.capacity_bytes) == (2, 5, 1 << 33)
    assert isinstance(member.start, int) and isinstance(load.free_kv_tokens, int)
    assert member == Member(PEERS[0], ("h:1",), "m", 2, 5, 1 << 33, 12.5, "0.1", 1010.0)


def test_expired_leases_are_reaped_by_anyone_and_the_owner_can_come_back() -> None:
    clock = Clock()
    a, b = state(0, clock, 1), state(1, clock, 2)
    a.set_member(Member(PEERS[0], lease_until=1010.0))
    b.apply(a.diff())
    clock.now = 1011.0
    assert b.reap(now=clock.now) == [PEERS[0]] and b.members() == {}
    a.apply(b.diff(a.state_vector()))
    assert a.members() == {}
    a.set_member(Member(PEERS[0], lease_until=1030.0))  # still alive: it renews
    b.apply(a.diff(b.state_vector()))
    assert set(b.members()) == {PEERS[0]}


def test_a_clean_leave_is_reaped_by_the_others_and_not_repaired() -> None:
    clock = Clock()
    a, b = state(0, clock, 1), state(1, clock, 2)
    write_all(a, 0, 3, 1020.0)
    b.apply(a.diff())
    a.leave()
    b.apply(a.diff(b.state_vector()))
    assert b.members()[PEERS[0]].lease_until == 0.0  # withdrawn, signed: placement ignores it
    assert b.reap(clock.now) == [PEERS[0]] and b.snapshot() == ({}, {}, {})
    a.apply(b.diff(a.state_vector()))
    assert a.snapshot() == ({}, {}, {})


def test_load_and_rtt_entries_are_renewed_with_the_member_lease() -> None:
    clock = Clock()
    a, b = state(0, clock, 1), state(1, clock, 2)
    write_all(a, 0, 3, 1020.0)
    clock.now = 1015.0
    a.set_member(Member(PEERS[0], lease_until=1045.0))  # the renewal re-signs load and RTTs
    b.apply(a.diff())
    clock.now = 1030.0
    assert b.reap(clock.now) == [] and set(b.loads()) == set(b.rtts_ms()) == {PEERS[0]}


def test_an_rtt_entry_keeps_our_nearest_peers() -> None:
    a = state(0, Clock())
    a.set_member(Member(PEERS[0], lease_until=1020.0))
    a.set_rtts({f"peer{i}": float(i) for i in range(500)})
    assert a.rtts_ms()[PEERS[0]] == {f"peer{i}": float(i) for i in range(a.limits.max_rtt_peers)}


def test_garbage_from_a_peer_is_refused() -> None:
    with pytest.raises(BadUpdateError):
        SwarmState(VERIFIER).apply(b"\xff\xfe\xfd")


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


def run_replica_op(replicas: list[Replica], clock: Clock, op: tuple[Any, ...], linked: Any) -> None:
    kind, a, b, c = op
    r = replicas[a]
    if kind == "write":
        write_all(r, a, b, clock.now + c)
    elif kind == "reap":
        clock.now += b
        r.reap(clock.now)
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
    clock = Clock()
    eager = Limits(min_adopt_interval_s=0.0)  # the clock stands still here: adopt every epoch at once
    replicas = [replica(i, clock, client_id=i + 1, limits=eager) for i in range(len(PEERS))]
    for op in before:
        run_replica_op(replicas, clock, op, lambda a, b: True)
    groups = [{0, 1}, {2, 3}]
    for op in during:
        run_replica_op(replicas, clock, op, lambda a, b: any(a in g and b in g for g in groups))
    for _ in range(4):  # healed: every pair holds a conversation both ways
        for a in replicas:
            for b in replicas:
                if a is not b:
                    converse(a, b)
        flush(replicas)
    first = replicas[0]
    assert all(r.epoch == first.epoch for r in replicas)
    assert all(r.state.snapshot() == first.state.snapshot() for r in replicas[1:])


def test_a_compacted_document_is_small_and_adopted_with_its_owners_records() -> None:
    clock = Clock()
    a, b = replica(0, clock, 1), replica(1, clock, 2)
    for i in range(200):  # churn: short-lived writers leave tombstones behind
        ghost_signer = Libp2pSigner(create_new_key_pair())
        ghost = SwarmState(VERIFIER, ghost_signer, clock=clock, client_id=100 + i)
        ghost.set_member(Member(ghost_signer.peer_id, ("h:1",), "m", 0, 4, 1, 1.0, "v", 1001.0))
        a.state.apply(ghost.diff())
    a.set_member(Member(PEERS[0], lease_until=1100.0))
    b.set_member(Member(PEERS[1], lease_until=1100.0))
    converse(b, a)
    clock.now = 1050.0
    a.reap(now=clock.now)  # every ghost's lease ended
    grown = a.encoded_size()
    assert not a.maybe_compact(bound_bytes=grown)
    assert a.maybe_compact(bound_bytes=grown // 2)
    assert a.epoch == (1050, PEERS[0]) and a.encoded_size() < grown / 4
    converse(b, a)  # b is behind: it gets a's whole document and keeps its own record in it
    assert b.epoch == (1050, PEERS[0]) and b.adopted == 1
    flush([a, b])
    assert set(a.state.members()) == set(b.state.members()) == {PEERS[0], PEERS[1]}


def test_a_read_only_replica_reads_a_whole_document() -> None:
    clock = Clock()
    a = replica(0, clock)
    write_all(a, 0, 2, 1020.0)
    a.compact()
    reader = Replica(VERIFIER, clock=clock)
    assert reader.receive(decode_frame(encode_frame(a.receive(reader.pull()) or a.whole()))) is None
    assert reader.state.snapshot() == a.state.snapshot() and reader.local_peer == ""


def test_a_garbage_frame_is_refused() -> None:
    with pytest.raises(BadUpdateError):
        decode_frame(b"\xff\xff\xff")
    with pytest.raises(BadUpdateError):
        Replica(VERIFIER).receive(SyncFrame(kind=SyncFrame.PUSH, update=b"\x01\x02\x03"))
