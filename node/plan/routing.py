"""Routing maths: the chain of peers that runs every layer with the least expected latency.

A pure function over what the client knows (no I/O, no torch), read from `PeerView`s. The
chain is a shortest path over positions 0..L: from position s, a peer serving s can run
blocks [s, e) for any e up to its span's end, at a cost of one network round trip (at least
`MIN_RTT_S`, so that with nothing measured the fewest hops win) plus (e - s) blocks at its
per-block time. Dijkstra picks the cheapest way to reach L.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from node.errors import RouteError
from node.plan.peers import PeerView

__all__ = ["MIN_RTT_S", "Hop", "best_chain", "missing_blocks"]

MIN_RTT_S = 1e-3  # the least a hop costs: an unmeasured round trip is not free


@dataclass(frozen=True)
class Hop:
    """Run layers [start, end) on the peer at `address`."""

    address: str
    start: int
    end: int
    peer: str = ""


def missing_blocks(peers: Sequence[PeerView], num_layers: int, start: int = 0) -> list[tuple[int, int]]:
    """Maximal runs of blocks in [start, num_layers) that no peer serves."""
    covered = [b < start for b in range(num_layers)]
    for p in peers:
        for b in range(max(p.start, start), min(p.end, num_layers)):
            covered[b] = True
    gaps: list[tuple[int, int]] = []
    for b, ok in enumerate(covered):
        if ok:
            continue
        if gaps and gaps[-1][1] == b:
            gaps[-1] = (gaps[-1][0], b + 1)
        else:
            gaps.append((b, b + 1))
    return gaps


def best_chain(peers: Sequence[PeerView], num_layers: int, start: int = 0, end: int | None = None) -> list[Hop]:
    """The cheapest chain of hops covering blocks [start, end) (default: the whole model of
    `num_layers` blocks), or RouteError naming the gaps."""
    end = num_layers if end is None else end
    gaps = missing_blocks(peers, end, start)
    if gaps:
        names = ", ".join(f"{a}:{b}" for a, b in gaps)
        raise RouteError(f"no known peer serves layers {names} of {num_layers}", tuple(gaps))
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, PeerView]] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, s = heapq.heappop(queue)
        if s == end:
            break
        if cost > best.get(s, float("inf")):
            continue
        for p in peers:
            if not p.start <= s < p.end:
                continue
            hop_s, block_s = max(p.rtt_s, MIN_RTT_S), p.block_seconds
            for e in range(s + 1, min(p.end, end) + 1):
                new = cost + hop_s + (e - s) * block_s
                if new < best.get(e, float("inf")):
                    best[e] = new
                    came_from[e] = (s, p)
                    heapq.heappush(queue, (new, e))
    hops: list[Hop] = []
    e = end
    while e != start:
        s, p = came_from[e]
        hops.append(Hop(p.address, s, e, p.peer_id))
        e = s
    return hops[::-1]
