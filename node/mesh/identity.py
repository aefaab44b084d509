"""A daemon's persistent Ed25519 identity (a key file created on first start), and the signing and
verifying of swarm-state entries with libp2p keys (`crdt.Signer`, `crdt.Verifier`: `crdt` may not
import libp2p, so the node gives it these)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key, deserialize_public_key
from libp2p.peer.id import ID

from node.errors import ConfigError

__all__ = ["Libp2pSigner", "Libp2pVerifier", "default_identity_path", "ephemeral_identity", "load_or_create_identity"]


def default_identity_path() -> Path:
    root = os.environ.get("MOEMESH_HOME") or Path.home() / ".config" / "moemesh"
    return Path(root) / "identity.key"


def ephemeral_identity() -> KeyPair:
    return create_new_key_pair()


def load_or_create_identity(path: Path) -> tuple[KeyPair, bool]:
    """Return (key pair, created); the file holds the libp2p-serialized private key, mode 0600."""
    if path.exists():
        try:
            private = deserialize_private_key(path.read_bytes())
        except Exception as e:  # the library raises several types for a malformed key
            raise ConfigError(
                f"{path}: not a libp2p private key ({e}); move it away to create a new identity"
            ) from None
        return KeyPair(private, private.get_public_key()), False
    key_pair = create_new_key_pair()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pair.private_key.serialize())
    tmp.rename(path)
    return key_pair, True


class Libp2pSigner:
    """Signs our swarm-state entries with the host's key; the public key travels libp2p-serialized."""

    def __init__(self, key_pair: KeyPair) -> None:
        self._private = key_pair.private_key
        self.public_key = key_pair.public_key.serialize()
        self.peer_id = ID.from_pubkey(key_pair.public_key).to_base58()

    @classmethod
    def of_host(cls, host: Any) -> Libp2pSigner:
        """The signer of a libp2p host (the identity its peer id is derived from)."""
        return cls(KeyPair(host.get_private_key(), host.get_public_key()))

    def sign(self, data: bytes) -> bytes:
        return bytes(self._private.sign(data))


class Libp2pVerifier:
    """An entry is believed when its key is an Ed25519 libp2p key, the peer id derived from that key is
    the one the entry is keyed under, and the signature checks; any other bytes are simply False."""

    def verify(self, peer_id: str, public_key: bytes, data: bytes, signature: bytes) -> bool:
        try:
            key = deserialize_public_key(public_key)
        except (ValueError, DecodeError):  # PyNaCl's errors are ValueErrors too
            return False
        if key.get_type() != KeyType.Ed25519 or ID.from_pubkey(key).to_base58() != peer_id:
            return False
        try:
            return bool(key.verify(data, signature))
        except ValueError:  # a signature of the wrong length
            return False
