"""The replicated swarm state (pycrdt) of signed entries, and the logic of its sync (no I/O here).

Layering: imports only `protocol` of ours (the sync frame). Signing and verifying are given
by the caller (`Signer`, `Verifier`): the node backs them with its libp2p identity.
"""

from crdt.entry import Entry, Limits, Load, Member, Signer, Verifier, open_entry, sign_entry
from crdt.errors import BadEntryError, BadUpdateError, CrdtError, NotOwnerError, OverLimitError
from crdt.replica import Epoch, Replica, decode_frame, encode_frame
from crdt.state import SwarmState

__all__ = [
    "BadEntryError",
    "BadUpdateError",
    "CrdtError",
    "Entry",
    "Epoch",
    "Limits",
    "Load",
    "Member",
    "NotOwnerError",
    "OverLimitError",
    "Replica",
    "Signer",
    "SwarmState",
    "Verifier",
    "decode_frame",
    "encode_frame",
    "open_entry",
    "sign_entry",
]
