"""Errors raised by the node: the client SDK, the server, the mesh and the CLI.

Every error type of node/ is defined here. The root, `MoemeshError`, is in protocol/errors.py.

MoemeshError
├── ConfigError            a bad option or argument (the CLI prints it and exits 2)
├── RouteError             no chain of the known peers covers every layer (names the gap)
├── SessionClosed          we closed the session: it takes no more steps
├── TokenizerError         no usable tokenizer: no model folder, and the peers' were missing or bad
├── Stopped                a stop (a signal) was requested before the work it cut short was done
├── ApiError               the HTTP API refuses a request: its status and OpenAI error type kept
├── RequestError           the server will not serve a request; the gRPC edge (node.serve.service)
│   │                      maps each kind to the status it answers with
│   ├── InvalidRequest     malformed input: dtype, shape, bytes, too many tokens     INVALID_ARGUMENT
│   ├── WrongModel         the request names another model                           NOT_FOUND
│   ├── OutOfRange         layers outside the span, a session past its max length    OUT_OF_RANGE
│   ├── Overloaded         no room: sessions, KV cache budget                        RESOURCE_EXHAUSTED
│   ├── SessionStateError  no session open on the stream, closed, or already open    FAILED_PRECONDITION
│   ├── Draining           shutting down: open the session (or move it) elsewhere    UNAVAILABLE
│   └── IdleTimeout        the session sat idle too long and was closed              DEADLINE_EXCEEDED
├── PeerError              talking to a peer failed
│   ├── PeerUnavailable    the peer broke it: unreachable, or the connection broke
│   ├── PeerTimeout        it timed out: no answer before the deadline
│   ├── PeerUntrusted      it is not the peer we expected: its TLS certificate is not the pinned one
│   ├── PeerLied           a spot-check found its outputs wrong (another peer computed others)
│   ├── PeerRefused        it answered with an error status (code and message kept)
│   ├── PushNotDelivered   it could not push a step on to the next hop (the client relays it)
│   └── PeerSlow           it answers, but several times slower than it did: the session moves off it
├── MeshError              the libp2p side: no bootstrap peer reachable, a DHT operation failed
│   ├── InvalidRecord      a peer record that must not be believed
│   ├── KeyRefused         a peer of a private swarm did not prove the swarm key (or we did not)
│   └── FrameError         a peer broke the sync protocol's framing
└── WeightsError           getting a model's weights failed (node.weights)
    ├── NoProviders        no source holds some tensors the span needs (names them)
    ├── BadWeights         bytes that do not match the manifest's sha256 (their provider is avoided)
    └── DiskQuota          the span's tensors do not fit in --max-disk
"""

from __future__ import annotations

import grpc

from protocol.errors import MoemeshError

__all__ = [
    "ApiError",
    "BadWeights",
    "ConfigError",
    "DiskQuota",
    "Draining",
    "FrameError",
    "IdleTimeout",
    "InvalidRecord",
    "InvalidRequest",
    "KeyRefused",
    "MeshError",
    "MoemeshError",
    "NoProviders",
    "OutOfRange",
    "Overloaded",
    "PeerError",
    "PeerLied",
    "PeerRefused",
    "PeerSlow",
    "PeerTimeout",
    "PeerUnavailable",
    "PeerUntrusted",
    "PushNotDelivered",
    "RequestError",
    "RouteError",
    "SessionClosed",
    "SessionStateError",
    "Stopped",
    "TokenizerError",
    "WeightsError",
    "WrongModel",
    "peer_error",
]


class ConfigError(MoemeshError, ValueError):
    """An option or argument is invalid."""


class RouteError(MoemeshError):
    """The peers known do not cover every layer of the model."""

    def __init__(self, message: str, missing: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


class SessionClosed(MoemeshError):
    """We closed this session ourselves; it takes no more steps."""


class TokenizerError(MoemeshError):
    """No usable tokenizer: the model folder has none, or what the peers sent was missing,
    malformed or over the bound (the message names the peers and why)."""


class Stopped(MoemeshError):
    """A stop was requested (SIGINT, SIGTERM, `request_stop()`) before the work it cut short, such
    as loading a span, was done."""


class ApiError(MoemeshError):
    """The HTTP API will not serve a request; node.api answers it as an OpenAI-shaped error."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code


class RequestError(MoemeshError):
    """A request the server will not serve. The engine raises these; only the gRPC edge knows status codes."""


class InvalidRequest(RequestError, ValueError):
    """The input is malformed or too large for one step."""


class WrongModel(RequestError):
    """The request is for a model this server does not serve."""


class OutOfRange(RequestError):
    """Layers outside the served span, or a session past its max length."""


class Overloaded(RequestError):
    """No room now (sessions, KV cache budget): another peer may have it."""


class SessionStateError(RequestError):
    """The stream's session is not in a state that allows this request."""


class Draining(RequestError):
    """The server is shutting down or moving: open the session, or move it, elsewhere."""


class IdleTimeout(RequestError):
    """The session sent nothing for too long and was closed."""


class PeerError(MoemeshError):
    """Talking to a peer failed."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address


class PeerUnavailable(PeerError):
    """The peer cannot be reached or the connection broke."""


class PeerSlow(PeerError):
    """The peer answers, but several times slower than it did: the session moves off it."""


class PushNotDelivered(PeerError):
    """The peer could not push a step on to the next hop (it said so): the client relays that step."""


class PeerTimeout(PeerError):
    """The peer did not answer in time."""


class PeerUntrusted(PeerError):
    """The peer answered with a TLS certificate other than the one pinned for it (a record's
    fingerprint, or `host:port#fingerprint`): someone else holds its address."""


class PeerLied(PeerError):
    """A spot-check (node.client.verify) found the peer's outputs other than other peers' on the
    same inputs, beyond what their dtypes explain."""


class PeerRefused(PeerError):
    """The peer answered with an error status."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(address, f"{code.name}: {details}")
        self.code = code
        self.details = details


class MeshError(MoemeshError):
    """The libp2p side failed: no bootstrap peer reachable, a DHT operation failed."""


class InvalidRecord(MeshError):
    """A record that must not be believed."""


class KeyRefused(MeshError):
    """A stream of a private swarm failed its swarm-key handshake: the other side does not hold our key."""


class FrameError(MeshError):
    """The peer broke the framing (a frame over the limit, or cut in the middle)."""


class WeightsError(MoemeshError):
    """Getting a model's weights (manifest, tensors, tokenizer) failed."""


class NoProviders(WeightsError):
    """No source holds some of the tensors a span needs."""


class BadWeights(WeightsError):
    """Bytes that do not match the manifest (a wrong hash, a wrong length, a manifest of another model)."""


class DiskQuota(WeightsError, OSError):
    """The tensors do not fit in the cache's disk quota."""


def peer_error(address: str, error: grpc.RpcError) -> PeerError:
    """Classify a gRPC failure of the call to `address`."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return PeerUnavailable(address, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerTimeout(address, details)
    return PeerRefused(address, code, details)
