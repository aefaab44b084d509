"""A daemon's persistent Ed25519 identity: a key file created on first start, held under a lock;
and the signing and verifying of swarm-state entries with libp2p keys (`crdt.Signer`,
`crdt.Verifier`: `crdt` may not import libp2p, so the node gives it these).

Two daemons sharing one key would be one peer id to the swarm (each overwriting the other's
records), so a running daemon holds an exclusive lock on its key file: a second daemon given
the same `--identity` is refused, and one started without `--identity` takes the first free
default key (identity.key, identity-2.key, ...)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key, deserialize_public_key
from libp2p.peer.id import ID

from node.errors import ConfigError

__all__ = [
    "HeldIdentity",
    "Libp2pSigner",
    "Libp2pVerifier",
    "claim_identity",
    "default_identity_path",
    "ephemeral_identity",
    "load_or_create_identity",
]

MAX_DEFAULT_IDENTITIES = 64


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


class HeldIdentity:
    """A key pair whose key file this process holds locked until `release()`."""

    def __init__(self, key_pair: KeyPair, path: Path, created: bool, lock_fd: int) -> None:
        self.key_pair = key_pair
        self.path = path
        self.created = created
        self._lock_fd: int | None = lock_fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None


def _lock(path: Path) -> int | None:
    """An exclusive lock on `path`'s lock file (its fd), or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _holder(path: Path) -> str:
    try:
        return path.with_name(path.name + ".lock").read_text().strip() or "?"
    except OSError:
        return "?"


def claim_identity(path: Path | None) -> HeldIdentity:
    """Load (or create) and lock the identity at `path`; with None, the first free default one."""
    if path is not None:
        fd = _lock(path)
        if fd is None:
            raise ConfigError(
                f"{path} is in use by another daemon on this machine (pid {_holder(path)}):"
                " give each daemon its own --identity"
            )
        candidates = [path]
    else:
        first = default_identity_path()
        candidates = [first] + [first.with_name(f"identity-{n}.key") for n in range(2, MAX_DEFAULT_IDENTITIES + 1)]
        fd = None
        for path in candidates:
            fd = _lock(path)
            if fd is not None:
                break
        if fd is None:
            raise ConfigError(f"all {MAX_DEFAULT_IDENTITIES} default identities are in use: pass --identity")
    assert path is not None
    try:
        key_pair, created = load_or_create_identity(path)
    except BaseException:
        os.close(fd)
        raise
    return HeldIdentity(key_pair, path, created, fd)


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
