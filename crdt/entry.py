"""Signed entries of the swarm state: what one peer says about itself, and how a reader checks it.

Every value in the swarm state is a blob that its owner signed with its libp2p identity, so a
stranger who can write any key of the pycrdt document (pycrdt has no access control) still
cannot make a replica believe anything its owner did not say:

    blob     = msgpack [public key, payload, signature over DOMAIN + payload]
    payload  = msgpack {kind, peer_id, seq, lease_until, body}

`kind` ("member", "load", "rtt") is signed too, so a blob cannot move to another map; `seq`
orders one owner's blobs (a replayed older blob loses to a newer one); `lease_until` says
until when the owner vouches for it (and bounds how long a blob can outlive its owner).

`open_entry` is the one door from the network: it returns an `Entry` only for a blob that is
well formed, within `Limits` (sizes, lease horizon, numeric ranges), and signed by the peer id
it is keyed under, and raises `BadEntryError` for everything else. The signature check and
"does this public key belong to this peer id" are a `Verifier` given by the caller (the node
derives peer ids with libp2p, which `crdt` may not import); signing is a `Signer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from crdt.errors import BadEntryError

__all__ = ["KINDS", "Entry", "Limits", "Load", "Member", "Signer", "Verifier", "open_entry", "sign_entry"]

DOMAIN = b"moemesh/swarm-entry/1\n"  # so a signature made for another purpose cannot pass as an entry
KINDS = ("member", "load", "rtt")
MEMBER_STATES = ("", "serving", "loading", "draining")
MAX_PEER_ID = 128  # characters; a base58 libp2p peer id is about 52
MAX_TEXT = 256
MAX_ADDRESSES = 16
MAX_LAYERS = 1 << 16
MAX_COUNT = 1 << 40  # sessions, tokens, queue length
MAX_BYTES = 1 << 62
MAX_THROUGHPUT = 1e7  # decode tokens/s through one block; far above any real server
MAX_RTT_MS = 600_000.0
MAX_SEQ = (1 << 63) - 1


class Signer(Protocol):
    """Our identity: signs the entries we write."""

    @property
    def peer_id(self) -> str: ...

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


class Verifier(Protocol):
    """Checks that `public_key` is the key of `peer_id` and that `signature` is its signature of `data`.

    Must return False (never raise) for any bytes a stranger can send."""

    def verify(self, peer_id: str, public_key: bytes, data: bytes, signature: bytes) -> bool: ...


@dataclass(frozen=True)
class Limits:
    """What a replica accepts from peers; the defaults fit a swarm of thousands of members."""

    max_lease_ahead_s: float = 300.0  # a lease further ahead than this is refused (owners renew every lease/3)
    max_entry_bytes: int = 4096
    max_rtt_peers: int = 64  # an RTT entry names at most this many peers (we keep our nearest)
    max_epoch_ahead_s: float = 600.0  # a compaction epoch above now + this is refused
    min_adopt_interval_s: float = 10.0  # between two epochs we take from others
    max_frame_bytes: int = 4 << 20  # update + state vector of one sync frame
    frames_per_s: float = 20.0  # per sending peer, sustained
    frame_burst: int = 60  # per sending peer, at once
    bytes_per_s: int = 1 << 20  # per sending peer, sustained
    byte_burst: int = 8 << 20  # per sending peer, at once (two whole documents of the largest frame)
    max_members: int = 10_000  # entries of each kind a view holds; past it, new peer ids are not taken in
    max_senders: int = 4096  # rate buckets kept before idle ones are forgotten


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

    def body(self) -> dict[str, Any]:
        """The signed fields besides peer id and lease (those are in every entry's payload). Only the
        first MAX_ADDRESSES addresses of each kind are published (a host on many interfaces)."""
        return {
            "addresses": list(self.addresses[:MAX_ADDRESSES]),
            "model_id": self.model_id,
            "start": self.start,
            "end": self.end,
            "capacity_bytes": self.capacity_bytes,
            "throughput": float(self.throughput),
            "version": self.version,
            "p2p_addresses": list(self.p2p_addresses[:MAX_ADDRESSES]),
            "num_layers": self.num_layers,
            "max_layers": self.max_layers,
            "state": self.state,
        }

    @classmethod
    def from_body(cls, peer_id: str, lease_until: float, body: Mapping[str, Any]) -> Member:
        """Parse a signed body strictly: every field present, of its type, in its range."""
        start, end = _int(body, "start", MAX_LAYERS), _int(body, "end", MAX_LAYERS)
        num_layers = _int(body, "num_layers", MAX_LAYERS)
        if start > end or (num_layers and end > num_layers):
            raise BadEntryError(f"layers {start}:{end} of {num_layers} are not a span")
        state = _str(body, "state", MAX_TEXT)
        if state not in MEMBER_STATES:
            raise BadEntryError(f"unknown member state {state!r}")
        return cls(
            peer_id=peer_id,
            addresses=_strs(body, "addresses"),
            model_id=_str(body, "model_id", MAX_TEXT),
            start=start,
            end=end,
            capacity_bytes=_int(body, "capacity_bytes", MAX_BYTES),
            throughput=_float(body, "throughput", MAX_THROUGHPUT),
            version=_str(body, "version", MAX_TEXT),
            lease_until=lease_until,
            p2p_addresses=_strs(body, "p2p_addresses"),
            num_layers=num_layers,
            max_layers=_int(body, "max_layers", MAX_LAYERS),
            state=state,
        )


@dataclass(frozen=True)
class Load:
    active_sessions: int = 0
    free_kv_tokens: int = 0
    queue_length: int = 0
    decode_ms: float = 0.0  # moving average of a decode step's compute time, from real steps (0: none yet)

    def body(self) -> dict[str, Any]:
        return {
            "active_sessions": self.active_sessions,
            "free_kv_tokens": self.free_kv_tokens,
            "queue_length": self.queue_length,
            "decode_ms": self.decode_ms,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Load:
        sessions, free, queued = (
            _int(body, f, MAX_COUNT) for f in ("active_sessions", "free_kv_tokens", "queue_length")
        )
        decode_ms = _float(body, "decode_ms", MAX_RTT_MS) if "decode_ms" in body else 0.0  # older peers leave it out
        return cls(sessions, free, queued, decode_ms)


def _rtts_from_body(body: Mapping[str, Any], limits: Limits) -> dict[str, float]:
    if len(body) > limits.max_rtt_peers:
        raise BadEntryError(f"an RTT entry names {len(body)} peers, over the limit of {limits.max_rtt_peers}")
    out = {}
    for peer, ms in body.items():
        if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_ID:
            raise BadEntryError("an RTT entry names a peer that is not a peer id")
        out[peer] = _number(ms, f"rtt to {peer}", MAX_RTT_MS)
    return out


Value = Member | Load | dict[str, float]


@dataclass(frozen=True)
class Entry:
    """A verified entry; `blob` is what travels (peers relay it verbatim, they cannot re-sign it)."""

    kind: str
    peer_id: str
    seq: int
    lease_until: float
    value: Value
    blob: bytes

    def beats(self, other: Entry | None) -> bool:
        """The order every replica agrees on: higher seq wins; an owner that signed two blobs with one
        seq is settled by the bytes, so that replicas still converge."""
        return other is None or (self.seq, self.blob) > (other.seq, other.blob)

    def expired(self, now: float) -> bool:
        return self.lease_until < now


def sign_entry(signer: Signer, kind: str, seq: int, lease_until: float, value: Value) -> bytes:
    """The blob of our own entry (check it with `open_entry` before trusting it: limits apply to us too)."""
    if isinstance(value, Member | Load):
        body: dict[str, Any] = value.body()
    else:
        body = {peer: float(ms) for peer, ms in value.items()}
    payload = msgpack.packb(
        {"kind": kind, "peer_id": signer.peer_id, "seq": seq, "lease_until": float(lease_until), "body": body}
    )
    return bytes(msgpack.packb([signer.public_key, payload, signer.sign(DOMAIN + payload)]))


def open_entry(blob: object, kind: str, peer_id: str, verifier: Verifier, now: float, limits: Limits) -> Entry:
    """The verified entry in `blob`, found under `peer_id` in the map of `kind`; BadEntryError otherwise."""
    if not isinstance(blob, bytes | bytearray):
        raise BadEntryError(f"a {kind} value of {peer_id!r} is a {type(blob).__name__}, not a signed entry")
    blob = bytes(blob)
    if not 0 < len(peer_id) <= MAX_PEER_ID:
        raise BadEntryError(f"{peer_id[:MAX_PEER_ID]!r}... is not a peer id")
    if len(blob) > limits.max_entry_bytes:
        raise BadEntryError(f"a {kind} entry of {len(blob)} bytes is over the limit of {limits.max_entry_bytes}")
    outer = _unpack(blob)
    if not (isinstance(outer, list) and len(outer) == 3 and all(isinstance(p, bytes) for p in outer)):
        raise BadEntryError("not [public key, payload, signature]")
    public_key, payload, signature = outer
    if not verifier.verify(peer_id, public_key, DOMAIN + payload, signature):
        raise BadEntryError(f"a {kind} entry under {peer_id!r} is not signed by that peer")
    fields = _unpack(payload)
    if not isinstance(fields, dict):
        raise BadEntryError("the payload is not a map")
    if fields.get("kind") != kind or fields.get("peer_id") != peer_id:
        raise BadEntryError(f"a {fields.get('kind')!r} entry of {fields.get('peer_id')!r} under {kind} {peer_id!r}")
    seq = _int(fields, "seq", MAX_SEQ)
    lease_until = _float(fields, "lease_until", now + limits.max_lease_ahead_s)
    body = fields.get("body")
    if not isinstance(body, dict):
        raise BadEntryError("the body is not a map")
    value: Value
    if kind == "member":
        value = Member.from_body(peer_id, lease_until, body)
    elif kind == "load":
        value = Load.from_body(body)
    else:
        value = _rtts_from_body(body, limits)
    return Entry(kind, peer_id, seq, lease_until, value, blob)


# -- strict field readers (msgpack gives bool for true/false, and bool is an int in Python) -----


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # ExtraData and FormatError are ValueErrors
        raise BadEntryError(f"not msgpack: {e}") from None


def _int(fields: Mapping[str, Any], name: str, high: int) -> int:
    value = fields.get(name)
    if type(value) is not int or not 0 <= value <= high:
        raise BadEntryError(f"{name} is {value!r}, not an integer in [0, {high}]")
    return value


def _number(value: object, name: str, high: float) -> float:
    if not (type(value) is int or type(value) is float) or not math.isfinite(value) or not 0 <= value <= high:
        raise BadEntryError(f"{name} is {value!r}, not a number in [0, {high}]")
    return float(value)


def _float(fields: Mapping[str, Any], name: str, high: float) -> float:
    return _number(fields.get(name), name, high)


def _str(fields: Mapping[str, Any], name: str, max_len: int) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or len(value) > max_len:
        raise BadEntryError(f"{name} is not a string of at most {max_len} characters")
    return value


def _strs(fields: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = fields.get(name)
    if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
        raise BadEntryError(f"{name} is not a list of at most {MAX_ADDRESSES} strings")
    if not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in value):
        raise BadEntryError(f"{name} holds something other than short strings")
    return tuple(value)
