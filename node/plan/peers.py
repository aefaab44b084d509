"""One view of "a peer serving a span", and the converters that build it from what peers say.

Routing (`node.plan.routing`) and placement (`node.plan.placement`) read only `PeerView`.
A peer speaks through three sources, each translated here and nowhere else:

- its signed DHT record (`protocol.mesh_pb2.PeerRecord`, one `ShardAd` per span it serves;
  node.mesh checks the signature before a record gets here): `peers_from_record`;
- its member entry in the replicated swarm state (`crdt.Member`): `peers_from_members`;
- its answer to Info (`protocol.shard_pb2.InfoResponse`), which also tells its limits and
  load: `peer_from_info`, giving a `PeerInfo`, a `PeerView` that carries those too.

Pure: no I/O, no torch; only the protobuf message classes are imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING

from protocol import PROTOCOL_VERSION, VersionMismatchError
from protocol.mesh_pb2 import PeerRecord, Reachability
from protocol.shard_pb2 import InfoResponse

if TYPE_CHECKING:
    from crdt import Member  # only read here: the SDK need not import pycrdt

__all__ = [
    "SERVING_STATES",
    "UNKNOWN_BLOCK_SECONDS",
    "PeerInfo",
    "PeerView",
    "check_version",
    "compatible",
    "direct_address",
    "peer_from_info",
    "peers_from_members",
    "peers_from_record",
]

# Compute time assumed for one block of a peer that has not measured its throughput: slow
# enough that a measured peer is preferred. When no peer is measured, every chain pays the
# same total, so round trips decide.
UNKNOWN_BLOCK_SECONDS = 1.0

SERVING_STATES = ("serving", "loading")  # member states that hold (or are about to hold) their span


@dataclass(frozen=True)
class PeerView:
    """A peer able to run layers [start, end) of one model: all that planning reads about it."""

    peer_id: str  # a stable key: the libp2p peer id, or the address when only that is known
    start: int
    end: int
    throughput: float = 0.0  # measured decode tokens/s through ONE block; 0: not measured
    _: KW_ONLY
    address: str = ""  # where its gRPC service answers (host:port); "" when not known
    model_id: str = ""
    num_layers: int = 0  # of the whole model
    rtt_s: float = 0.0  # measured network round trip to it; 0: not measured
    max_layers: int = 0  # how many layers it can hold; 0: its current span's length
    protocol_version: int | None = None  # None: the source does not say (the CRDT member)
    quantization: str = ""  # its weights: "none", "bf16", "int8", "int4"; "": the source does not say
    device: str = ""  # where it computes: "cpu", "cuda"; "": the source does not say
    block_bytes: int = 0  # bytes one block of its weights takes there; 0: not said

    @property
    def can_hold(self) -> int:
        """How many layers the peer can serve wherever placement puts it."""
        return self.max_layers or (self.end - self.start)

    @property
    def block_seconds(self) -> float:
        """Expected compute time of one block for one token."""
        return 1.0 / self.throughput if self.throughput > 0 else UNKNOWN_BLOCK_SECONDS


@dataclass(frozen=True, kw_only=True)
class PeerInfo(PeerView):
    """A peer as its own Info answer tells it: its span, and its limits and load right now."""

    model_name: str = ""
    vocab_size: int = 0
    max_length: int = 0  # the longest session it accepts
    version: str = ""  # software version
    active_sessions: int = 0
    draining: bool = False
    kv_free_bytes: int = 0
    batched_steps: int = 0  # decode steps it ran batched with other sessions' since it started
    decode_ms: float = 0.0  # its moving average of a decode step's compute time, from real steps (0: none yet)

    @property
    def live_throughput(self) -> float:
        """Tokens/s through one block, from its real decode steps (0: none yet)."""
        return max(self.end - self.start, 1) / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0


def direct_address(record: PeerRecord) -> str:
    """The gRPC address to dial the peer at directly, or "" when it is behind NAT (or names none)."""
    if record.reachability == Reachability.REACHABILITY_PRIVATE or not record.grpc_addresses:
        return ""
    return str(record.grpc_addresses[0])


def peers_from_record(
    peer_id: str, record: PeerRecord, model_id: str, *, address: str | None = None, rtt_s: float = 0.0
) -> list[PeerView]:
    """One view per span of `model_id` the record advertises.

    `address` is where the reader reaches the peer (a local tunnel, for a peer behind NAT);
    by default its direct address.
    """
    where = direct_address(record) if address is None else address
    return [
        PeerView(
            peer_id,
            ad.start,
            ad.end,
            ad.throughput,
            address=where,
            model_id=ad.model_id,
            num_layers=ad.num_layers,
            rtt_s=rtt_s,
            protocol_version=record.protocol_version,
            quantization=ad.quantization or "none",
            device=ad.device or "cpu",
            block_bytes=ad.block_bytes,
        )
        for ad in record.shards
        if ad.model_id == model_id
    ]


def peers_from_members(members: Mapping[str, Member], model_id: str, now: float) -> list[PeerView]:
    """The members serving (or loading) spans of `model_id`, with live leases (unix time `now`)."""
    return [
        PeerView(
            m.peer_id,
            m.start,
            m.end,
            m.throughput,
            address=m.addresses[0] if m.addresses else "",
            model_id=m.model_id,
            num_layers=m.num_layers,
            max_layers=m.max_layers,
        )
        for m in members.values()
        if m.model_id == model_id and m.state in SERVING_STATES and m.lease_until >= now and m.end > m.start
    ]


def peer_from_info(address: str, info: InfoResponse, rtt_s: float = 0.0) -> PeerInfo:
    """The peer at `address` as its Info answered (keyed by the address: Info names no peer id)."""
    return PeerInfo(
        address,
        info.start,
        info.end,
        address=address,
        model_id=info.model_id,
        num_layers=info.num_layers,
        rtt_s=rtt_s,
        protocol_version=info.protocol_version,
        quantization=info.quantization or "none",
        device=info.device or "cpu",
        block_bytes=info.block_bytes,
        model_name=info.model_name,
        vocab_size=info.vocab_size,
        max_length=info.capacity.max_length,
        version=info.version,
        active_sessions=info.capacity.active_sessions,
        draining=info.capacity.draining,
        kv_free_bytes=info.capacity.kv_free_bytes,
        batched_steps=info.capacity.batched_steps,
        decode_ms=info.capacity.decode_ms,
    )


def check_version(peer: PeerView) -> None:
    """Raise VersionMismatchError when the peer said it speaks another protocol version than ours."""
    if peer.protocol_version is not None and peer.protocol_version != PROTOCOL_VERSION:
        raise VersionMismatchError(peer.peer_id, peer.protocol_version, PROTOCOL_VERSION)


def compatible(peers: Sequence[PeerView]) -> tuple[list[PeerView], list[VersionMismatchError]]:
    """The peers we can talk to, and why each of the others cannot be used."""
    usable: list[PeerView] = []
    refused: list[VersionMismatchError] = []
    for p in peers:
        try:
            check_version(p)
        except VersionMismatchError as e:
            refused.append(e)
        else:
            usable.append(p)
    return usable, refused
