"""Errors of the replicated swarm state.

CrdtError
├── NotOwnerError     a replica tried to write a key that belongs to another peer
└── BadUpdateError    bytes from a peer are not a valid update or state vector
"""

from __future__ import annotations

__all__ = ["BadUpdateError", "CrdtError", "NotOwnerError"]


class CrdtError(Exception):
    """Base class of the errors raised by `crdt`."""


class NotOwnerError(CrdtError):
    """Only a key's owner writes it (pycrdt resolves concurrent writes by client id, not time)."""


class BadUpdateError(CrdtError, ValueError):
    """A peer sent bytes that pycrdt cannot apply."""
