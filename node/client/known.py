"""What a client knows of the peers of a model, and planning a chain over peers given by address."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from node.errors import RouteError
from node.plan.peers import PeerView, compatible
from node.plan.routing import Hop, best_chain
from protocol import VersionMismatchError

__all__ = ["KnownPeers", "plan_route"]


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
class KnownPeers:
    """What the client found out: the model, and every peer able to run some of its layers."""

    model_id: str
    num_layers: int
    peers: list[PeerView]
    unreachable: tuple[str, ...] = ()  # given addresses that did not answer or serve another model
    refused: tuple[VersionMismatchError, ...] = ()  # peers that speak another protocol version
    quantized: tuple[str, ...] = ()  # peers left out because their weights are quantized (exact mode)

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
