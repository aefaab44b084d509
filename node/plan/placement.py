"""Where a daemon should serve: pure functions of the swarm's CRDT view, read as `PeerView`s
(no central scheduler).

Each block of the model can carry, in tokens/s, the sum over the peers serving it of
their throughput shared among their blocks (a peer measuring `t` tokens/s through one
block takes `L / t` s per token for a span of `L` blocks). The swarm's end-to-end
throughput is bounded by its weakest block.

- A joining peer takes the window of `L` blocks that is weakest, comparing windows by
  their sorted capacities (Petals' block selection): blocks nobody serves come first,
  then the least served.
- A serving peer moves only when taking itself out and placing itself again raises the
  swarm's bottleneck by more than `factor` (hysteresis); among the peers that would gain
  by moving, every peer computes the same ranking from the shared view, so the first one
  moves and the others wait to see the new view before deciding (no herds).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from node.plan.peers import PeerView

__all__ = ["DEFAULT_FACTOR", "Move", "block_capacity", "bottleneck", "choose_span", "mover_rank", "propose_move"]

DEFAULT_FACTOR = 1.25


@dataclass(frozen=True)
class Move:
    start: int
    end: int
    bottleneck_before: float  # tokens/s of the weakest block, as the swarm is
    bottleneck_after: float  # with this peer moved

    @property
    def gain(self) -> float:
        if self.bottleneck_before <= 0:
            return math.inf
        return self.bottleneck_after / self.bottleneck_before


def block_capacity(peers: Iterable[PeerView], num_layers: int) -> list[float]:
    """Tokens/s each block can carry: every peer's throughput shared among the blocks it serves."""
    capacity = [0.0] * num_layers
    for s in peers:
        span = s.end - s.start
        if span <= 0:
            continue
        share = s.throughput / span
        for block in range(max(0, s.start), min(num_layers, s.end)):
            capacity[block] += share
    return capacity


def bottleneck(capacity: Sequence[float]) -> float:
    return min(capacity) if capacity else 0.0


def choose_span(capacity: Sequence[float], length: int) -> tuple[int, int]:
    """The weakest window of `length` blocks (sorted capacities compared; ties: lowest start)."""
    n = len(capacity)
    if n == 0:
        raise ValueError("the model has no layers")
    length = max(1, min(length, n))
    start = min(range(n - length + 1), key=lambda s: (sorted(capacity[s : s + length]), s))
    return start, start + length


def propose_move(
    peers: Sequence[PeerView], peer_id: str, num_layers: int, factor: float = DEFAULT_FACTOR
) -> Move | None:
    """Where `peer_id` should move, if moving raises the swarm's bottleneck by more than `factor`."""
    mine = next((s for s in peers if s.peer_id == peer_id), None)
    if mine is None or mine.throughput <= 0:
        return None
    others = [s for s in peers if s.peer_id != peer_id]
    before = bottleneck(block_capacity(peers, num_layers))
    start, end = choose_span(block_capacity(others, num_layers), mine.can_hold)
    if (start, end) == (mine.start, mine.end):
        return None
    moved = replace(mine, start=start, end=end)
    after = bottleneck(block_capacity([*others, moved], num_layers))
    if after <= 0 or (before > 0 and after <= before * factor):
        return None
    return Move(start, end, before, after)


def _tiebreak(peer_id: str) -> bytes:
    return hashlib.sha256(peer_id.encode()).digest()


def mover_rank(peers: Sequence[PeerView], peer_id: str, num_layers: int, factor: float = DEFAULT_FACTOR) -> int | None:
    """`peer_id`'s place among the peers that would gain by moving (0 moves first), or None if it would not.

    Ordered by gain (largest first), then by a hash of the peer id, so every peer with the
    same view computes the same order.
    """
    movers = []
    for s in peers:
        move = propose_move(peers, s.peer_id, num_layers, factor)
        if move is not None:
            movers.append((-move.gain, _tiebreak(s.peer_id), s.peer_id))
    order = [pid for *_, pid in sorted(movers)]
    return order.index(peer_id) if peer_id in order else None
