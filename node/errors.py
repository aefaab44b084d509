"""Errors raised by the node: the server, the client SDK and the CLI.

MoemeshError
├── ConfigError          a bad option or argument (the CLI prints it and exits 2)
├── Rejected             the server refuses a request; carries the gRPC status to send
├── RouteError           no chain of the known peers covers every layer (names the gap)
└── PeerError            talking to a peer failed
    ├── PeerUnavailable  it cannot be reached, or the connection broke
    ├── PeerTimeout      it did not answer before the deadline
    └── PeerRefused      it answered with an error status (code and message kept)
"""

from __future__ import annotations

import grpc

__all__ = [
    "ConfigError",
    "MoemeshError",
    "PeerError",
    "PeerRefused",
    "PeerTimeout",
    "PeerUnavailable",
    "Rejected",
    "RouteError",
    "peer_error",
]


class MoemeshError(Exception):
    """Base class of every error moemesh raises on purpose."""


class ConfigError(MoemeshError, ValueError):
    """An option or argument is invalid."""


class Rejected(MoemeshError):
    """A request the server will not serve; `code` is the gRPC status it answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RouteError(MoemeshError):
    """The peers known do not cover every layer of the model."""

    def __init__(self, message: str, missing: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


class PeerError(MoemeshError):
    """Talking to a peer failed."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address


class PeerUnavailable(PeerError):
    """The peer cannot be reached or the connection broke."""


class PeerTimeout(PeerError):
    """The peer did not answer in time."""


class PeerRefused(PeerError):
    """The peer answered with an error status."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(address, f"{code.name}: {details}")
        self.code = code
        self.details = details


def peer_error(address: str, error: grpc.RpcError) -> PeerError:
    """Classify a gRPC failure of the call to `address`."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return PeerUnavailable(address, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerTimeout(address, details)
    return PeerRefused(address, code, details)
