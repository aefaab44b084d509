"""One daemon's replica of the swarm state and the sync protocol's logic, without any I/O.

The transport (a libp2p stream) carries `SyncFrame`s; this module decides what to answer:

    eager push     local change  ->  PUSH(update)                      (no answer)
    anti-entropy   PULL(sv_a)  ->  ANSWER(diff(sv_a), sv_b)  ->  PUSH(diff(sv_b))

Compaction: deleted entries leave tombstones in the document (one range per writer ever
seen), so a long-lived swarm's document grows. When its encoding passes a bound, a replica
rebuilds the document from the current values alone under the next epoch `(n + 1, its
peer id)`. Epochs are ordered, so concurrent compactions resolve to one winner. A frame
from a higher epoch is not merged: its sender is asked for (or sends) its whole document,
which the receiver adopts, then it rewrites its own records (the owner's word is final;
writes that the compacting replica had not seen come back this way). A frame from a lower
epoch is answered with our whole document.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from pycrdt import merge_updates

from crdt.errors import BadUpdateError
from crdt.state import Load, Member, SwarmState
from protocol.swarm_pb2 import SyncFrame

__all__ = ["Epoch", "Replica", "decode_frame", "encode_frame"]

log = logging.getLogger(__name__)

EMPTY_STATE_VECTOR = b"\x00"
Epoch = tuple[int, str]  # (generation, peer that built it); compared as a tuple


def encode_frame(frame: SyncFrame) -> bytes:
    return frame.SerializeToString()


def decode_frame(data: bytes) -> SyncFrame:
    frame = SyncFrame()
    try:
        frame.ParseFromString(data)
    except DecodeError as e:
        raise BadUpdateError(f"not a sync frame: {e}") from None
    if frame.kind not in SyncFrame.Kind.values():
        raise BadUpdateError(f"unknown sync frame kind {frame.kind}")
    return frame


@dataclass
class _Own:
    """Our own records, rewritten into every document we adopt."""

    member: Member | None = None
    load: Load | None = None
    rtts: Mapping[str, float] | None = None


class Replica:
    """A `SwarmState` under an epoch, which answers sync frames and collects local updates."""

    def __init__(self, local_peer: str, client_id: int | None = None) -> None:
        self.local_peer = local_peer
        self._client_id = client_id
        self.epoch: Epoch = (0, "")
        self._own = _Own()
        self._outbox: list[bytes] = []
        self._applying = False
        self.adopted = 0  # how many times we took another replica's epoch
        self._compacted_size = 0
        self.state = self._new_state()

    def _new_state(self) -> SwarmState:
        state = SwarmState(self.local_peer, self._client_id)
        self._subscription = state.observe(self._collect)
        return state

    def _collect(self, update: bytes) -> None:
        if not self._applying:
            self._outbox.append(update)

    # -- our own writes (remembered, so that they survive an epoch change) -------------------

    def set_member(self, member: Member) -> None:
        self.state.set_member(member)
        self._own.member = member

    def set_load(self, load: Load) -> None:
        self.state.set_load(load)
        self._own.load = load

    def set_rtts(self, rtts_ms: Mapping[str, float]) -> None:
        self.state.set_rtts(rtts_ms)
        self._own.rtts = dict(rtts_ms)

    def leave(self) -> None:
        self.state.leave()
        self._own = _Own()

    def reap(self, now: float) -> list[str]:
        return self.state.reap(now)

    def take_outbox(self) -> bytes | None:
        """Our local changes since the last call, merged into one update (None when there are none)."""
        if not self._outbox:
            return None
        updates, self._outbox = self._outbox, []
        return updates[0] if len(updates) == 1 else bytes(merge_updates(*updates))

    # -- frames ------------------------------------------------------------------------------

    def _frame(self, kind: int, **fields: object) -> SyncFrame:
        return SyncFrame(kind=kind, epoch=self.epoch[0], epoch_owner=self.epoch[1], **fields)  # type: ignore[arg-type]

    def push(self, update: bytes) -> SyncFrame:
        return self._frame(SyncFrame.PUSH, update=update)

    def pull(self) -> SyncFrame:
        """The opening frame of an anti-entropy exchange."""
        return self._frame(SyncFrame.PULL, state_vector=self.state.state_vector())

    def whole(self) -> SyncFrame:
        return self._frame(SyncFrame.PUSH, update=self.state.diff(), full=True)

    def receive(self, frame: SyncFrame) -> SyncFrame | None:
        """Merge what `frame` brings; return the frame to answer with, if any."""
        theirs: Epoch = (frame.epoch, frame.epoch_owner)
        if theirs < self.epoch:  # they are behind: whatever they asked, send the whole document
            return self.whole()
        if theirs > self.epoch:
            if frame.full:
                self._adopt(theirs, frame.update)
                return None
            # Ask for their whole document: our frame is from a lower epoch, so they send it.
            return self._frame(SyncFrame.PULL, state_vector=EMPTY_STATE_VECTOR)
        if frame.update:
            self._apply(frame.update)
        if frame.kind == SyncFrame.PULL:
            return self._frame(
                SyncFrame.ANSWER,
                update=self.state.diff(frame.state_vector),
                state_vector=self.state.state_vector(),
            )
        if frame.kind == SyncFrame.ANSWER:
            missing = self.state.diff(frame.state_vector)
            return self.push(missing) if _carries_anything(missing) else None
        return None

    def _apply(self, update: bytes) -> None:
        self._applying = True
        try:
            self.state.apply(update)
        finally:
            self._applying = False

    def _adopt(self, epoch: Epoch, whole: bytes) -> None:
        fresh = SwarmState(self.local_peer, None)  # a new client id: ours may exist in that document already
        fresh.apply(whole)  # raises BadUpdateError before we replace anything
        self.state = fresh
        self._subscription = fresh.observe(self._collect)
        self._outbox.clear()  # updates of the old document mean nothing in the new one
        self.epoch = epoch
        self.adopted += 1
        log.info("adopted swarm-state epoch %d (built by %s)", epoch[0], epoch[1] or "nobody")
        self._rewrite_own()

    def _rewrite_own(self) -> None:
        with self.state.doc.transaction():
            if self._own.member is not None:
                self.state.set_member(self._own.member)
            if self._own.load is not None:
                self.state.set_load(self._own.load)
            if self._own.rtts is not None:
                self.state.set_rtts(self._own.rtts)

    # -- compaction --------------------------------------------------------------------------

    def encoded_size(self) -> int:
        return len(self.state.diff())

    def compact(self) -> Epoch:
        """Rebuild the document from current values under the next epoch (ours); returns it."""
        fresh = self.state.rebuilt()
        epoch = (self.epoch[0] + 1, self.local_peer)
        self._adopt(epoch, fresh.diff())
        self.adopted -= 1  # our own epoch, not another replica's
        return epoch

    def maybe_compact(self, bound_bytes: int) -> bool:
        """Compact when the document is past `bound_bytes`, and past twice its size after the last compaction
        (a swarm whose live values alone pass the bound would otherwise compact all the time)."""
        size = self.encoded_size()
        if size <= max(bound_bytes, 2 * self._compacted_size):
            return False
        before = self.epoch
        self.compact()
        after = self._compacted_size = self.encoded_size()
        log.info("compacted the swarm state: %d -> %d bytes, epoch %s -> %s", size, after, before, self.epoch)
        return True


def _carries_anything(update: bytes) -> bool:
    """An update with no structs and no deletions encodes as two zero counts."""
    return update not in (b"", b"\x00\x00")
