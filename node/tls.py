"""TLS for the gRPC service: the server's self-signed certificate and the client's pin on it.

A peer proves it is the peer of a signed record by answering TLS with the certificate whose
SHA-256 fingerprint that record carries (`PeerRecord.tls_fingerprint`). No certificate
authority is involved: the fingerprint is the trust.

- A server makes a fresh ECDSA P-256 certificate at start (`make_certificate`); its
  fingerprint goes into its record and its ready line (`moemesh serve` prints it).
- A client that knows the fingerprint (from a verified record, or `host:port#fingerprint`)
  fetches the server's certificate once over a plain TLS handshake, refuses it unless its
  fingerprint is the pinned one, and then dials gRPC with that certificate as the channel's
  only root and a fixed target name. A connection answered by anyone without the
  certificate's private key fails the handshake, so the fetch-then-dial gap is no hole.
- Without a pin the client trusts the first certificate it sees, and says so (TOFU).
- Through a tunnel the same TLS bytes are piped end to end: the relay sees ciphertext.
- A peer behind NAT is named by its libp2p peer id where others must reach it over a tunnel
  of their own (a push target: `p2p:<peer-id>#fingerprint`, `p2p_address`); host:port
  parsing refuses that form (no numeric port), so only code that knows it dials it.

Plaintext is for a trusted LAN only (`--insecure-lan` on both ends). Generating a
certificate imports `cryptography`; pinning needs only the standard library and grpc.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from node.errors import ConfigError, PeerUnavailable, PeerUntrusted

__all__ = [
    "TLS_NAME",
    "Certificate",
    "channel_credentials",
    "fetch_certificate",
    "fingerprint_of",
    "make_certificate",
    "normalize_fingerprint",
    "p2p_address",
    "p2p_peer",
    "pinned_channel",
    "split_pin",
]

log = logging.getLogger(__name__)
TLS_NAME = "moemesh.peer"  # the certificate's only name; clients override the target name with it
_HEX = set("0123456789abcdef")
P2P = "p2p:"  # an address naming a libp2p peer id instead of host:port
_BASE58 = set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


@dataclass(frozen=True)
class Certificate:
    """A server's TLS certificate and key (PEM), and the fingerprint its record announces."""

    cert_pem: bytes
    key_pem: bytes = b""
    fingerprint: str = ""  # hex SHA-256 of the DER certificate

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def fingerprint_of(der: bytes) -> str:
    """The fingerprint of a DER certificate: lowercase hex SHA-256 (64 characters)."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept `ab:cd:...`, upper case and a `sha256:` prefix; ConfigError unless 32 bytes of hex."""
    fp = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(fp) != 64 or not set(fp) <= _HEX:
        raise ConfigError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits)")
    return fp


def split_pin(peer: str) -> tuple[str, str]:
    """`host:port#fingerprint` -> (host:port, fingerprint); the fingerprint is "" when not given."""
    address, sep, fp = peer.partition("#")
    return address, normalize_fingerprint(fp) if sep else ""


def p2p_address(peer_id: str, pin: str = "") -> str:
    """`p2p:<peer-id>#fingerprint`: the peer reached over libp2p (a tunnel), TLS pinned inside it."""
    return f"{P2P}{peer_id}#{pin}" if pin else f"{P2P}{peer_id}"


def p2p_peer(target: str) -> str | None:
    """The peer id a `p2p:<peer-id>` target names (None for host:port); ConfigError when malformed."""
    if not target.startswith(P2P):
        return None
    peer_id = target[len(P2P) :]
    if not 40 <= len(peer_id) <= 64 or not set(peer_id) <= _BASE58:
        raise ConfigError(f"{target[:80]!r} does not name a libp2p peer id")
    return peer_id


def make_certificate(valid_days: int = 365) -> Certificate:
    """A fresh self-signed ECDSA P-256 certificate for `TLS_NAME` (made at each start: the record
    carries its fingerprint, so nothing needs to outlive the process)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # a peer whose clock is a little behind
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)  # its own trust anchor
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Certificate(
        cert.public_bytes(serialization.Encoding.PEM),
        key_pem,
        fingerprint_of(cert.public_bytes(serialization.Encoding.DER)),
    )


def fetch_certificate(address: str, timeout_s: float = 10.0) -> bytes:
    """The DER certificate the TLS server at `address` (host:port) presents, unverified: the caller
    checks its fingerprint. PeerUnavailable when nothing answers TLS there."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the fingerprint, not a CA, decides
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=TLS_NAME) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as e:  # refused, reset, timed out, or no TLS there (a plaintext server)
        raise PeerUnavailable(address, f"no TLS answer: {e}") from None
    if not der:
        raise PeerUnavailable(address, "the TLS server presented no certificate")
    return der


def channel_credentials(address: str, pin: str, timeout_s: float = 10.0) -> tuple[grpc.ChannelCredentials, str]:
    """Credentials that accept only the certificate of the server at `address` whose fingerprint
    is `pin` ("" : trust the one it presents now, with a warning). Returns them with the
    fingerprint they trust. PeerUntrusted when the certificate does not match the pin."""
    der = fetch_certificate(address, timeout_s)
    seen = fingerprint_of(der)
    if pin and seen != pin:
        raise PeerUntrusted(address, f"its TLS certificate {seen[:16]}… is not the pinned {pin[:16]}…")
    if not pin:
        log.warning("trusting %s on first use: certificate %s (pass %s#%s to pin it)", address, seen, address, seen)
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    return grpc.ssl_channel_credentials(root_certificates=pem), seen


def pinned_channel(
    address: str, pin: str, options: Sequence[tuple[str, object]] = (), timeout_s: float = 10.0
) -> grpc.Channel:
    """A gRPC channel to `address` that talks only to the holder of the certificate `pin` names."""
    credentials, _ = channel_credentials(address, pin, timeout_s)
    return grpc.secure_channel(address, credentials, options=[*options, ("grpc.ssl_target_name_override", TLS_NAME)])
