"""The root of every error moemesh raises on purpose, and the errors about what crosses the wire.

`MoemeshError` lives here because `protocol` is the one package every other may import
(`kernels` imports this module only). Each package's errors.py draws its own subtree:

MoemeshError
├── ProtocolError              (protocol) what crosses the wire
│   ├── InvalidTensorError     a Tensor message is malformed: dtype, shape or byte length
│   └── VersionMismatchError   the peer speaks a protocol version we do not
├── KernelError                (kernels) the compute layer
├── ShardError                 (shards) span specs and checkpoints
├── CrdtError                  (crdt) the replicated swarm state
└── ...                        (node) config, routes, requests, peers, the mesh: node/errors.py
"""

from __future__ import annotations

__all__ = ["InvalidTensorError", "MoemeshError", "ProtocolError", "VersionMismatchError"]


class MoemeshError(Exception):
    """Base class of every error moemesh raises on purpose."""


class ProtocolError(MoemeshError):
    """Base class of wire-level errors."""


class InvalidTensorError(ProtocolError, ValueError):
    """A Tensor message cannot be decoded as what it claims to be."""


class VersionMismatchError(ProtocolError):
    """The peer's protocol version is not one we speak."""

    def __init__(self, peer: str, theirs: int, ours: int) -> None:
        super().__init__(f"{peer} speaks moemesh protocol {theirs}, this node speaks {ours}: upgrade the older one")
        self.peer = peer
        self.theirs = theirs
        self.ours = ours
