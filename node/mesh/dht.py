"""Kademlia (`/ipfs/kad/1.0.0`): our signed records by peer key, providers by block key.

Facts this relies on (py-libp2p 0.8.1): connecting does not fill the routing table
(`add_peer` must follow); `find_providers` returns duplicates and caches what it found;
`get_value` answers from the local store when it has the key; a full lookup takes ~20 s
when one peer is unreachable, so records are also pushed to and asked of known servers
one request each.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from node.mesh.internals import get_from_peer, push_identify, store_at_peer
from node.mesh.keyed import gate_kademlia, key_of
from node.mesh.records import NAMESPACE, RecordValidator
from protocol.mesh_pb2 import Reachability

__all__ = ["KAD_PROTOCOL", "Dht", "DhtConfig", "ServersOnlyDHT", "install"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DhtConfig:
    server: bool = True  # server mode (store records for others); clients only query
    timeout_s: float = 20.0  # one lookup, put or provide
    push_timeout_s: float = 3.0  # one request to one peer
    prune_interval_s: float = 2.0
    max_servers_asked: int = 8


class ServersOnlyDHT(KadDHT):
    """KadDHT that keeps DHT clients out of its routing table.

    py-libp2p adds every peer that opens a DHT stream, skipping the server-mode check
    ("they MUST support KAD server mode"), which clients do not: each short-lived client
    (`moemesh status`, a generating SDK) then lingers in the table and every later lookup
    dials it in vain. Here the identify-based check always applies.
    """

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        return await super().add_peer(peer_id, skip_server_mode_check=False)

    def prune_clients(self) -> None:
        """Drop peers that no longer serve the DHT (identify says so): a daemon that found itself
        behind NAT switches to client mode, and lookups must not wait on its unreachable address."""
        store = self.host.get_peerstore()
        for peer in self.routing_table.get_peer_ids():
            try:
                protocols = store.get_protocols(peer)
            except Exception:  # PeerStoreError: nothing known yet
                continue
            if protocols and KAD_PROTOCOL not in protocols:
                log.info("%s left DHT server mode: dropping it from the routing table", peer)
                self.routing_table.remove_peer(peer)


class Dht:
    """Our DHT: the Kademlia service plus the one-request helpers publishing and reading use."""

    def __init__(self, host: IHost, config: DhtConfig) -> None:
        self.host = host
        self.config = config
        self.kad = ServersOnlyDHT(host, DHTMode.SERVER if config.server else DHTMode.CLIENT)
        self.validator = RecordValidator(key_of(host))  # a private swarm's values are sealed
        self.kad.register_validator(NAMESPACE, self.validator)
        self._gate()

    def _gate(self) -> None:
        """A private swarm's Kademlia streams prove its key (node.mesh.keyed), both ways."""
        gate_kademlia(self.host, KAD_PROTOCOL, self.kad.handle_stream if self.kad.mode == DHTMode.SERVER else None)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.kad):
            task_status.started()
            while True:
                await trio.sleep(self.config.prune_interval_s)
                self.kad.prune_clients()

    def servers(self) -> list[ID]:
        return list(self.kad.routing_table.get_peer_ids())

    async def follow(self, reachability: Reachability) -> None:
        """Only a reachable node serves the DHT: others would wait on an address they cannot dial."""
        mode = DHTMode.CLIENT if reachability == Reachability.REACHABILITY_PRIVATE else DHTMode.SERVER
        if not self.config.server or mode == self.kad.mode:
            return
        await self.kad.switch_mode(mode)
        self._gate()  # switching to server mode registered the bare handler
        log.info("the DHT now runs in %s mode", mode.value)
        await push_identify(self.host)  # tell peers our protocols changed

    def store_locally(self, key: str, value: bytes) -> None:
        """Ours is always the newest: replace what we hold."""
        self.kad.value_store.remove(key.encode())
        self.kad.value_store.put(key.encode(), value)

    def forget(self, key: str) -> None:
        self.kad.value_store.remove(key.encode())

    async def push(self, peers: Sequence[ID], key: str, value: bytes) -> None:
        """Store `value` at each peer, concurrently; a dead peer costs at most `push_timeout_s`."""

        async def one(peer: ID) -> None:
            with trio.move_on_after(self.config.push_timeout_s):
                try:
                    await store_at_peer(self.kad, peer, key.encode(), value)
                except Exception as e:  # an unreachable peer: the others still get it
                    log.debug("pushing %s to %s: %s", key, peer, e)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)

    async def put(self, key: str, value: bytes) -> None:
        with trio.move_on_after(self.config.timeout_s):
            await self.kad.put_value(key, value)

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self.kad.get_value(key)
        return value

    async def provide(self, keys: Sequence[str]) -> None:
        async def one(key: str) -> None:
            with trio.move_on_after(self.config.timeout_s):
                await self.kad.provide(key)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)

    async def providers(self, key: str, count: int = 64) -> list[str]:
        """Peer ids that announced `key` (deduplicated)."""
        found = await self.kad.find_providers(key, count=count)
        return sorted({info.peer_id.to_base58() for info in found})

    async def ask_servers(self, key: str) -> bytes | None:
        """The newest valid value any of the first `max_servers_asked` known servers holds."""
        found: list[bytes] = []

        async def one(peer: ID) -> None:
            with trio.move_on_after(self.config.push_timeout_s):
                try:
                    value = await get_from_peer(self.kad, peer, key.encode())
                except Exception as e:  # an unreachable server: the others may answer
                    log.debug("asking %s for %s: %r", peer, key, e)
                    return
                if value is not None:
                    found.append(value)

        async with trio.open_nursery() as nursery:
            for peer in self.servers()[: self.config.max_servers_asked]:
                nursery.start_soon(one, peer)
        if not found:
            return None
        return found[self.validator.select(key, found)]


def install(host: IHost, config: DhtConfig) -> Dht:
    """Register Kademlia on `host` (validating our namespace); run the result."""
    return Dht(host, config)
