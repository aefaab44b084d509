"""Every use of py-libp2p's private API, as small typed wrappers, in one place.

py-libp2p 0.8.1 lacks public hooks for several things we need (push a value to one DHT
peer, ask one peer for a value, a dial-back on a fresh connection, keeping a relayed
connection after DCUtR, ...). Each such use is here and nowhere else, and
`tests/test_libp2p_internals.py` checks each one (name, signature, and behaviour where
cheap), so an upgrade that removes or renames one fails there, not in a swarm.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from libp2p.abc import IHost, INetStream
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from multiaddr import Multiaddr

__all__ = [
    "DialBack",
    "DialBackAutoNAT",
    "KeepRelayDCUtR",
    "close_write",
    "gate_opened_streams",
    "get_from_peer",
    "handle_hop_stream",
    "hole_punch_attempts",
    "make_reservation",
    "observed_addresses",
    "push_identify",
    "reservation_expiry",
    "secure_dial",
    "store_at_peer",
]

log = logging.getLogger(__name__)

DialBack = Callable[[ID, list[bytes]], Awaitable[bytes | None]]


# -- Kademlia -------------------------------------------------------------------------------


async def store_at_peer(dht: KadDHT, peer: ID, key: bytes, value: bytes) -> bool:
    """One PUT_VALUE to one peer (KadDHT only offers a full lookup + puts)."""
    return bool(await dht.value_store._store_at_peer(peer, key, value))


async def get_from_peer(dht: KadDHT, peer: ID, key: bytes) -> bytes | None:
    """One GET_VALUE to one peer; None when it has no value."""
    value = await dht.value_store._get_from_peer(peer, key)
    return value if isinstance(value, bytes) and value else None


# -- the host -------------------------------------------------------------------------------


def gate_opened_streams(host: IHost, protocol: str, after_open: Callable[[INetStream], Awaitable[None]]) -> None:
    """Every stream `host` opens on `protocol`, py-libp2p's own code's included, runs `after_open`
    before it is handed out (a failure resets it and raises). py-libp2p opens its Kademlia
    streams itself, with `host.new_stream`: the host object's method is wrapped."""
    opened = host.new_stream

    async def new_stream(peer_id: ID, protocol_ids: Any) -> INetStream:
        stream = await opened(peer_id, protocol_ids)
        if stream.get_protocol() == protocol:
            try:
                await after_open(stream)
            except BaseException:
                await stream.reset()
                raise
        return stream

    host.new_stream = new_stream  # type: ignore[method-assign]


async def push_identify(host: IHost) -> None:
    """Tell every connected peer that our protocols changed (identify push)."""
    await cast(Any, host)._push_identify_to_all_peers()


def observed_addresses(host: IHost) -> list[Multiaddr]:
    """Our addresses as connected peers reported seeing them (identify's observed address)."""
    manager = cast(Any, host)._observed_addr_manager
    return list(manager.addrs(min_observers=1)) if manager is not None else []


async def secure_dial(host: IHost, addr: Multiaddr, peer: ID) -> bool:
    """A fresh TCP connection to `addr` and a Noise handshake proving it is `peer`, closed at once.

    False when no transport of ours dials `addr`; raises when the dial or the handshake fails.
    The host's `connect` would reuse an existing connection, which proves nothing."""
    network = cast(Any, host.get_network())
    transport = network.transport_manager.transport_for_dialing(addr)
    if transport is None:
        return False
    conn = await transport.dial(addr)
    try:
        secured = await network.upgrader.upgrade_security(conn, True, peer)
        await secured.close()
    finally:
        await conn.close()
    return True


async def close_write(stream: INetStream) -> None:
    """Half-close: we send no more, the peer may (not on the INetStream interface)."""
    await cast(Any, stream).close_write()


# -- AutoNAT --------------------------------------------------------------------------------


class DialBackAutoNAT(AutoNATService):
    """AutoNAT whose server-side dial-back is ours (`_try_dial` is its private hook)."""

    def __init__(self, host: IHost, dial_back: DialBack, serve: bool = True) -> None:
        super().__init__(host, serve=serve)  # type: ignore[arg-type]  # typed as BasicHost
        self._dial_back = dial_back

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        return await self._dial_back(peer_id, addrs)


# -- circuit relay v2 -----------------------------------------------------------------------


async def handle_hop_stream(circuit: CircuitV2Protocol, stream: INetStream) -> None:
    """The relay's HOP handler, to register when we start relaying after the protocol started."""
    await circuit._handle_hop_stream(stream)


async def make_reservation(transport: CircuitV2Transport, stream: INetStream, relay: ID) -> bool:
    """Reserve a slot on `relay` over an open HOP stream."""
    return bool(await transport._make_reservation(stream, relay))


def reservation_expiry(transport: CircuitV2Transport, relay: ID) -> float | None:
    """When our reservation on `relay` expires (unix seconds), if the transport holds one."""
    value = transport._reservations.get(relay)
    return float(value) if value is not None else None


# -- DCUtR ----------------------------------------------------------------------------------


class KeepRelayDCUtR(DCUtRProtocol):
    """DCUtR that does not close the relayed connection after an upgrade: tunnel streams
    opened on it would be cut mid-request. It ends with its streams or the relay's limits."""

    def _schedule_relay_close(self, peer_id: ID) -> None:
        return None


def hole_punch_attempts(dcutr: DCUtRProtocol) -> dict[ID, int]:
    """Hole-punch attempts per peer so far."""
    return dict(dcutr._hole_punch_attempts)
