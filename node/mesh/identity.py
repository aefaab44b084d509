"""A daemon's persistent Ed25519 identity: a key file created on first start."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key

from node.errors import ConfigError

__all__ = ["default_identity_path", "ephemeral_identity", "load_or_create_identity"]


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
