"""A hostile peer (a throwaway key, a raw pycrdt document, any frame it likes) against the swarm state.

Each attack of issue 11 that concerns the swarm state, in-process: the stranger can write any key
of the document and send any sync frame; the honest view must not change, and sync must go on.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from pycrdt import Doc, Map

from crdt import (
    BadEntryError,
    BadUpdateError,
    Limits,
    Load,
    Member,
    OverLimitError,
    Replica,
    SwarmState,
    decode_frame,
    encode_frame,
    open_entry,
    sign_entry,
)
from crdt.entry import DOMAIN
from node.mesh.identity import Libp2pSigner, Libp2pVerifier
from node.swarm.status import crdt_report
from protocol.swarm_pb2 import SyncFrame

VERIFIER = Libp2pVerifier()
NOW = 1_000_000.0
MAX_EPOCH = (1 << 64) - 1


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def honest(clock: Clock, limits: Limits | None = None) -> Replica:
    r = Replica(VERIFIER, Libp2pSigner(create_new_key_pair()), clock=clock, limits=limits)
    r.set_member(
        Member(r.local_peer, ("127.0.0.1:1",), "m", 0, 4, 1 << 30, 10.0, "v", clock.now + 30, (), 4, 4, "serving")
    )
    r.set_load(Load(1, 100, 0))
    r.set_rtts({"other": 5.0})
    return r


def converse(a: Replica, b: Replica) -> None:
    frame: SyncFrame | None = a.pull()
    sides = [b, a]
    for turn in range(6):
        if frame is None:
            return
        frame = sides[turn % 2].receive(decode_frame(encode_frame(frame)))


def swarm(clock: Clock) -> tuple[Replica, Replica, Replica]:
    """Three honest daemons that have synced: a writes, b is the victim, c learns from b later."""
    a, b, c = honest(clock), honest(clock), honest(clock)
    converse(a, b)
    converse(c, b)
    converse(a, b)
    return a, b, c


class Stranger:
    """A hostile peer: a throwaway key, no record, and a raw pycrdt document (no checks of ours)."""

    def __init__(self) -> None:
        self.signer = Libp2pSigner(create_new_key_pair())
        self.doc: Doc = Doc()
        self.maps = {name: self.doc.get(name, type=Map) for name in ("members", "load", "rtt")}

    def learn(self, victim: Replica) -> None:
        """Take the victim's document, so that the stranger's writes supersede what it holds."""
        self.doc.apply_update(victim.state.diff())

    def push(self, victim: Replica, epoch: int | None = None, epoch_owner: str = "", full: bool = False) -> Any:
        """Send the victim the stranger's whole document as a PUSH (by default under the victim's epoch)."""
        frame = SyncFrame(
            kind=SyncFrame.PUSH,
            epoch=victim.epoch[0] if epoch is None else epoch,
            epoch_owner=victim.epoch[1] if epoch is None else epoch_owner,
            update=self.doc.get_update(),
            full=full,
        )
        return victim.receive(decode_frame(encode_frame(frame)), self.signer.peer_id)

    def signed(self, kind: str, lease_until: float, value: Any, seq: int = 1) -> bytes:
        """A blob the stranger really signed (its own peer id): well signed, whatever it says."""
        return sign_entry(self.signer, kind, seq, lease_until, value)


def view(r: Replica) -> tuple[Any, ...]:
    return r.state.snapshot()


def test_a_stranger_cannot_overwrite_another_members_entry() -> None:
    clock = Clock()
    a, b, c = swarm(clock)
    before = view(b)
    old_blob = bytes(b.state.doc.get("members", type=Map)[a.local_peer])
    clock.now += 5
    a.set_member(Member(a.local_peer, ("127.0.0.1:1",), lease_until=clock.now + 30))  # a renews: seq goes up
    converse(a, b)
    before = view(b)
    s = Stranger()
    s.learn(b)
    forged = msgpack.packb([s.signer.public_key, msgpack.packb({"kind": "member", "peer_id": a.local_peer}), b"x" * 64])
    s.maps["members"][a.local_peer] = forged  # claims to be a, signed by the stranger's key
    s.maps["load"][a.local_peer] = s.signed("load", clock.now + 30, Load(999, 0, 999))  # the stranger's own blob
    s.maps["rtt"][a.local_peer] = old_blob  # a's own member blob, in the wrong map
    s.push(b)
    assert view(b) == before
    s.maps["members"][a.local_peer] = old_blob  # a replay: a's own, older entry
    s.push(b)
    assert view(b) == before and b.state.members()[a.local_peer].lease_until == clock.now + 30
    converse(c, b)  # b repaired its document: a third daemon learns a's real entries from it
    assert view(c) == before


def test_a_stranger_cannot_delete_another_members_entry() -> None:
    clock = Clock()
    a, b, c = swarm(clock)
    before = view(b)
    s = Stranger()
    s.learn(b)
    with s.doc.transaction():
        for m in s.maps.values():
            for key in list(m.keys()):
                del m[key]
    s.push(b)
    assert view(b) == before
    converse(c, b)
    assert view(c) == before
    clock.now += 31  # once the signed leases ended, a deletion is honoured
    s.learn(b)
    for m in s.maps.values():
        for key in list(m.keys()):
            del m[key]
    s.push(b)
    assert view(b) == ({}, {}, {})


def test_a_fake_member_with_a_huge_lease_never_counts() -> None:
    clock = Clock()
    a, b, c = swarm(clock)
    before, report = view(b), crdt_report(b.state, clock.now)
    s = Stranger()
    pid = s.signer.peer_id
    fake = Member(pid, ("127.0.0.1:9",), "m", 0, 4, 1 << 30, 333_333_349.0, "v", 1e12, (), 4, 4, "serving")
    s.maps["members"][pid] = s.signed("member", 1e12, fake)
    s.push(b)
    s.maps["members"][pid] = s.signed("member", clock.now + 30, fake, seq=2)  # a sane lease, an absurd speed
    s.push(b)
    s.maps["load"][pid] = s.signed("load", 1e12, Load(1, 1, 1))
    s.push(b)
    assert view(b) == before and pid not in b.state.members()
    assert crdt_report(b.state, clock.now) == report  # placement and `status` count the honest only


@pytest.mark.parametrize(
    "value",
    [
        {"lease_until": 1e12},  # the 76-byte poison of issue 11: a member value without peer_id
        {"peer_id": "x", "lease_until": "soon", "start": -1},
        7,
        "text",
        b"\x93\xc4\x00\xc4\x00\xc4\x00",  # msgpack [b"", b"", b""]
        [1, 2, 3],
    ],
)
def test_a_member_value_without_peer_id_cannot_crash_readers(value: Any) -> None:
    clock = Clock()
    a, b, c = swarm(clock)
    before = view(b)
    s = Stranger()
    s.learn(b)
    s.maps["members"]["poison"] = value
    s.maps["members"][a.local_peer] = value
    s.maps["load"]["poison"] = value
    s.maps["rtt"][b.local_peer] = value
    s.push(b)
    assert view(b) == before
    assert b.reap(clock.now) == [] and len(crdt_report(b.state, clock.now)["members"]) == 3
    converse(c, b)
    assert view(c) == before and "poison" not in b.state.doc.get("members", type=Map)


def test_epoch_2_64_minus_1_with_full_is_refused_and_a_takeover_changes_no_entry() -> None:
    clock = Clock()
    a, b, c = swarm(clock)
    before, epoch = view(b), b.epoch
    s = Stranger()  # an empty document: adopted wholesale, it would wipe every member
    with pytest.raises(BadUpdateError):
        s.push(b, epoch=MAX_EPOCH, epoch_owner=s.signer.peer_id, full=True)
    assert b.epoch == epoch and view(b) == before
    with pytest.raises(BadUpdateError):  # the first step of the takeover, asking for our document
        b.receive(SyncFrame(kind=SyncFrame.PULL, epoch=MAX_EPOCH, state_vector=b"\x00"), s.signer.peer_id)
    assert s.push(b, epoch=int(clock.now) + 60, epoch_owner=s.signer.peer_id, full=True) is None
    assert b.epoch == (int(clock.now) + 60, s.signer.peer_id) and view(b) == before  # adopted entry by entry
    flush = b.take_outbox()  # what the stranger's document lacked is written back, for the others
    assert flush is not None
    converse(c, b)
    converse(a, b)
    assert view(a) == view(c) == before


def test_epoch_2_64_minus_1_then_compaction_keeps_sync_alive() -> None:
    clock = Clock()
    a, b, c = swarm(clock)
    s = Stranger()
    s.learn(b)
    with pytest.raises(BadUpdateError):
        s.push(b, epoch=MAX_EPOCH, epoch_owner=s.signer.peer_id, full=True)
    b.compact()
    assert b.epoch[0] < MAX_EPOCH
    encode_frame(b.pull())  # every frame still encodes
    clock.now += 10
    a.set_member(Member(a.local_peer, ("127.0.0.1:2",), lease_until=clock.now + 30))
    for _ in range(2):  # the first round moves a and c to b's epoch, the second brings a's change
        converse(a, b)
        converse(c, b)
    assert b.epoch == a.epoch == c.epoch and view(a) == view(b) == view(c)
    assert c.state.members()[a.local_peer].addresses == ("127.0.0.1:2",)


def test_live_fake_members_cannot_grow_the_document() -> None:
    clock = Clock()
    a, b, c = swarm(clock)
    compacted = 0
    for round_ in range(3):
        s = Stranger()
        s.learn(b)
        with s.doc.transaction():
            for i in range(100):  # 100 fakes of 30 kB each per frame, with leases that never end
                s.maps["members"][f"fake{round_}-{i}"] = {
                    "peer_id": f"fake{i}",
                    "lease_until": 1e12,
                    "addresses": ["x" * 30_000],
                }
        s.push(b)
        pid = s.signer.peer_id  # and one well-signed fake whose record is huge
        s.maps["members"][pid] = s.signed("member", clock.now + 30, Member(pid, ("h" * 256,) * 16, "m" * 256))
        s.push(b)
        b.maybe_compact(bound_bytes=64 << 10)
        compacted = b.encoded_size()
    assert len(b.state.members()) == 3
    assert compacted <= 3 * 3 * b.limits.max_entry_bytes  # bounded by the verified live members
    converse(c, b)
    assert view(c) == view(b)


def test_live_fakes_are_bounded_per_member_and_leave_with_their_lease() -> None:
    clock = Clock()
    a, b, c = swarm(clock)
    size = b.encoded_size()
    for _ in range(20):  # 20 throwaway identities, each a well-signed member: strangers can join
        s = Stranger()
        s.maps["members"][s.signer.peer_id] = s.signed("member", clock.now + 30, Member(s.signer.peer_id))
        s.push(b)
    assert len(b.state.members()) == 23 and b.encoded_size() <= size + 20 * b.limits.max_entry_bytes
    clock.now += 31  # they do not renew: the honest do
    for r in (a, c):
        r.set_member(Member(r.local_peer, lease_until=clock.now + 30))
        converse(r, b)
    b.reap(clock.now)
    b.set_member(Member(b.local_peer, lease_until=clock.now + 30))
    assert set(b.state.members()) == {a.local_peer, b.local_peer, c.local_peer}


def test_frames_are_limited_per_peer_in_size_and_rate() -> None:
    clock = Clock()
    limits = Limits(max_frame_bytes=1 << 16, frames_per_s=10.0, frame_burst=20)
    b = Replica(VERIFIER, Libp2pSigner(create_new_key_pair()), limits=limits, clock=clock)
    with pytest.raises(OverLimitError):
        b.receive(SyncFrame(kind=SyncFrame.PUSH, update=b"\x00" * (1 << 17)), "flooder")
    for _ in range(19):
        b.receive(SyncFrame(kind=SyncFrame.PULL, state_vector=b"\x00"), "flooder")
    with pytest.raises(OverLimitError):
        b.receive(SyncFrame(kind=SyncFrame.PULL, state_vector=b"\x00"), "flooder")
    assert b.receive(SyncFrame(kind=SyncFrame.PULL, state_vector=b"\x00"), "someone else") is not None
    clock.now += 0.5  # 10 frames/s: five more
    for _ in range(5):
        b.receive(SyncFrame(kind=SyncFrame.PULL, state_vector=b"\x00"), "flooder")
    with pytest.raises(OverLimitError):
        b.receive(SyncFrame(kind=SyncFrame.PULL, state_vector=b"\x00"), "flooder")
    assert b.refused == 3


# -- the one door from the network: open_entry takes any bytes ----------------------------------

SIGNER = Libp2pSigner(create_new_key_pair())
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["kind", "peer_id", "seq", "lease_until", "body", "start", "throughput", "state"])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_an_entry_or_a_bad_entry(blob: bytes) -> None:
    try:
        open_entry(blob, "member", SIGNER.peer_id, VERIFIER, NOW, Limits())
    except BadEntryError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["member", "load", "rtt"]), st.dictionaries(field_names, msgpack_values), msgpack_values)
def test_any_well_signed_payload_is_an_entry_or_a_bad_entry(kind: str, fields: dict[str, Any], body: Any) -> None:
    payload = msgpack.packb(
        {"kind": kind, "peer_id": SIGNER.peer_id, "seq": 1, "lease_until": NOW, "body": body, **fields}
    )
    blob = msgpack.packb([SIGNER.public_key, payload, SIGNER.sign(DOMAIN + payload)])
    try:
        entry = open_entry(blob, kind, SIGNER.peer_id, VERIFIER, NOW, Limits())
    except BadEntryError:
        return
    assert entry.peer_id == SIGNER.peer_id and 0 <= entry.lease_until <= NOW + Limits().max_lease_ahead_s


def test_a_signature_made_for_something_else_is_not_an_entry() -> None:
    payload = msgpack.packb(
        {"kind": "load", "peer_id": SIGNER.peer_id, "seq": 1, "lease_until": NOW, "body": Load().body()}
    )
    blob = msgpack.packb([SIGNER.public_key, payload, SIGNER.sign(payload)])  # no domain prefix
    with pytest.raises(BadEntryError):
        open_entry(blob, "load", SIGNER.peer_id, VERIFIER, NOW, Limits())
    good = msgpack.packb([SIGNER.public_key, payload, SIGNER.sign(DOMAIN + payload)])
    assert open_entry(good, "load", SIGNER.peer_id, VERIFIER, NOW, Limits()).value == Load()


def test_a_state_with_an_unknown_verifier_answer_believes_nothing() -> None:
    class No:
        def verify(self, peer_id: str, public_key: bytes, data: bytes, signature: bytes) -> bool:
            return False

    clock = Clock()
    a = honest(clock)
    skeptic = SwarmState(No(), clock=clock)
    skeptic.apply(a.state.diff())
    assert skeptic.snapshot() == ({}, {}, {})


def test_bytes_are_limited_per_peer() -> None:
    clock = Clock()
    limits = Limits(bytes_per_s=1000, byte_burst=5000)
    b = Replica(VERIFIER, Libp2pSigner(create_new_key_pair()), limits=limits, clock=clock)
    pull = SyncFrame(kind=SyncFrame.PULL, state_vector=b"\x00" * 2000)  # a state vector of garbage, 2 kB
    b.receive(pull, "flooder")
    b.receive(pull, "flooder")
    with pytest.raises(OverLimitError):
        b.receive(pull, "flooder")
    clock.now += 2.0
    b.receive(pull, "flooder")


def test_a_flood_of_fresh_identities_stops_at_the_member_cap_and_the_honest_still_update() -> None:
    clock = Clock()
    limits = Limits(max_members=5)
    a = Replica(VERIFIER, Libp2pSigner(create_new_key_pair()), limits=limits, clock=clock)
    a.set_member(Member(a.local_peer, lease_until=clock.now + 30))
    b = Replica(VERIFIER, Libp2pSigner(create_new_key_pair()), limits=limits, clock=clock)
    b.set_member(Member(b.local_peer, lease_until=clock.now + 30))
    converse(a, b)
    for _ in range(10):
        s = Stranger()
        s.maps["members"][s.signer.peer_id] = s.signed("member", clock.now + 30, Member(s.signer.peer_id))
        s.push(b)
    assert len(b.state.members()) == 5
    a.set_member(Member(a.local_peer, ("127.0.0.1:3",), lease_until=clock.now + 30))
    converse(a, b)
    assert b.state.members()[a.local_peer].addresses == ("127.0.0.1:3",)


def test_a_stranger_cannot_make_a_replica_swap_documents_at_its_pace() -> None:
    clock = Clock()
    a, b, c = swarm(clock)
    before = view(b)
    s = Stranger()
    s.push(b, epoch=int(clock.now) + 1, epoch_owner=s.signer.peer_id, full=True)  # adopted, entry by entry
    with pytest.raises(OverLimitError):
        s.push(b, epoch=int(clock.now) + 2, epoch_owner=s.signer.peer_id, full=True)
    assert b.epoch == (int(clock.now) + 1, s.signer.peer_id) and view(b) == before
    clock.now += b.limits.min_adopt_interval_s
    s.push(b, epoch=int(clock.now) + 2, epoch_owner=s.signer.peer_id, full=True)
    assert b.adopted == 2 and view(b) == before


def test_a_small_frame_does_not_buy_big_answers() -> None:
    clock = Clock()
    a = honest(clock)
    b = honest(clock, Limits(byte_burst=3 * len(a.state.diff())))
    converse(a, b)
    b.compact()
    behind = SyncFrame(kind=SyncFrame.PULL, epoch=0, state_vector=b"\x00")  # an older epoch: our whole document
    answers = 0
    with pytest.raises(OverLimitError):
        for _ in range(10):
            b.receive(behind, "leech")
            answers += 1
    assert 2 <= answers <= 4
