"""One daemon's replica of the swarm state and the sync protocol's logic, without any I/O.

The transport (a libp2p stream) carries `SyncFrame`s; this module decides what to answer:

    eager push     local change  ->  PUSH(update)                      (no answer)
    anti-entropy   PULL(sv_a)  ->  ANSWER(diff(sv_a), sv_b)  ->  PUSH(diff(sv_b))

Compaction: deleted entries leave tombstones in the document (one range per writer ever
seen), so a long-lived swarm's document grows. When its encoding passes a bound, a replica
rebuilds the document from its verified view alone under the next epoch `(n, its peer id)`,
n = max(old n + 1, unix seconds now). Epochs are ordered, so concurrent compactions resolve
to one winner. A frame from a higher epoch is not merged: its sender is asked for (or
sends) its whole document, which the receiver adopts *entry by verified entry*: the new
document replaces the old one's history, but its view is the best of both views (see
`SwarmState.merge`), and what the new document lacks of it is written back. So adopting a
stranger's document can change no entry, and neither can an epoch: one above now +
`Limits.max_epoch_ahead_s` is refused (an epoch of 2^64 - 1 would otherwise win forever and
make the next compaction's epoch unencodable). A frame from a lower epoch is answered with
our whole document.

Per sending peer, frames are limited in size and rate, and bytes (received, and sent in
answer) per second (`Limits`); a replica adopts at most one epoch per
`Limits.min_adopt_interval_s`, so no peer can make the swarm swap documents at its pace.
A refused frame raises `OverLimitError` (a `BadUpdateError`) before its update is applied.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

from google.protobuf.message import DecodeError
from pycrdt import merge_updates

from crdt.entry import Limits, Signer, Verifier
from crdt.errors import BadUpdateError, OverLimitError
from crdt.state import Load, Member, SwarmState
from protocol.swarm_pb2 import SyncFrame

__all__ = ["Epoch", "Replica", "decode_frame", "encode_frame"]

log = logging.getLogger(__name__)

EMPTY_STATE_VECTOR = b"\x00"
MAX_EPOCH_OWNER = 128  # characters: a peer id
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


class _RateLimit:
    """Token buckets per sending peer, for frames and for bytes: a burst at once, a rate sustained."""

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self._buckets: dict[str, tuple[float, float, float]] = {}  # peer -> (frames, bytes, when)

    def _refilled(self, sender: str, now: float) -> tuple[float, float]:
        lim = self.limits
        frames, size, then = self._buckets.get(sender, (lim.frame_burst, lim.byte_burst, now))
        elapsed = max(0.0, now - then)
        return min(lim.frame_burst, frames + elapsed * lim.frames_per_s), min(
            lim.byte_burst, size + elapsed * lim.bytes_per_s
        )

    def take(self, sender: str, size: int) -> str | None:
        """Spend one frame and `size` bytes of `sender`'s budget; why not, when it cannot."""
        now = self.clock()
        if len(self._buckets) >= self.limits.max_senders and sender not in self._buckets:
            self._forget_idle(now)
        frames, budget = self._refilled(sender, now)
        if frames < 1.0:
            self._buckets[sender] = (frames, budget, now)
            return f"more than {self.limits.frames_per_s:g} frames/s"
        frames -= 1.0  # an oversized or over-budget frame still costs a frame
        refusal = None
        if size > self.limits.max_frame_bytes:
            refusal = f"a frame of {size} bytes, over {self.limits.max_frame_bytes}"
        elif size > budget:
            refusal = f"more than {self.limits.bytes_per_s} bytes/s"
        else:
            budget -= size
        self._buckets[sender] = (frames, budget, now)
        return refusal

    def charge(self, sender: str, size: int) -> None:
        """Spend `size` bytes of `sender`'s budget after the fact (an answer we send); it may go negative."""
        frames, budget = self._refilled(sender, self.clock())
        self._buckets[sender] = (frames, max(budget - size, -float(self.limits.byte_burst)), self.clock())

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that have refilled (their peers are not flooding); all of them if none has."""
        lim = self.limits
        full = [p for p in self._buckets if self._refilled(p, now) == (lim.frame_burst, lim.byte_burst)]
        for peer in full or list(self._buckets):
            del self._buckets[peer]


class Replica:
    """A `SwarmState` under an epoch, which answers sync frames and collects local updates.

    `verifier` checks every entry we take in; `signer` (our identity) signs what we write, and
    without one the replica only reads (a `status` client). `clock` gives unix seconds."""

    def __init__(
        self,
        verifier: Verifier,
        signer: Signer | None = None,
        *,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
        client_id: int | None = None,
    ) -> None:
        self.verifier = verifier
        self.signer = signer
        self.limits = limits or Limits()
        self.clock = clock
        self._client_id = client_id
        self.epoch: Epoch = (0, "")
        self._outbox: list[bytes] = []
        self._rate = _RateLimit(self.limits, clock)
        self.adopted = 0  # how many times we took another replica's epoch
        self._adopted_at = -math.inf  # when we last did
        self.refused = 0  # frames refused (over a limit, or from an epoch too far ahead)
        self._compacted_size = 0
        self.state = self._new_state(client_id)

    @property
    def local_peer(self) -> str:
        return self.state.local_peer

    def _new_state(self, client_id: int | None) -> SwarmState:
        state = SwarmState(self.verifier, self.signer, limits=self.limits, clock=self.clock, client_id=client_id)
        self._subscription = state.observe(self._collect)
        return state

    def _collect(self, update: bytes) -> None:
        self._outbox.append(update)

    # -- our own writes (signed; they survive an epoch change as every verified entry does) --

    def set_member(self, member: Member) -> None:
        self.state.set_member(member)

    def set_load(self, load: Load) -> None:
        self.state.set_load(load)

    def set_rtts(self, rtts_ms: Mapping[str, float]) -> None:
        self.state.set_rtts(rtts_ms)

    def leave(self) -> None:
        self.state.leave()

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

    def max_epoch(self) -> int:
        """The highest epoch generation we accept now."""
        return int(self.clock() + self.limits.max_epoch_ahead_s)

    def receive(self, frame: SyncFrame, sender: str = "") -> SyncFrame | None:
        """Merge what `frame` (from the peer `sender`) brings; return the frame to answer with, if any.

        The transport names `sender` (the authenticated remote peer id) for the per-peer rate
        limit; "" (unknown) is not rate limited, only size limited.

        Raises OverLimitError for a frame over a per-peer limit and BadUpdateError for one we
        refuse (an epoch too far ahead) or cannot apply; nothing of such a frame is applied."""
        self._check(frame, sender)
        answer = self._answer(frame)
        if answer is not None and sender:  # what we send counts too: a small frame must not buy a big answer
            self._rate.charge(sender, len(answer.update))
        return answer

    def _answer(self, frame: SyncFrame) -> SyncFrame | None:
        theirs: Epoch = (frame.epoch, frame.epoch_owner)
        if theirs < self.epoch:  # they are behind: whatever they asked, send the whole document
            return self.whole()
        if theirs > self.epoch:
            since = self.clock() - self._adopted_at
            if since < self.limits.min_adopt_interval_s:
                self.refused += 1
                raise OverLimitError(f"epoch {theirs} {since:.1f} s after the last one we adopted")
            if frame.full:
                self._adopt(theirs, frame.update)
                return None
            # Ask for their whole document: our frame is from a lower epoch, so they send it.
            return self._frame(SyncFrame.PULL, state_vector=EMPTY_STATE_VECTOR)
        if frame.update:
            self.state.apply(frame.update)
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

    def _check(self, frame: SyncFrame, sender: str) -> None:
        size = len(frame.update) + len(frame.state_vector)
        refusal: BadUpdateError | None = None
        over = self._rate.take(sender, size) if sender else None
        if over is not None:
            refusal = OverLimitError(f"{sender!r} sent {over}")
        elif size > self.limits.max_frame_bytes:
            refusal = OverLimitError(f"a frame of {size} bytes is over {self.limits.max_frame_bytes}")
        elif frame.epoch > self.max_epoch() or len(frame.epoch_owner) > MAX_EPOCH_OWNER:
            refusal = BadUpdateError(
                f"epoch {frame.epoch} of {frame.epoch_owner[:MAX_EPOCH_OWNER]!r} is not one we take"
            )
        if refusal is not None:
            self.refused += 1
            raise refusal

    def _adopt(self, epoch: Epoch, whole: bytes) -> None:
        old = self.state
        fresh = SwarmState(self.verifier, self.signer, limits=self.limits, clock=self.clock)  # a new client id
        fresh.reuse_verified(old)
        fresh.apply(whole)  # verifies entry by entry; raises BadUpdateError before we replace anything
        self.state = fresh
        self._outbox.clear()  # updates of the old document mean nothing in the new one
        self._subscription = fresh.observe(self._collect)
        fresh.merge(old)  # keeps every verified entry we held; what the new document lacks is pushed
        self.epoch = epoch
        self.adopted += 1
        self._adopted_at = self.clock()
        log.info("adopted swarm-state epoch %d (built by %s)", epoch[0], epoch[1] or "nobody")

    # -- compaction --------------------------------------------------------------------------

    def encoded_size(self) -> int:
        return len(self.state.diff())

    def compact(self) -> Epoch:
        """Rebuild the document from the verified view under the next epoch (ours); returns it."""
        fresh = self.state.rebuilt()
        epoch = (max(self.epoch[0] + 1, int(self.clock())), self.local_peer)
        self._adopt(epoch, fresh.diff())
        self.adopted -= 1  # our own epoch, not another replica's
        self._adopted_at = -math.inf
        return epoch

    def maybe_compact(self, bound_bytes: int) -> bool:
        """Compact when the document is past `bound_bytes`, and past twice its size after the last compaction
        (a swarm whose live values alone pass the bound would otherwise compact all the time). The values
        kept are verified entries only, at most three per member, each within `Limits.max_entry_bytes`:
        what a compaction leaves is bounded by the number of verified members."""
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
