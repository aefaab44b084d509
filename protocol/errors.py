"""Errors about what crosses the wire.

ProtocolError
├── InvalidTensorError     a Tensor message is malformed: dtype, shape or byte length
└── VersionMismatchError   the peer speaks a protocol version we do not
"""

from __future__ import annotations

__all__ = ["InvalidTensorError", "ProtocolError", "VersionMismatchError"]


class ProtocolError(Exception):
    """Base class of wire-level errors."""


class InvalidTensorError(ProtocolError, ValueError):
    """A Tensor message cannot be decoded as what it claims to be."""


class VersionMismatchError(ProtocolError):
    """The peer's protocol version is not one we speak."""
