"""The replicated swarm state (pycrdt) and the logic of its sync (no I/O here).

Layering: imports only `protocol` of ours (the sync frame).
"""

from crdt.errors import BadUpdateError, CrdtError, NotOwnerError
from crdt.replica import Epoch, Replica, decode_frame, encode_frame
from crdt.state import Load, Member, SwarmState

__all__ = [
    "BadUpdateError",
    "CrdtError",
    "Epoch",
    "Load",
    "Member",
    "NotOwnerError",
    "Replica",
    "SwarmState",
    "decode_frame",
    "encode_frame",
]
