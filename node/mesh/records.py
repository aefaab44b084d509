"""Signed peer records: what a daemon publishes in the DHT, and how readers check it.

A record is only believed when its public key hashes to its peer id, that peer id is the
one its DHT key names, the signature over the domain-separated bytes verifies, it has not
expired and it is not a withdrawal. Everything else is ignored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from google.protobuf.message import DecodeError
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from node.errors import InvalidRecord
from node.swarmkey import SwarmKey
from protocol import PROTOCOL_VERSION, software_version
from protocol.mesh_pb2 import PeerRecord, Reachability, ShardAd, SignedPeerRecord

__all__ = [
    "ALL_PEERS_KEY",
    "NAMESPACE",
    "RecordValidator",
    "block_key",
    "is_live",
    "make_record",
    "now_ms",
    "peer_id_of",
    "peer_key",
    "sign_record",
    "unseal_record",
    "verify_record",
]

NAMESPACE = "moemesh"
DOMAIN = b"moemesh-peer-record:"
ALL_PEERS_KEY = "moemesh:peers"  # provider key every daemon announces (for `moemesh status`)


def now_ms() -> int:
    return int(time.time() * 1000)


def peer_key(peer_id: str) -> str:
    """DHT value key of a peer's record."""
    return f"/{NAMESPACE}/peer/{peer_id}"


def block_key(model_id: str, block: int) -> str:
    """DHT provider key of one block of one model."""
    return f"{NAMESPACE}:{model_id}:{block}"


def peer_id_of(record: PeerRecord) -> str:
    return ID(record.peer_id).to_base58()


def make_record(
    key_pair: KeyPair,
    *,
    grpc_addresses: Sequence[str],
    p2p_addresses: Sequence[str],
    shards: Sequence[ShardAd],
    ttl_s: float,
    seq: int,
    withdrawn: bool = False,
    reachability: Reachability = Reachability.REACHABILITY_UNKNOWN,
    circuit_addresses: Sequence[str] = (),
    relay: bool = False,
    tls_fingerprint: str = "",
) -> PeerRecord:
    issued = now_ms()
    return PeerRecord(
        peer_id=ID.from_pubkey(key_pair.public_key).to_bytes(),
        public_key=key_pair.public_key.serialize(),
        grpc_addresses=list(grpc_addresses),
        p2p_addresses=list(p2p_addresses),
        shards=list(shards),
        protocol_version=PROTOCOL_VERSION,
        software_version=software_version(),
        seq=seq,
        issued_at_ms=issued,
        expires_at_ms=issued + int(ttl_s * 1000),
        withdrawn=withdrawn,
        reachability=reachability,
        circuit_addresses=list(circuit_addresses),
        relay=relay,
        tls_fingerprint=tls_fingerprint,
    )


def sign_record(record: PeerRecord, key_pair: KeyPair) -> bytes:
    body = record.SerializeToString()
    return SignedPeerRecord(record=body, signature=key_pair.private_key.sign(DOMAIN + body)).SerializeToString()


def verify_record(data: bytes, *, peer_id: str | None = None) -> PeerRecord:
    """Parse and check a signed record (not its freshness: see `is_live`)."""
    try:
        signed = SignedPeerRecord.FromString(data)
        record = PeerRecord.FromString(signed.record)
    except DecodeError:
        raise InvalidRecord("not a signed peer record") from None
    try:
        public_key = deserialize_public_key(record.public_key)
    except Exception:  # the library raises several types for a malformed key
        raise InvalidRecord("the record's public key is malformed") from None
    if ID.from_pubkey(public_key).to_bytes() != record.peer_id:
        raise InvalidRecord("the record's public key does not belong to its peer id")
    if peer_id is not None and peer_id_of(record) != peer_id:
        raise InvalidRecord(f"record of {peer_id_of(record)} published under {peer_id}")
    if not public_key.verify(DOMAIN + signed.record, signed.signature):
        raise InvalidRecord(f"bad signature on the record of {peer_id_of(record)}")
    return record


def is_live(record: PeerRecord, at_ms: int | None = None) -> bool:
    return not record.withdrawn and record.expires_at_ms > (now_ms() if at_ms is None else at_ms)


def unseal_record(key: str, value: bytes, swarm_key: SwarmKey | None) -> bytes:
    """The signed record in a DHT value: in a private swarm, opened with the swarm key."""
    if swarm_key is None:
        return value
    opened = swarm_key.unseal(key, value)
    if opened is None:
        raise InvalidRecord(f"the value under {key} is not sealed with our swarm key")
    return opened


class RecordValidator(Validator):
    """DHT validator for /moemesh/peer/<id>: only verified records; the highest seq wins.

    In a private swarm (`swarm_key`) the values are sealed records (node.swarmkey): a value
    not sealed with our key is refused."""

    def __init__(self, swarm_key: SwarmKey | None = None) -> None:
        self.swarm_key = swarm_key

    def validate(self, key: str, value: bytes) -> None:
        prefix = f"/{NAMESPACE}/peer/"
        if not key.startswith(prefix):
            raise InvalidRecord(f"unknown key {key!r}")
        verify_record(unseal_record(key, value, self.swarm_key), peer_id=key[len(prefix) :])

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, value in enumerate(values):
            try:
                seq = verify_record(unseal_record(key, value, self.swarm_key)).seq
            except InvalidRecord:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best
