"""What a client knows of the peers of a model, and planning a chain over peers given by address."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from node.errors import RouteError
from node.plan.peers import PeerView, compatible
from node.plan.routing import Hop, best_chain
from protocol import VersionMismatchError

__all__ = ["KnownPeers", "NatBlocked", "plan_route"]


def plan_route(peers: Sequence[PeerView]) -> list[Hop]:
    """The chain of the given peers with the fewest round trips (measured RTTs when known).

    Peers may overlap; a hop runs a sub-span of its peer's span. Peers that speak another
    protocol version are left out (VersionMismatchError when that leaves none). Raises
    RouteError naming the layers that no peer serves.
    """
    if not peers:
        raise RouteError("no peer answered")
    usable, refused = compatible(peers)
    if not usable:
        raise refused[0]
    return best_chain(usable, peers[0].num_layers)


@dataclass(frozen=True)
class NatBlocked:
    """A peer that serves layers [start, end) behind NAT, out of this client's reach."""

    peer_id: str
    start: int
    end: int
    relays: bool  # its record names relay (circuit) addresses, which did not work


@dataclass(frozen=True)
class KnownPeers:
    """What the client found out: the model, and every peer able to run some of its layers."""

    model_id: str
    num_layers: int
    peers: list[PeerView]
    unreachable: tuple[str, ...] = ()  # given addresses that did not answer or serve another model
    refused: tuple[VersionMismatchError, ...] = ()  # peers that speak another protocol version
    quantized: tuple[str, ...] = ()  # peers left out because their weights are quantized (exact mode)
    behind_nat: tuple[NatBlocked, ...] = ()  # peers whose records we hold but cannot reach (NAT, no relay)

    def explain(self, error: RouteError) -> RouteError:
        """`error` (no chain) with what the swarm knows of why: the missing layers that only peers
        behind NAT serve are named as such, and the peers left out are listed. `error` itself
        when there is nothing to add."""
        parts: list[str] = []
        nat = False
        for a, b in error.missing:
            for start, end, blocked in self._segments(a, b):
                nat = nat or bool(blocked)
                if not blocked:
                    parts.append(f"no known peer serves layers {start}:{end} of {self.num_layers}")
                elif all(not p.relays for p in blocked):
                    parts.append(f"layers {start}:{end} are served only by peers behind NAT and no relay is available")
                else:
                    parts.append(
                        f"layers {start}:{end} are served only by peers behind NAT whose relays could not be reached"
                    )
        left_out = [why] if (why := self.left_out()) else []
        if not nat:
            return RouteError("; ".join([str(error), *left_out]), error.missing) if left_out else error
        return RouteError("; ".join(parts + left_out), error.missing)

    def _segments(self, start: int, end: int) -> list[tuple[int, int, list[NatBlocked]]]:
        """[start, end) cut where the set of peers behind NAT serving a layer changes:
        (start, end, those peers), in order."""
        segments: list[tuple[int, int, list[NatBlocked]]] = []
        for layer in range(start, end):
            blocked = [p for p in self.behind_nat if p.start <= layer < p.end]
            if segments and bool(segments[-1][2]) == bool(blocked) and segments[-1][1] == layer:
                first, _, seen = segments[-1]
                segments[-1] = (first, layer + 1, seen + [p for p in blocked if p not in seen])
            else:
                segments.append((layer, layer + 1, blocked))
        return segments

    def left_out(self) -> str:
        """Why peers were left out, to add to a RouteError ("" when none was)."""
        notes = []
        if self.unreachable:
            notes.append(
                "unreachable: " + "; ".join(f"{a} did not answer or serves another model" for a in self.unreachable)
            )
        if self.refused:
            notes.append("another protocol version: " + "; ".join(str(e) for e in self.refused))
        if self.quantized:
            notes.append(f"quantized, left out by exact mode: {', '.join(self.quantized)}")
        return "; ".join(notes)
