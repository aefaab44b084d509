"""Errors of the replicated swarm state.

CrdtError                     (a MoemeshError: the root is in protocol/errors.py)
├── NotOwnerError      a replica tried to write a key that belongs to another peer
└── BadUpdateError     a peer's frame, update or state vector that we do not apply
    ├── BadEntryError  a value that is malformed, out of bounds, or not signed by the peer it is keyed
    │                  under (dropped where it is found; raised to a caller only for its own write)
    └── OverLimitError a peer's frame over a per-peer limit (size, frames per second)
"""

from __future__ import annotations

from protocol.errors import MoemeshError

__all__ = ["BadEntryError", "BadUpdateError", "CrdtError", "NotOwnerError", "OverLimitError"]


class CrdtError(MoemeshError):
    """Base class of the errors raised by `crdt`."""


class NotOwnerError(CrdtError):
    """Only a key's owner writes it (pycrdt resolves concurrent writes by client id, not time)."""


class BadUpdateError(CrdtError, ValueError):
    """A peer sent something we do not apply: bytes pycrdt cannot read, or a frame we refuse."""


class BadEntryError(BadUpdateError):
    """A swarm-state value that is not a well-formed entry signed by the peer it is keyed under."""


class OverLimitError(BadUpdateError):
    """A peer sent a frame over a per-peer limit; the frame is dropped unread (a subclass of
    BadUpdateError, so callers that drop bad frames drop these too)."""
