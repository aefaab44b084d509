"""The swarm's shared state as a pycrdt document, and the primitives to replicate it.

Three maps, each keyed by peer id and written only by that peer (pycrdt settles
concurrent writes to one key by client id, not by time, so two writers of one key would
make the winner arbitrary):

    members  peer id -> Member (addresses, model, span, capacity, throughput, version, lease)
    load     peer id -> Load   (active sessions, free KV-cache tokens, queue length)
    rtt      peer id -> {other peer id: milliseconds}

Any replica may delete a member whose lease expired (`reap`); an owner that is still alive
rewrites its record, and a write concurrent with a delete survives it.

Replication is by update bytes: `observe` hands every local change to a callback (eager
push), and `state_vector` / `diff` / `apply` give push-pull anti-entropy. Numbers come back
from pycrdt as floats, so every read casts.

The Doc is not thread-safe: one replica belongs to one thread (the node's asyncio loop).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pycrdt import Doc, Map, TransactionEvent

from crdt.errors import BadUpdateError, NotOwnerError

__all__ = ["Load", "Member", "SwarmState"]


@dataclass(frozen=True)
class Member:
    peer_id: str
    addresses: tuple[str, ...] = ()  # gRPC host:port
    model_id: str = ""  # "" for a bootstrap-only daemon
    start: int = 0  # layers [start, end) served (or being loaded, see `state`)
    end: int = 0
    capacity_bytes: int = 0  # memory for KV caches
    throughput: float = 0.0  # measured decode tokens/s through one block
    version: str = ""
    lease_until: float = 0.0  # unix seconds
    p2p_addresses: tuple[str, ...] = ()  # libp2p multiaddrs (for sync)
    num_layers: int = 0  # of the whole model
    max_layers: int = 0  # how many layers this peer can hold
    state: str = ""  # "serving", "loading" (a span it is moving to), "draining", or "" (no model)

    @classmethod
    def from_py(cls, value: Mapping[str, Any]) -> Member:
        return cls(
            peer_id=str(value["peer_id"]),
            addresses=tuple(str(a) for a in value.get("addresses", ())),
            model_id=str(value.get("model_id", "")),
            start=int(value.get("start", 0)),
            end=int(value.get("end", 0)),
            capacity_bytes=int(value.get("capacity_bytes", 0)),
            throughput=float(value.get("throughput", 0.0)),
            version=str(value.get("version", "")),
            lease_until=float(value.get("lease_until", 0.0)),
            p2p_addresses=tuple(str(a) for a in value.get("p2p_addresses", ())),
            num_layers=int(value.get("num_layers", 0)),
            max_layers=int(value.get("max_layers", 0)),
            state=str(value.get("state", "")),
        )

    def to_py(self) -> dict[str, Any]:
        data = asdict(self)
        data["addresses"] = list(self.addresses)
        data["p2p_addresses"] = list(self.p2p_addresses)
        return data


@dataclass(frozen=True)
class Load:
    active_sessions: int = 0
    free_kv_tokens: int = 0
    queue_length: int = 0

    @classmethod
    def from_py(cls, value: Mapping[str, Any]) -> Load:
        return cls(*(int(value.get(f, 0)) for f in ("active_sessions", "free_kv_tokens", "queue_length")))


@dataclass
class SwarmState:
    """One replica of the swarm state, owned by `local_peer`."""

    local_peer: str
    client_id: int | None = None
    doc: Doc = field(init=False)

    def __post_init__(self) -> None:
        self.doc = Doc(client_id=self.client_id) if self.client_id is not None else Doc()
        # Keep references to the maps: an observed Map must outlive its observers.
        self._members: Map = self.doc.get("members", type=Map)
        self._load: Map = self.doc.get("load", type=Map)
        self._rtt: Map = self.doc.get("rtt", type=Map)

    # -- writes (own keys only) --------------------------------------------------------------

    def set_member(self, member: Member) -> None:
        if member.peer_id != self.local_peer:
            raise NotOwnerError(f"{self.local_peer} may not write the member record of {member.peer_id}")
        self._members[member.peer_id] = member.to_py()

    def set_load(self, load: Load) -> None:
        self._load[self.local_peer] = asdict(load)

    def set_rtts(self, rtts_ms: Mapping[str, float]) -> None:
        self._rtt[self.local_peer] = {peer: float(ms) for peer, ms in rtts_ms.items()}

    def leave(self) -> None:
        """Remove our own records (a clean shutdown)."""
        with self.doc.transaction():
            for m in (self._members, self._load, self._rtt):
                if self.local_peer in m:
                    del m[self.local_peer]

    def reap(self, now: float) -> list[str]:
        """Delete every member whose lease ended before `now` (any replica may); returns them."""
        expired = [pid for pid, member in self.members().items() if member.lease_until < now]
        if expired:
            with self.doc.transaction():
                for pid in expired:
                    for m in (self._members, self._load, self._rtt):
                        if pid in m:
                            del m[pid]
        return expired

    # -- reads (cast: pycrdt returns numbers as floats) --------------------------------------

    def members(self) -> dict[str, Member]:
        return {pid: Member.from_py(value) for pid, value in (self._members.to_py() or {}).items()}

    def loads(self) -> dict[str, Load]:
        return {pid: Load.from_py(value) for pid, value in (self._load.to_py() or {}).items()}

    def rtts_ms(self) -> dict[str, dict[str, float]]:
        rows = self._rtt.to_py() or {}
        return {pid: {o: float(ms) for o, ms in row.items()} for pid, row in rows.items()}

    def snapshot(self) -> tuple[dict[str, Member], dict[str, Load], dict[str, dict[str, float]]]:
        return self.members(), self.loads(), self.rtts_ms()

    def rebuilt(self) -> SwarmState:
        """A new document (new client id) holding only the current values: no history, no tombstones."""
        members, loads, rtts = self.snapshot()
        fresh = SwarmState(self.local_peer)
        with fresh.doc.transaction():
            for pid, member in members.items():
                fresh._members[pid] = member.to_py()
            for pid, load in loads.items():
                fresh._load[pid] = asdict(load)
            for pid, row in rtts.items():
                fresh._rtt[pid] = dict(row)
        return fresh

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
        """Merge an update from a peer; applying one twice, or out of order, is harmless."""
        try:
            self.doc.apply_update(update)
        except Exception as e:  # pycrdt raises its own types for malformed input
            raise BadUpdateError(f"not a pycrdt update: {e}") from None

    def observe(self, on_update: Callable[[bytes], None]) -> Any:
        """Call `on_update(update_bytes)` after every transaction (for eager push)."""

        def handler(event: TransactionEvent) -> None:
            on_update(bytes(event.update))

        return self.doc.observe(handler)
