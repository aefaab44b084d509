"""Circuit relay v2 (`/libp2p/circuit/relay/0.2.0/hop` and `/stop`): relaying and reservations.

- Relaying: with `serve`, a node that AutoNAT found public serves HOP within `limits()`;
  no node is a relay unless asked, and a private one never is (the shipped example turns
  every peer into one: `allow_hop` is explicit here).
- Reservations: a private node reserves slots on connected peers that relay, advertises
  the resulting `/p2p-circuit` addresses itself (py-libp2p does not), refreshes them
  before they expire and re-reserves when a relay goes away.
- Dialing: every node can dial a `/p2p-circuit` address (STOP only: dialing through a
  relay must not take a reservation on it each time).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig as LibRelayConfig
from libp2p.relay.circuit_v2.config import RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from node.mesh.autonat import AutoNAT, direct_peers, without_p2p
from node.mesh.bridge import unwrap
from node.mesh.internals import handle_hop_stream, make_reservation, reservation_expiry
from protocol.mesh_pb2 import Reachability

__all__ = ["HOP_PROTOCOL", "STOP_PROTOCOL", "Relay", "RelayConfig", "install"]

log = logging.getLogger(__name__)
REFRESH_MARGIN_S = 60.0  # re-reserve this long before a reservation expires


@dataclass(frozen=True)
class RelayConfig:
    serve: bool = False  # offer circuit relay v2 once AutoNAT says we are public
    reserve: bool = True  # when private, reserve slots on relays and advertise circuit addresses
    max_relays: int = 2
    max_circuit_s: int = 3600  # per relayed connection
    max_circuit_bytes: int = 1 << 30
    max_circuits: int = 16
    max_reservations: int = 32
    dial_timeout_s: float = 10.0
    check_interval_s: float = 60.0  # re-check once we have what we need
    retry_interval_s: float = 3.0  # while undecided or without a relay

    def limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.max_circuit_s,
            data=self.max_circuit_bytes,
            max_circuit_conns=self.max_circuits,
            max_reservations=self.max_reservations,
        )


@dataclass
class _Reservation:
    relay_address: str  # the relay's own address, as we are connected to it
    expires: float  # unix seconds


class Relay:
    """Our side of circuit relay v2; `run` follows the AutoNAT verdict."""

    def __init__(self, host: IHost, config: RelayConfig, autonat: AutoNAT) -> None:
        self.host = host
        self.config = config
        self.autonat = autonat
        self.relaying = False
        self.version = 0  # bumped whenever what we advertise changes
        self.circuit = CircuitV2Protocol(host, limits=config.limits(), allow_hop=False)
        self.transport = CircuitV2Transport(host, self.circuit, LibRelayConfig(roles=RelayRole.STOP))
        self._reservations: dict[ID, _Reservation] = {}
        self._not_relays: dict[ID, float] = {}  # peer -> when to ask again
        self._reported: set[tuple[str, ID | None]] = set()

    def circuit_addresses(self) -> list[str]:
        me = self.host.get_id().to_base58()
        return [f"{r.relay_address}/p2p/{relay}/p2p-circuit/p2p/{me}" for relay, r in self._reservations.items()]

    async def dial(self, addr: Multiaddr) -> None:
        """Connect to the peer at a `/p2p-circuit` address through its relay."""
        await self.transport.dial(addr)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.circuit):
            task_status.started()
            while True:
                reachability = self.autonat.reachability
                private = reachability == Reachability.REACHABILITY_PRIVATE
                if self.config.serve:
                    self._offer(reachability == Reachability.REACHABILITY_PUBLIC)
                if self.config.reserve and private:
                    await self._keep_reservations()
                decided = reachability != Reachability.REACHABILITY_UNKNOWN
                idle = decided and not (private and not self._reservations)
                await self.autonat.wait_change(self.config.check_interval_s if idle else self.config.retry_interval_s)

    def _changed(self) -> None:
        self.version += 1

    def _report_once(self, kind: str, peer: ID | None, message: str, *args: Any) -> None:
        if (kind, peer) not in self._reported:
            self._reported.add((kind, peer))
            log.warning(message, *args)

    def _offer(self, public: bool) -> None:
        if public == self.relaying:
            if not public and self.autonat.reachability == Reachability.REACHABILITY_PRIVATE:
                self._report_once("relay-private", None, "--relay: not offering a relay, AutoNAT found us private")
            return
        self.relaying = public
        self.circuit.allow_hop = public
        if public:
            self.host.set_stream_handler(HOP_PROTOCOL, partial(handle_hop_stream, self.circuit))
            limits = self.config.limits()
            log.info(
                "offering circuit relay v2: at most %d reservations and %d circuits, %d s and %d MiB per circuit",
                limits.max_reservations,
                limits.max_circuit_conns,
                limits.duration,
                limits.data >> 20,
            )
        else:
            self.host.remove_stream_handler(HOP_PROTOCOL)
            log.warning("stopped relaying: AutoNAT no longer finds us public")
        self._changed()

    async def _reserve(self, relay: ID) -> bool:
        network = self.host.get_network()
        conns = [c for c in network.get_connections(relay) if c.get_connection_type() != ConnectionType.RELAYED]
        if not conns:
            return False
        address = next((str(without_p2p(a)) for a in conns[0].get_transport_addresses()), "")
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
        except Exception as e:  # it does not relay (multistream refuses the protocol), or is gone
            log.debug("%s is not a relay: %r", relay, unwrap(e))
            self._not_relays[relay] = time.monotonic() + 3 * self.config.retry_interval_s
            return False
        try:
            ok = await make_reservation(self.transport, stream, relay)
        finally:
            await stream.close()
        if not ok:
            self._report_once("refused", relay, "relay %s refused a reservation (full, or limits reached)", relay)
            self._not_relays[relay] = time.monotonic() + 20 * self.config.retry_interval_s
            return False
        expires = reservation_expiry(self.transport, relay) or time.time() + 3600
        renewed = relay in self._reservations
        self._reservations[relay] = _Reservation(address, expires)
        if not renewed:
            self._reported.discard(("no-relay", None))  # warn again if we lose every relay
            log.info("reserved a slot on relay %s (%s), %d s", relay, address, expires - time.time())
            self._changed()
        return True

    async def _keep_reservations(self) -> None:
        connected = set(self.host.get_connected_peers())
        for relay, r in list(self._reservations.items()):
            if relay in connected and r.expires - time.time() > REFRESH_MARGIN_S:
                continue
            if relay not in connected:
                try:
                    with trio.fail_after(self.config.dial_timeout_s):
                        await self.host.connect(PeerInfo(relay, [Multiaddr(r.relay_address)]))
                except Exception as e:  # the relay is gone: find another
                    log.warning("lost relay %s: %r", relay, unwrap(e))
            if not await self._reserve(relay):
                del self._reservations[relay]
                self._changed()
        if len(self._reservations) >= self.config.max_relays:
            return
        now = time.monotonic()
        for peer in direct_peers(self.host):
            if peer in self._reservations or self._not_relays.get(peer, 0) > now:
                continue
            if await self._reserve(peer) and len(self._reservations) >= self.config.max_relays:
                return
        if not self._reservations:
            self._report_once(
                "no-relay",
                None,
                "behind NAT and no connected peer offers circuit relay v2: nobody can reach us"
                " (a public daemon started with --relay would)",
            )


def install(host: IHost, config: RelayConfig, autonat: AutoNAT) -> Relay:
    """Register the relay protocol (STOP, and HOP while public with `serve`); run the result."""
    return Relay(host, config, autonat)
