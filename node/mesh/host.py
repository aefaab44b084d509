"""The libp2p side of a node: a Noise-only host with a Kademlia DHT, run on the trio thread.

Everything here runs on trio (called through `node.bridge.TrioThread`); arguments and
results are plain values. Facts this code relies on (py-libp2p 0.8.1): plaintext security
is accepted unless only Noise is offered; connecting does not fill the DHT routing table
(`add_peer` must follow); `find_providers` returns duplicates and caches what it found;
`get_value` answers from the local store when it has the key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from node.errors import ConfigError, MeshError
from node.mesh.nat import NatConfig, NatService
from node.mesh.records import NAMESPACE, RecordValidator, peer_key
from protocol.mesh_pb2 import Reachability

__all__ = ["MeshConfig", "MeshNode", "noise_only_host"]

log = logging.getLogger(__name__)
PUSH_TIMEOUT_S = 3.0
RECORD_PROTOCOL = TProtocol("/moemesh/record/1.0.0")  # "send me your current signed record"
MAX_RECORD_BYTES = 64 * 1024
PRUNE_INTERVAL_S = 2.0
MAX_SERVERS_ASKED = 8


@dataclass(frozen=True)
class MeshConfig:
    listen_host: str = "127.0.0.1"
    port: int = 0
    bootstrap: tuple[str, ...] = ()
    server: bool = True  # DHT server mode (store records for others); clients only query
    timeout_s: float = 20.0


def noise_only_host(key_pair: KeyPair, listen: Sequence[Multiaddr]) -> IHost:
    """A host that speaks Noise and nothing else (py-libp2p would also accept plaintext)."""
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=list(listen),
    )


def _multiaddr(text: str) -> Multiaddr:
    try:
        addr = Multiaddr(text)
        info_from_p2p_addr(addr)
    except Exception:  # multiaddr raises several types
        raise ConfigError(
            f"{text!r} is not a multiaddr with a /p2p/ peer id (e.g. /ip4/1.2.3.4/tcp/4001/p2p/12D3...)"
        ) from None
    return addr


class _ServersOnlyDHT(KadDHT):
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


class MeshNode:
    """A libp2p host + DHT; `serve` is started in the trio thread's nursery."""

    def __init__(self, key_pair: KeyPair, config: MeshConfig, nat: NatConfig | None = None) -> None:
        self.key_pair = key_pair
        self.config = config
        self.peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
        self._bootstrap = [_multiaddr(b) for b in config.bootstrap]
        self._listen = [Multiaddr(f"/ip4/{config.listen_host}/tcp/{config.port}")]
        self.host = noise_only_host(key_pair, self._listen)
        self.dht = _ServersOnlyDHT(self.host, DHTMode.SERVER if config.server else DHTMode.CLIENT)
        self.dht.register_validator(NAMESPACE, RecordValidator())
        self.addresses: list[str] = []
        self.signed_record = b""  # what we answer on RECORD_PROTOCOL
        self.host.set_stream_handler(RECORD_PROTOCOL, self._answer_record)
        self.nat = NatService(self.host, nat) if nat is not None else None  # started after joining
        if self.nat is not None:
            self.nat.on_reachability = self._reachability_changed

    async def _reachability_changed(self, reachability: Reachability) -> None:
        """Only a reachable node serves the DHT: others would wait on an address they cannot dial."""
        mode = DHTMode.CLIENT if reachability == Reachability.REACHABILITY_PRIVATE else DHTMode.SERVER
        if not self.config.server or mode == self.dht.mode:
            return
        await self.dht.switch_mode(mode)
        log.info("the DHT now runs in %s mode", mode.value)
        push = getattr(self.host, "_push_identify_to_all_peers", None)  # tell peers our protocols changed
        if push is not None:
            await push()

    async def _prune_routing_table(self) -> None:
        while True:
            await trio.sleep(PRUNE_INTERVAL_S)
            self.dht.prune_clients()

    async def _answer_record(self, stream: Any) -> None:
        try:
            with trio.move_on_after(PUSH_TIMEOUT_S):
                await stream.write(self.signed_record)
        finally:
            await stream.close()

    async def _ask_record(self, peer_id: str) -> bytes | None:
        """The record straight from the peer (fresh, one dial), or None when it cannot be reached."""
        data = b""
        with trio.move_on_after(PUSH_TIMEOUT_S):
            try:
                stream = await self.host.new_stream(ID.from_base58(peer_id), [RECORD_PROTOCOL])
                try:
                    while len(data) <= MAX_RECORD_BYTES:
                        chunk = await stream.read(MAX_RECORD_BYTES)
                        if not chunk:
                            break
                        data += chunk
                finally:
                    await stream.close()
            except Exception as e:  # StreamEOF ends a complete answer; anything else: ask the DHT
                log.debug("asking %s for its record: %r", peer_id, e)
        return data or None

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, join the swarm through the bootstrap peers, then run until cancelled."""
        async with self.host.run(self._listen), background_trio_service(self.dht):
            self.addresses = [str(a) for a in self.host.get_addrs()]
            try:
                await self._join()
                async with trio.open_nursery() as nursery:
                    if self.nat is not None:
                        await nursery.start(self.nat.run)
                    nursery.start_soon(self._prune_routing_table)
                    task_status.started(self.addresses)
                    await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    for listener in list(self.host.get_network().listeners.values()):
                        await listener.close()

    async def _join(self) -> None:
        if not self._bootstrap:
            return
        joined = 0
        errors = []
        for addr in self._bootstrap:
            info = info_from_p2p_addr(addr)
            try:
                with trio.fail_after(self.config.timeout_s):
                    await self.host.connect(info)
                await self.dht.add_peer(info.peer_id)
                joined += 1
            except Exception as e:  # libp2p raises several types for an unreachable peer
                errors.append(f"{addr}: {e}")
        if not joined:
            raise MeshError("no bootstrap peer could be reached: " + "; ".join(errors))
        if self.config.server:
            with trio.move_on_after(self.config.timeout_s):
                await self.dht.refresh_routing_table()

    async def publish(self, signed_record: bytes, provider_keys: Sequence[str], full: bool = True) -> None:
        """Store our record under our peer key and announce us as provider of `provider_keys`.

        The record is first pushed straight to every DHT server we know, concurrently and
        briefly (a dead peer costs at most `PUSH_TIMEOUT_S`): that alone reaches the whole
        table of a small swarm and is what a withdrawal on shutdown relies on. With `full`,
        a regular Kademlia put (lookup of the closest peers, then stores) follows.
        """
        key = peer_key(self.peer_id)
        self.signed_record = signed_record
        self.dht.value_store.remove(key.encode())  # ours is always the newest: replace it
        self.dht.value_store.put(key.encode(), signed_record)
        peers = set(self.dht.routing_table.get_peer_ids()) | set(self.host.get_connected_peers())
        peers.discard(self.host.get_id())

        async def push(peer: ID) -> None:
            with trio.move_on_after(PUSH_TIMEOUT_S):
                try:
                    await self.dht.value_store._store_at_peer(peer, key.encode(), signed_record)
                except Exception as e:  # an unreachable peer: the others still get it
                    log.debug("pushing our record to %s: %s", peer, e)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(push, peer)
        if not full:
            return
        with trio.move_on_after(self.config.timeout_s):
            await self.dht.put_value(key, signed_record)
        async with trio.open_nursery() as nursery:
            for provider_key in provider_keys:
                nursery.start_soon(self._provide, provider_key)

    async def _provide(self, provider_key: str) -> None:
        with trio.move_on_after(self.config.timeout_s):
            await self.dht.provide(provider_key)

    async def providers(self, provider_key: str, count: int = 64) -> list[str]:
        """Peer ids that announced `provider_key` (deduplicated)."""
        found = await self.dht.find_providers(provider_key, count=count)
        return sorted({info.peer_id.to_base58() for info in found})

    async def providers_of_all(self, provider_keys: Sequence[str]) -> list[str]:
        """Union of the providers of several keys, looked up concurrently."""
        found: set[str] = set()

        async def one(key: str) -> None:
            with trio.move_on_after(self.config.timeout_s):
                found.update(await self.providers(key))

        async with trio.open_nursery() as nursery:
            for key in provider_keys:
                nursery.start_soon(one, key)
        return sorted(found)

    async def record(self, peer_id: str) -> bytes | None:
        """A peer's record: asked of the peer itself, else of the DHT (not of our cache)."""
        if peer_id != self.peer_id:
            direct = await self._ask_record(peer_id)
            if direct is not None:
                return direct
        key = peer_key(peer_id)
        if peer_id != self.peer_id:
            self.dht.value_store.remove(key.encode())
            # A peer behind NAT cannot be asked; the DHT servers it pushed its record to can,
            # one request each (a full lookup takes ~20 s in py-libp2p 0.8.1 when a peer is unreachable).
            stored = await self._ask_servers(key)
            if stored is not None:
                return stored
        value: bytes | None = await self.dht.get_value(key)
        return value

    async def _ask_servers(self, key: str) -> bytes | None:
        found: list[bytes] = []

        async def one(peer: ID) -> None:
            with trio.move_on_after(PUSH_TIMEOUT_S):
                try:
                    value = await self.dht.value_store._get_from_peer(peer, key.encode())
                except Exception as e:  # an unreachable server: the others may answer
                    log.debug("asking %s for %s: %r", peer, key, e)
                    return
                if isinstance(value, bytes) and value:
                    found.append(value)

        async with trio.open_nursery() as nursery:
            for peer in self.dht.routing_table.get_peer_ids()[:MAX_SERVERS_ASKED]:
                nursery.start_soon(one, peer)
        if not found:
            return None
        return found[RecordValidator().select(key, found)]

    async def records(self, peer_ids: Sequence[str]) -> dict[str, bytes]:
        results: dict[str, bytes] = {}

        async def one(pid: str) -> None:
            for attempt in range(2):  # a lookup racing a loaded swarm can come back empty once
                try:
                    with trio.move_on_after(self.config.timeout_s):
                        value = await self.record(pid)
                        if value is not None:
                            results[pid] = value
                            return
                except Exception as e:  # one unreachable peer must not fail the others
                    log.debug("record of %s (attempt %d): %s", pid, attempt + 1, e)

        async with trio.open_nursery() as nursery:
            for pid in peer_ids:
                nursery.start_soon(one, pid)
        return results
