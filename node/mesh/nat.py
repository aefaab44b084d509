"""NAT traversal of one node: reachability (AutoNAT), circuit relay v2 and hole punching (DCUtR).

Runs on the trio thread next to the host (`MeshNode` starts it). What it does:

- Reachability: it asks several connected peers to dial it back (AutoNAT v1) and calls
  itself public or private once `confirmations` of them agree. Our AutoNAT server dials
  back on a fresh connection (py-libp2p's reuses the connection the request came on, so
  every requester would look reachable) and proves the peer id with a Noise handshake.
- Relay: with `relay`, a daemon that AutoNAT found public serves circuit relay v2 (HOP)
  within `RelayLimits`; no node is a relay unless asked, and a private one never is.
- Reservations: a private daemon reserves slots on connected peers that relay, advertises
  the resulting `/p2p-circuit` addresses itself (py-libp2p does not), refreshes them before
  they expire and re-reserves when a relay goes away.
- Hole punching: DCUtR runs on every node (py-libp2p's service drives it on every relayed
  connection). Relayed connections are kept after an upgrade, because tunnel streams
  opened on them must not be cut; new streams prefer the direct connection.
- `path(peer)` says how we are connected to a peer: direct, hole-punched or relayed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from node.errors import MoemeshError
from node.mesh.bridge import unwrap
from protocol.mesh_pb2 import Reachability

__all__ = [
    "DIRECT",
    "HOLE_PUNCHED",
    "NOT_CONNECTED",
    "RELAYED",
    "NatConfig",
    "NatService",
    "NatState",
    "reachability_name",
]

log = logging.getLogger(__name__)

DIRECT = "direct"
HOLE_PUNCHED = "hole-punched"
RELAYED = "relayed"
NOT_CONNECTED = "not connected"
DIAL_BACK_TIMEOUT_S = 5.0
QUERY_TIMEOUT_S = 10.0
MAX_SERVERS_ASKED = 6
REFRESH_MARGIN_S = 60.0  # re-reserve this long before a reservation expires


def reachability_name(value: int) -> str:
    if value == Reachability.REACHABILITY_PUBLIC:
        return "public"
    return "private" if value == Reachability.REACHABILITY_PRIVATE else "unknown"


@dataclass(frozen=True)
class NatConfig:
    autonat: bool = True  # find out our reachability (daemons); a client does not need to
    serve_autonat: bool = True  # dial others back when they ask
    relay: bool = False  # offer circuit relay v2 once AutoNAT says we are public
    reserve: bool = True  # when private, reserve slots on relays and advertise circuit addresses
    confirmations: int = 3  # AutoNAT answers that must agree before the verdict changes
    check_interval_s: float = 60.0  # AutoNAT re-check once decided
    retry_interval_s: float = 3.0  # AutoNAT and relay search while undecided / without a relay
    max_relays: int = 2
    relay_max_circuit_s: int = 3600  # per relayed connection
    relay_max_circuit_bytes: int = 1 << 30
    relay_max_circuits: int = 16
    relay_max_reservations: int = 32
    dial_timeout_s: float = 10.0

    def limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.relay_max_circuit_s,
            data=self.relay_max_circuit_bytes,
            max_circuit_conns=self.relay_max_circuits,
            max_reservations=self.relay_max_reservations,
        )


def _without_p2p(addr: Multiaddr) -> Multiaddr:
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:  # multiaddr raises ProtocolLookupError when absent
        return addr
    return addr.decapsulate(Multiaddr(f"/p2p/{value}")) if value else addr


class _DialBackAutoNAT(AutoNATService):
    """AutoNAT whose dial-back is a fresh TCP connection + Noise handshake to the claimed peer."""

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        network: Any = self.host.get_network()
        for raw in addrs:
            addr = _without_p2p(Multiaddr(raw))
            transport = network.transport_manager.transport_for_dialing(addr)
            if transport is None:
                continue
            with trio.move_on_after(DIAL_BACK_TIMEOUT_S):
                try:
                    conn = await transport.dial(addr)
                    try:
                        secured = await network.upgrader.upgrade_security(conn, True, peer_id)
                        await secured.close()
                    finally:
                        await conn.close()
                    return raw
                except Exception as e:  # unreachable: the answer is E_DIAL_ERROR
                    log.debug("AutoNAT dial-back to %s at %s: %r", peer_id, addr, e)
        return None


class _KeepRelayDCUtR(DCUtRProtocol):
    """DCUtR that does not close the relayed connection after an upgrade: tunnel streams
    opened on it would be cut mid-request. It ends with its streams or the relay's limits."""

    def _schedule_relay_close(self, peer_id: ID) -> None:
        return None


