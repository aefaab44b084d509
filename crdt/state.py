"""The swarm's shared state as a pycrdt document of signed entries, and the primitives to replicate it.

Three maps, each keyed by peer id; every value is a blob its owner signed (see `crdt.entry`):

    members  peer id -> Member (addresses, model, span, capacity, throughput, version, lease)
    load     peer id -> Load   (active sessions, free KV-cache tokens, queue length)
    rtt      peer id -> {other peer id: milliseconds}

pycrdt has no access control: anyone who can send us an update can set or delete any key.
So the document is only the transport, and what a replica believes is its *view*: for each
key the best verified entry it has seen (highest seq; see `Entry.beats`). After every
applied update a replica settles each key of the document against its view:

    the document holds                    the replica
    a verified entry that beats the view  takes it into the view
    the view's entry                      does nothing
    an older entry, garbage, or nothing   writes the view's entry back ("repair"), unless that
                                          entry's lease expired: then the deletion is honoured
                                          and the key leaves the view (garbage is deleted too)

A write made after seeing another one supersedes it in pycrdt, so repairs win over the
writes they repair; replicas converge to the best entry of each key, and a stranger's
write never reaches `members()`, `loads()` or `rtts_ms()`. A repair is a write by a
replica other than the owner, which the one-writer rule of DESIGN.md allowed nobody: it is
safe here because every writer writes the same signed bytes, so the winner pycrdt picks
does not matter.

Any replica may delete an entry whose lease expired (`reap`); a clean leave signs our
entries again with an expired lease (a delete alone would be repaired by the others).
Load and RTT entries carry the lease of our member entry and are re-signed when it renews.

Replication is by update bytes: `observe` hands every local change (our writes and repairs,
not the updates we applied) to a callback, and `state_vector` / `diff` / `apply` give
push-pull anti-entropy.

The Doc is not thread-safe: one replica belongs to one thread (the node's asyncio loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

from pycrdt import Doc, Map, MapEvent, TransactionEvent

from crdt.entry import KINDS, Entry, Limits, Load, Member, Signer, Value, Verifier, open_entry, sign_entry
from crdt.errors import BadEntryError, BadUpdateError, NotOwnerError

__all__ = ["Load", "Member", "SwarmState"]

MAP_NAMES = {"member": "members", "load": "load", "rtt": "rtt"}
MAX_CACHE = 4 * 10_000  # verified blobs remembered (a few per member of a large swarm)


class SwarmState:
    """One replica of the swarm state; it writes only with `signer` (None: a read-only replica)."""

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
        self.doc: Doc = Doc(client_id=client_id) if client_id is not None else Doc()
        # Keep references to the maps: an observed Map must outlive its observers.
        self._maps: dict[str, Map] = {kind: self.doc.get(name, type=Map) for kind, name in MAP_NAMES.items()}
        self._view: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._opened: dict[bytes, Entry] = {}  # verified blobs (so that no signature is checked twice)
        self._seq = 0
        self._lease_until = 0.0  # of our member entry; load and RTT entries carry it too
        self._remote = False
        # The keys each applied update touched: settling looks at those only (not at every key).
        # None: all of that map's keys (pycrdt reports some deletions with no keys).
        self._touched: dict[str, set[str] | None] = {kind: set() for kind in KINDS}
        self._observers = [m.observe(partial(self._note_touched, kind)) for kind, m in self._maps.items()]

    def _note_touched(self, kind: str, event: MapEvent) -> None:
        if not self._remote:
            return
        keys = event.keys  # type: ignore[attr-defined]  # in __slots__, not annotated
        touched = self._touched[kind]
        if not keys or touched is None:
            self._touched[kind] = None
        else:
            touched.update(keys)

    def reuse_verified(self, other: SwarmState) -> None:
        """Share `other`'s memory of verified blobs (same verifier): taking in a document that holds
        the same entries then checks no signature twice."""
        self._opened = other._opened

    @property
    def local_peer(self) -> str:
        return self.signer.peer_id if self.signer is not None else ""

    # -- writes (own keys only, signed) ------------------------------------------------------

    def set_member(self, member: Member) -> None:
        if member.peer_id != self.local_peer or not member.peer_id:
            raise NotOwnerError(
                f"{self.local_peer or 'a read-only replica'} may not write the record of {member.peer_id}"
            )
        with self.doc.transaction():
            self._write("member", member.lease_until, member)
            if member.lease_until != self._lease_until:
                self._lease_until = member.lease_until
                self._resign(("load", "rtt"), member.lease_until)

    def set_load(self, load: Load) -> None:
        self._write("load", self._lease_until, load)

    def set_rtts(self, rtts_ms: Mapping[str, float]) -> None:
        """Our RTTs to other peers: the nearest `limits.max_rtt_peers` of them."""
        nearest = sorted(rtts_ms.items(), key=lambda item: item[1])[: self.limits.max_rtt_peers]
        self._write("rtt", self._lease_until, {peer: float(ms) for peer, ms in nearest})

    def leave(self) -> None:
        """Withdraw our entries (a clean shutdown): signed again with lease 0, so every replica reaps them."""
        with self.doc.transaction():
            self._resign(KINDS, 0.0)
        self._lease_until = 0.0

    def _resign(self, kinds: tuple[str, ...], lease_until: float) -> None:
        for kind in kinds:
            own = self._view[kind].get(self.local_peer)
            if own is not None and self.signer is not None:
                self._write(kind, lease_until, own.value)

    def _write(self, kind: str, lease_until: float, value: Value) -> None:
        if self.signer is None:
            raise NotOwnerError("a read-only replica writes nothing")
        if isinstance(value, Member):
            value = replace(value, lease_until=lease_until)
        self._seq = max(self._seq + 1, int(self.clock() * 1e6))  # monotonic across restarts too
        blob = sign_entry(self.signer, kind, self._seq, lease_until, value)
        entry = open_entry(blob, kind, self.local_peer, self.verifier, self.clock(), self.limits)  # limits bind us too
        self._view[kind][self.local_peer] = entry
        self._maps[kind][self.local_peer] = entry.blob

    def reap(self, now: float) -> list[str]:
        """Delete every entry whose lease ended before `now` (any replica may); returns their peers.

        First settles every key, not only those pycrdt reported changed (its events have missed
        a deletion): run once a round, this bounds how long a missed change can go unseen."""
        self._settle()
        expired = {(kind, pid) for kind in KINDS for pid, e in self._view[kind].items() if e.expired(now)}
        if expired:
            with self.doc.transaction():
                for kind, pid in expired:
                    del self._view[kind][pid]
                    if pid in self._maps[kind]:
                        del self._maps[kind][pid]
        return sorted({pid for _, pid in expired})

    # -- reads: the view, never the document -------------------------------------------------

    def members(self) -> dict[str, Member]:
        return {pid: e.value for pid, e in self._view["member"].items() if isinstance(e.value, Member)}

    def loads(self) -> dict[str, Load]:
        return {pid: e.value for pid, e in self._view["load"].items() if isinstance(e.value, Load)}

    def rtts_ms(self) -> dict[str, dict[str, float]]:
        return {pid: dict(e.value) for pid, e in self._view["rtt"].items() if isinstance(e.value, dict)}

    def snapshot(self) -> tuple[dict[str, Member], dict[str, Load], dict[str, dict[str, float]]]:
        return self.members(), self.loads(), self.rtts_ms()

    def entries(self) -> list[Entry]:
        """Every entry of the view (verified; expired ones until they are reaped)."""
        return [e for kind in KINDS for e in self._view[kind].values()]

    def live_members(self, now: float) -> int:
        return sum(1 for e in self._view["member"].values() if not e.expired(now))

    def rebuilt(self) -> SwarmState:
        """A new document (new client id) holding only the view's entries: no history, no tombstones."""
        fresh = SwarmState(self.verifier, self.signer, limits=self.limits, clock=self.clock)
        fresh.reuse_verified(self)
        fresh.merge(self)
        return fresh

    def merge(self, other: SwarmState) -> None:
        """Take `other`'s view into ours entry by entry (an epoch change): the best of each key wins,
        and whatever our document lacks of it is written into it (and so pushed to our peers)."""
        self._seq = max(self._seq, other._seq)
        if other.signer is not None and other.local_peer == self.local_peer:
            self._lease_until = max(self._lease_until, other._lease_until)
        for kind in KINDS:
            for pid, entry in other._view[kind].items():
                if entry.beats(self._view[kind].get(pid)):
                    self._view[kind][pid] = entry
        self._settle()

    # -- replication -------------------------------------------------------------------------

    def state_vector(self) -> bytes:
        return bytes(self.doc.get_state())

    def diff(self, remote_state_vector: bytes = b"\x00") -> bytes:
        """What the holder of `remote_state_vector` lacks (everything, by default)."""
        try:
            return bytes(self.doc.get_update(remote_state_vector))
        except Exception as e:  # pycrdt raises its own types for malformed input
            raise BadUpdateError(f"not a state vector: {e}") from None

    def apply(self, update: bytes) -> None:
        """Merge an update from a peer, then settle the keys it touched against the view (see the
        module's doc); applying one twice, or out of order, is harmless."""
        self._remote = True
        try:
            self.doc.apply_update(update)
        except Exception as e:  # pycrdt raises its own types for malformed input
            raise BadUpdateError(f"not a pycrdt update: {e}") from None
        finally:
            self._remote = False
            touched, self._touched = self._touched, {kind: set() for kind in KINDS}
        for kind, keys in touched.items():  # pycrdt's events can miss a deletion: compare the key sets too
            if keys is not None:
                keys.update(set(self._maps[kind].keys()).symmetric_difference(self._view[kind]))
        self._settle(touched)

    def observe(self, on_update: Callable[[bytes], None]) -> Any:
        """Call `on_update(update_bytes)` after every local transaction (for eager push)."""

        def handler(event: TransactionEvent) -> None:
            if not self._remote:
                on_update(bytes(event.update))

        return self.doc.observe(handler)

    # -- settling the document against the view ---------------------------------------------

    def _settle(self, keys: Mapping[str, set[str] | None] | None = None) -> None:
        """Settle `keys` (per kind, None: all) of the document against the view."""
        now = self.clock()
        repairs: list[tuple[str, str, bytes | None]] = []  # (kind, key, blob to write, or None: delete)
        for kind in KINDS:
            doc, view = self._maps[kind], self._view[kind]
            some = keys[kind] if keys is not None else None
            for pid in some if some is not None else set(doc.keys()) | set(view):
                raw = doc.get(pid)
                found = self._open(raw, kind, pid, now) if raw is not None else None
                best = view.get(pid)
                if found is not None and found.beats(best):
                    if best is None and len(view) >= self.limits.max_members:
                        continue  # full: a flood of fresh identities is not taken in (nor repaired)
                    view[pid] = found
                elif found is not None and found.blob == best.blob:  # type: ignore[union-attr]
                    continue
                elif best is not None and (found is not None or not best.expired(now)):
                    repairs.append((kind, pid, best.blob))  # older, garbage or deleted while its lease lives
                elif best is not None:  # expired and deleted: the deletion is honoured
                    del view[pid]
                    if raw is not None:
                        repairs.append((kind, pid, None))
                elif raw is not None:  # garbage under a key nobody holds an entry for
                    repairs.append((kind, pid, None))
        if repairs:
            with self.doc.transaction():
                for kind, pid, blob in repairs:
                    if blob is not None:
                        self._maps[kind][pid] = blob
                    elif pid in self._maps[kind]:
                        del self._maps[kind][pid]

    def _open(self, raw: object, kind: str, pid: str, now: float) -> Entry | None:
        if not isinstance(raw, bytes | bytearray):
            return None
        blob = bytes(raw)
        known = self._opened.get(blob)
        if known is not None:
            return known if (known.kind, known.peer_id) == (kind, pid) else None
        try:
            entry = open_entry(blob, kind, pid, self.verifier, now, self.limits)
        except BadEntryError:
            return None  # not remembered: garbage is deleted at once, and must not crowd out the verified
        if len(self._opened) >= MAX_CACHE:
            self._opened.clear()
        self._opened[blob] = entry
        return entry
