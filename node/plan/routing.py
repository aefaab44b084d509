"""Routing maths: the chain of peers that runs every layer with the least expected latency.

A pure function over what the client knows (no I/O, no torch). The chain is a shortest path
over positions 0..L: from position s, a peer serving s can run blocks [s, e) for any e up
to its span's end, at a cost of one network round trip plus (e - s) blocks at its measured
per-block time. Dijkstra picks the cheapest way to reach L.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from node.errors import RouteError

__all__ = ["Candidate", "Hop", "best_chain", "missing_blocks"]


@dataclass(frozen=True)
class Candidate:
    """A peer able to run blocks [start, end) of the model."""

    peer: str  # a stable key: the libp2p peer id, or the address
    address: str  # where its gRPC service answers (host:port)
    start: int
    end: int
    block_seconds: float  # expected compute time of one block for one token
    rtt_seconds: float  # expected network round trip to it


@dataclass(frozen=True)
class Hop:
    """Run layers [start, end) on the peer at `address`."""

    address: str
    start: int
    end: int
    peer: str = ""


def missing_blocks(candidates: Sequence[Candidate], num_layers: int, start: int = 0) -> list[tuple[int, int]]:
    """Maximal runs of blocks in [start, num_layers) that no candidate serves."""
    covered = [b < start for b in range(num_layers)]
    for c in candidates:
        for b in range(max(c.start, start), min(c.end, num_layers)):
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


def best_chain(candidates: Sequence[Candidate], num_layers: int, start: int = 0, end: int | None = None) -> list[Hop]:
    """The cheapest chain of hops covering blocks [start, end) (default: the whole model of
    `num_layers` blocks), or RouteError naming the gaps."""
    end = num_layers if end is None else end
    gaps = missing_blocks(candidates, end, start)
    if gaps:
        names = ", ".join(f"{a}:{b}" for a, b in gaps)
        raise RouteError(f"no known peer serves layers {names} of {num_layers}", tuple(gaps))
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, Candidate]] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, s = heapq.heappop(queue)
        if s == end:
            break
        if cost > best.get(s, float("inf")):
            continue
        for c in candidates:
            if not c.start <= s < c.end:
                continue
            for e in range(s + 1, min(c.end, end) + 1):
                new = cost + c.rtt_seconds + (e - s) * c.block_seconds
                if new < best.get(e, float("inf")):
                    best[e] = new
                    came_from[e] = (s, c)
                    heapq.heappush(queue, (new, e))
    hops: list[Hop] = []
    e = end
    while e != start:
        s, c = came_from[e]
        hops.append(Hop(c.address, s, e, c.peer))
        e = s
    return hops[::-1]
