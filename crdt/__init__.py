"""The replicated swarm state (pycrdt) and the primitives of its sync.

Layering: imports only `protocol` of ours (and nothing yet).
"""

from crdt.errors import BadUpdateError, CrdtError, NotOwnerError
from crdt.state import Load, Member, SwarmState

__all__ = ["BadUpdateError", "CrdtError", "Load", "Member", "NotOwnerError", "SwarmState"]
