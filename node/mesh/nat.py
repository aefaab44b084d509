"""NAT traversal of one node, as one view over three protocols: AutoNAT, relay, DCUtR.

`node.mesh.autonat` decides whether we are reachable, `node.mesh.relay` relays for others
(when public and asked to) or reserves slots on relays (when private), and
`node.mesh.holepunch` upgrades relayed connections. The host installs the three; `Nat` is
what callers use: what we advertise (`state`), reaching a peer (`connect`) and how we
reach it (`path`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from node.errors import MoemeshError
from node.mesh.autonat import AutoNAT, AutoNATConfig, without_p2p
from node.mesh.bridge import unwrap
from node.mesh.holepunch import DIRECT, HOLE_PUNCHED, NOT_CONNECTED, RELAYED, HolePunch, HolePunchConfig
from node.mesh.relay import Relay, RelayConfig
from protocol.mesh_pb2 import Reachability

__all__ = [
    "DIRECT",
    "HOLE_PUNCHED",
    "NOT_CONNECTED",
    "RELAYED",
    "Nat",
    "NatConfig",
    "NatState",
    "reachability_name",
]


def reachability_name(value: int) -> str:
    if value == Reachability.REACHABILITY_PUBLIC:
        return "public"
    return "private" if value == Reachability.REACHABILITY_PRIVATE else "unknown"


@dataclass(frozen=True)
class NatConfig:
    autonat: AutoNATConfig = field(default_factory=AutoNATConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    holepunch: HolePunchConfig = field(default_factory=HolePunchConfig)
    dial_timeout_s: float = 10.0  # per address, in `connect`


@dataclass(frozen=True)
class NatState:
    """What the node advertises, as plain values (crosses the bridge)."""

    version: int  # changes whenever anything else here does
    reachability: Reachability
    circuit_addresses: tuple[str, ...]
    relay: bool


class Nat:
    """The three NAT protocols of one host, seen as one (they run as the host's pieces)."""

    def __init__(self, host: IHost, config: NatConfig, autonat: AutoNAT, relay: Relay, holepunch: HolePunch) -> None:
        self.host = host
        self.config = config
        self.autonat = autonat
        self.relay = relay
        self.holepunch = holepunch
        self._known_addrs: dict[ID, list[str]] = {}

    async def state(self) -> NatState:
        return NatState(
            self.autonat.version + self.relay.version,
            self.autonat.reachability,
            tuple(self.relay.circuit_addresses()),
            self.relay.relaying,
        )

    async def connect(self, peer: ID, addrs: Sequence[str] = ()) -> None:
        """A connection to `peer`: kept if there is one, else dialed at `addrs` in order
        (direct addresses with the host, `/p2p-circuit` ones through their relay)."""
        if addrs:
            self._known_addrs[peer] = list(addrs)
        if self.host.get_network().get_connections(peer):
            return
        errors = []
        for text in self._known_addrs.get(peer, []):
            addr = Multiaddr(text)
            try:
                with trio.fail_after(self.config.dial_timeout_s):
                    if "/p2p-circuit" in text:
                        await self.relay.dial(addr)
                        self.holepunch.relayed(peer)
                    else:
                        await self.host.connect(PeerInfo(peer, [without_p2p(addr)]))
                return
            except Exception as e:  # libp2p raises several types for an unreachable peer
                errors.append(f"{text}: {unwrap(e)!r}")
        raise MoemeshError(f"cannot reach peer {peer}: " + ("; ".join(errors) or "no address known"))

    def path(self, peer: ID) -> str:
        """direct, hole-punched, relayed or not connected."""
        return self.holepunch.path(peer)
