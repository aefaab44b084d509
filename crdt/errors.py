"""Errors of the replicated swarm state.

CrdtError                    (a MoemeshError: the root is in protocol/errors.py)
├── NotOwnerError     a replica tried to write a key that belongs to another peer
└── BadUpdateError    bytes from a peer are not a valid update or state vector
"""

from __future__ import annotations

from protocol.errors import MoemeshError

__all__ = ["BadUpdateError", "CrdtError", "NotOwnerError"]


class CrdtError(MoemeshError):
    """Base class of the errors raised by `crdt`."""


class NotOwnerError(CrdtError):
    """Only a key's owner writes it (pycrdt resolves concurrent writes by client id, not time)."""


class BadUpdateError(CrdtError, ValueError):
    """A peer sent bytes that pycrdt cannot apply."""
