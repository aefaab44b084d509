"""The swarm key of a private swarm: a shared secret every member and client holds.

`moemesh keygen [PATH]` writes one (32 random bytes, hex, mode 0600; it never overwrites);
`--swarm-key FILE` on the daemon, `serve` and every client command uses it. Without it a
peer or client cannot join, read records or open sessions. From the one secret, HKDF-SHA256
derives a key per use, so no use can be turned against another:

- libp2p streams (`node.mesh.keyed`): at the start of every stream of our protocols (sync,
  record, tunnel), before a byte of the protocol, each side proves it holds the key with an
  HMAC over the protocol, both Noise-authenticated peer ids, its role and the opener's fresh
  nonce (the answerer's proof is bound to that nonce; the opener's is only seen by the
  answerer, inside Noise, and is bound to both ids, so it is worth nothing elsewhere).
- DHT values: every record is sealed with AES-256-GCM, its DHT key as associated data, so
  only members read records and a value without the key is refused by the validator; the
  provider keys (which peer serves which block) are HMACs of the public ones, so strangers
  cannot even find them.
- gRPC: each call carries metadata proving the key (`GRPC_METADATA`): an HMAC over the
  server's TLS certificate fingerprint, a time and a nonce; the server checks it before
  any work (`node.serve.gate`), refuses proofs more than `MAX_SKEW_S` old and each nonce twice.

- Kademlia (py-libp2p's): its streams take the same handshake as ours, both ways
  (`node.mesh.keyed.gate_kademlia`), so strangers neither ask the DHT nor store in it.

What it does not hide: that a libp2p host is there, its peer id and addresses, and what
identify and circuit relay tell.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.errors import ConfigError

__all__ = ["DEFAULT_PATH", "GRPC_METADATA", "MAX_SKEW_S", "SwarmKey", "generate_key_file"]

DEFAULT_PATH = Path("~/.config/moemesh/swarm.key")
GRPC_METADATA = "moemesh-swarm-proof"
MAX_SKEW_S = 120.0  # a gRPC proof older or newer than this is refused (clocks of volunteers drift)
_HEADER = "moemesh swarm key v1"
NONCE_BYTES = 16


def _hkdf(secret: bytes, info: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


def _mac(key: bytes, *parts: bytes | str) -> bytes:
    """HMAC-SHA256 over length-prefixed parts (no two part lists give the same bytes)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(4, "big") + data)
    return h.digest()


@dataclass(frozen=True)
class SwarmKey:
    """The shared secret and the keys derived from it."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != 32:
            raise ConfigError("a swarm key is 32 bytes")
        object.__setattr__(self, "_stream", _hkdf(self.secret, "moemesh stream proof v1"))
        object.__setattr__(self, "_grpc", _hkdf(self.secret, "moemesh grpc proof v1"))
        object.__setattr__(self, "_seal", _hkdf(self.secret, "moemesh dht seal v1"))
        object.__setattr__(self, "_provider", _hkdf(self.secret, "moemesh provider key v1"))

    @property
    def id(self) -> str:
        """A short public name of the key (to tell keys apart in logs; reveals nothing of it)."""
        return hashlib.sha256(b"moemesh swarm key id" + self.secret).hexdigest()[:12]

    @classmethod
    def load(cls, path: str | Path) -> SwarmKey:
        """The key in `path` (ConfigError when it is missing or not a swarm key)."""
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the swarm key {path}: {e.strerror}") from None
        lines = text.split()
        try:
            if len(lines) < 5 or " ".join(lines[:4]) != _HEADER:
                raise ValueError
            return cls(bytes.fromhex(lines[4]))
        except (ValueError, ConfigError):
            raise ConfigError(f"{path} is not a swarm key (make one with `moemesh keygen`)") from None

    # -- libp2p streams --------------------------------------------------------------------

    def stream_proof(self, role: str, protocol: str, opener: str, answerer: str, nonce: bytes) -> bytes:
        return _mac(self._stream, role, protocol, opener, answerer, nonce)  # type: ignore[attr-defined]

    # -- DHT values ------------------------------------------------------------------------

    def seal(self, dht_key: str, value: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        return nonce + AESGCM(self._seal).encrypt(nonce, value, dht_key.encode())  # type: ignore[attr-defined]

    def unseal(self, dht_key: str, sealed: bytes) -> bytes | None:
        """The value, or None when it was not sealed with this key for `dht_key`."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(sealed) < 12 + 16:
            return None
        try:
            return AESGCM(self._seal).decrypt(sealed[:12], sealed[12:], dht_key.encode())  # type: ignore[attr-defined,no-any-return]
        except InvalidTag:
            return None

    def provider_key(self, key: str) -> str:
        """The private name of a public provider key."""
        return "moemesh:private:" + _mac(self._provider, key).hex()[:32]  # type: ignore[attr-defined]

    # -- gRPC ------------------------------------------------------------------------------

    def grpc_proof(self, fingerprint: str, at: float | None = None) -> str:
        """Metadata value proving the key to the server whose TLS fingerprint is `fingerprint`."""
        ms = int((time.time() if at is None else at) * 1000)
        nonce = secrets.token_hex(NONCE_BYTES)
        mac = _mac(self._grpc, "grpc", fingerprint.lower(), str(ms), nonce).hex()  # type: ignore[attr-defined]
        return f"v1.{ms}.{nonce}.{mac}"

    def check_grpc_proof(self, value: str, fingerprint: str, now: float | None = None) -> tuple[str, float] | None:
        """(its nonce, its time) when `value` proves the key to us, else None."""
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit() or len(parts[1]) > 16:
            return None
        _, ms, nonce, mac = parts
        at = int(ms) / 1000
        if abs((time.time() if now is None else now) - at) > MAX_SKEW_S:
            return None
        want = _mac(self._grpc, "grpc", fingerprint.lower(), ms, nonce).hex()  # type: ignore[attr-defined]
        return (nonce, at) if hmac.compare_digest(want, mac) else None


def generate_key_file(path: str | Path) -> SwarmKey:
    """Write a new swarm key to `path` (mode 0600); ConfigError if the file exists."""
    path = Path(path).expanduser()
    key = SwarmKey(secrets.token_bytes(32))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: not overwriting a swarm key (remove it first)") from None
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{_HEADER}\n{key.secret.hex()}\n")
    return key