@dataclass(frozen=True)
class NatState:
    """What the node advertises, as plain values (crosses the bridge)."""

    version: int
    reachability: Reachability
    circuit_addresses: tuple[str, ...]
    relay: bool


@dataclass
class _Reservation:
    relay_address: str  # the relay's own address, as we are connected to it
    expires: float  # unix seconds


class NatService:
    def __init__(self, host: IHost, config: NatConfig) -> None:
        self.host = host
        self.config = config
        self.reachability: Reachability = Reachability.REACHABILITY_UNKNOWN
        self.relaying = False
        self.version = 0  # bumped whenever what we advertise changes
        self.autonat = _DialBackAutoNAT(host, serve=config.serve_autonat)  # type: ignore[arg-type]
        self.circuit = CircuitV2Protocol(host, limits=config.limits(), allow_hop=False)
        # STOP only: dialing through a relay must not take a reservation on it each time.
        self.transport = CircuitV2Transport(host, self.circuit, RelayConfig(roles=RelayRole.STOP))
        self.dcutr = _KeepRelayDCUtR(host)
        self._votes: dict[ID, bool] = {}
        self._reservations: dict[ID, _Reservation] = {}
        self._not_relays: dict[ID, float] = {}  # peer -> when to ask again
        self._relayed_peers: set[ID] = set()  # peers we have had a relayed connection with
        self._known_addrs: dict[ID, list[str]] = {}
        self._reported: set[tuple[str, ID | None]] = set()
        self.on_reachability: Callable[[Reachability], Awaitable[None]] | None = None  # after each change

    # -- what we advertise ------------------------------------------------------------------

    def circuit_addresses(self) -> list[str]:
        me = self.host.get_id().to_base58()
        return [f"{r.relay_address}/p2p/{relay}/p2p-circuit/p2p/{me}" for relay, r in self._reservations.items()]

    async def state(self) -> NatState:
        return NatState(self.version, self.reachability, tuple(self.circuit_addresses()), self.relaying)

    def _changed(self) -> None:
        self.version += 1

    # -- running ----------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.circuit), background_trio_service(self.dcutr):
            task_status.started()
            while True:
                if self.config.autonat:
                    await self._check_reachability()
                if self.config.relay:
                    self._offer_relay(self.reachability == Reachability.REACHABILITY_PUBLIC)
                if self.config.reserve and self.reachability == Reachability.REACHABILITY_PRIVATE:
                    await self._keep_reservations()
                self._report_failed_hole_punches()
                decided = self.reachability != Reachability.REACHABILITY_UNKNOWN
                need_relay = self.reachability == Reachability.REACHABILITY_PRIVATE and not self._reservations
                idle = decided and not need_relay
                await trio.sleep(self.config.check_interval_s if idle else self.config.retry_interval_s)

    def _direct_peers(self) -> list[ID]:
        network: Any = self.host.get_network()
        return [
            peer
            for peer in self.host.get_connected_peers()
            if any(c.get_connection_type() != ConnectionType.RELAYED for c in network.get_connections(peer))
        ]

    def _our_addresses(self) -> list[bytes]:
        """Our listen addresses, plus each as an observer sees it (its IP, our listen port)."""
        listen = [_without_p2p(a) for a in self.host.get_addrs() if "/p2p-circuit" not in str(a)]
        found = {str(a): a for a in listen}
        manager = getattr(self.host, "_observed_addr_manager", None)
        observed = manager.addrs(min_observers=1) if manager is not None else []
        for seen in observed:
            try:
                ip = seen.value_for_protocol("ip4")
            except Exception:  # not an IPv4 address
                continue
            for addr in listen:
                port = addr.value_for_protocol("tcp")
                guess = Multiaddr(f"/ip4/{ip}/tcp/{port}")
                found.setdefault(str(guess), guess)
        return [a.to_bytes() for a in found.values()]

    async def _check_reachability(self) -> None:
        peers = self._direct_peers()
        random.shuffle(peers)
        addrs = self._our_addresses()

        async def ask(peer: ID) -> None:
            try:
                status, _ = await self.autonat.query_server(peer, addrs=addrs, timeout=QUERY_TIMEOUT_S)
            except Exception as e:  # not an AutoNAT server (a client), or gone: no vote
                log.debug("AutoNAT: %s did not answer: %r", peer, unwrap(e))
                return
            if status == Message.OK:
                self._votes[peer] = True
            elif status in (Message.E_DIAL_ERROR, Message.E_DIAL_REFUSED):
                self._votes[peer] = False

        async with trio.open_nursery() as nursery:
            for peer in peers[:MAX_SERVERS_ASKED]:
                nursery.start_soon(ask, peer)
        yes = sum(self._votes.values())
        no = len(self._votes) - yes
        need = self.config.confirmations
        verdict = self.reachability
        if yes >= need and yes > no:
            verdict = Reachability.REACHABILITY_PUBLIC
        elif no >= need and no > yes:
            verdict = Reachability.REACHABILITY_PRIVATE
        if verdict == self.reachability:
            return
        self.reachability = verdict
        self._changed()
        if self.on_reachability is not None:
            await self.on_reachability(verdict)
        shown = ", ".join(str(Multiaddr(a)) for a in addrs)
        if verdict == Reachability.REACHABILITY_PUBLIC:
            log.info("AutoNAT: publicly reachable (%d of %d peers dialed us back at %s)", yes, yes + no, shown)
        else:
            log.warning(
                "AutoNAT: behind NAT or a firewall: %d of %d peers could not dial us back at %s;"
                " others reach us through relays only",
                no,
                yes + no,
                shown,
            )

    def _offer_relay(self, public: bool) -> None:
        if public == self.relaying:
            if not public and self.reachability == Reachability.REACHABILITY_PRIVATE:
                self._report_once("relay-private", None, "--relay: not offering a relay, AutoNAT found us private")
            return
        self.relaying = public
        self.circuit.allow_hop = public
        if public:
            self.host.set_stream_handler(HOP_PROTOCOL, self.circuit._handle_hop_stream)
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

    def _report_once(self, kind: str, peer: ID | None, message: str, *args: Any) -> None:
        if (kind, peer) not in self._reported:
            self._reported.add((kind, peer))
            log.warning(message, *args)

    # -- reservations -----------------------------------------------------------------------

    async def _reserve(self, relay: ID) -> bool:
        network: Any = self.host.get_network()
        conns = [c for c in network.get_connections(relay) if c.get_connection_type() != ConnectionType.RELAYED]
        if not conns:
            return False
        address = next((str(_without_p2p(a)) for a in conns[0].get_transport_addresses()), "")
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
        except Exception as e:  # it does not relay (multistream refuses the protocol), or is gone
            log.debug("%s is not a relay: %r", relay, unwrap(e))
            self._not_relays[relay] = time.monotonic() + 3 * self.config.retry_interval_s
            return False
        try:
            ok = await self.transport._make_reservation(stream, relay)
        finally:
            await stream.close()
        if not ok:
            self._report_once("refused", relay, "relay %s refused a reservation (full, or limits reached)", relay)
            self._not_relays[relay] = time.monotonic() + 20 * self.config.retry_interval_s
            return False
        expires = float(self.transport._reservations.get(relay, time.time() + 3600))
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
        for peer in self._direct_peers():
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

    # -- reaching peers ---------------------------------------------------------------------

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
                        await self.transport.dial(addr)
                        self._relayed_peers.add(peer)
                    else:
                        await self.host.connect(PeerInfo(peer, [_without_p2p(addr)]))
                return
            except Exception as e:  # libp2p raises several types for an unreachable peer
                errors.append(f"{text}: {unwrap(e)!r}")
        raise MoemeshError(f"cannot reach peer {peer}: " + ("; ".join(errors) or "no address known"))

    def path(self, peer: ID) -> str:
        network: Any = self.host.get_network()
        kinds = {c.get_connection_type() for c in network.get_connections(peer)}
        if ConnectionType.RELAYED in kinds:
            self._relayed_peers.add(peer)
        if kinds - {ConnectionType.RELAYED}:
            return HOLE_PUNCHED if peer in self._relayed_peers else DIRECT
        return RELAYED if kinds else NOT_CONNECTED

    def _report_failed_hole_punches(self) -> None:
        network: Any = self.host.get_network()
        for peer, attempts in list(self.dcutr._hole_punch_attempts.items()):
            if attempts >= MAX_HOLE_PUNCH_ATTEMPTS and network.get_connections(peer) and self.path(peer) == RELAYED:
                self._report_once(
                    "hole-punch",
                    peer,
                    "hole punching to %s failed %d times: staying relayed (a NAT that changes ports between"
                    " destinations, or one that refuses simultaneous opens, cannot be punched)",
                    peer,
                    attempts,
                )
