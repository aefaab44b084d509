"""Pure planning, torch-free and I/O-free: routing a client's chain and placing a daemon's span,
both over one peer view (`PeerView`), built from records, members and Info by `node.plan.peers`."""

from node.plan.peers import (
    PeerInfo,
    PeerView,
    check_version,
    compatible,
    peer_from_info,
    peers_from_members,
    peers_from_record,
)
from node.plan.placement import Move, block_capacity, bottleneck, choose_span, mover_rank, propose_move
from node.plan.routing import Hop, best_chain, missing_blocks

__all__ = [
    "Hop",
    "Move",
    "PeerInfo",
    "PeerView",
    "best_chain",
    "block_capacity",
    "bottleneck",
    "check_version",
    "choose_span",
    "compatible",
    "missing_blocks",
    "mover_rank",
    "peer_from_info",
    "peers_from_members",
    "peers_from_record",
    "propose_move",
]
