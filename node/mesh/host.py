"""The libp2p host of a node: a Noise-only host composing our protocols, run on the trio thread.

Everything here runs on trio (called through `node.mesh.bridge.TrioThread`); arguments
and results are plain values. Each protocol is one module exporting its protocol id, a
frozen config and `install(host, config, ...)`, which returns a piece with a `run` method
(rust-libp2p's behaviours): `MeshNode.serve` installs them on the trio thread, starts each
piece in its nursery, and joins the swarm. The pieces: Kademlia (`dht`), the record
protocol (`record`), any extra protocols the caller gives (the gRPC tunnel of a daemon),
and, once joined, AutoNAT, circuit relay v2 and DCUtR (`autonat`, `relay`, `holepunch`,
seen together as `nat.Nat`), which need connected peers to be of use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from node.errors import ConfigError, InvalidRecord, MeshError
from node.mesh import autonat, holepunch, relay
from node.mesh import dht as kademlia
from node.mesh import record as asking
from node.mesh.dht import Dht, DhtConfig
from node.mesh.keyed import attach
from node.mesh.nat import Nat, NatConfig, NatState
from node.mesh.record import RecordConfig, RecordProtocol
from node.mesh.records import peer_key, unseal_record
from node.swarmkey import SwarmKey
from protocol.mesh_pb2 import Reachability

__all__ = ["Installer", "MeshConfig", "MeshNode", "Piece", "noise_only_host", "quiet_libp2p"]

log = logging.getLogger(__name__)


class Piece(Protocol):
    """An installed protocol: `run` reports started, then serves until cancelled."""

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None: ...


Installer = Callable[[IHost], Piece]  # e.g. functools.partial(tunnel.install_server, config=..., target=...)


@dataclass(frozen=True)
class MeshConfig:
    listen_host: str = "127.0.0.1"
    port: int = 0
    bootstrap: tuple[str, ...] = ()
    server: bool = True  # DHT server mode (store records for others); clients only query
    timeout_s: float = 20.0  # joining one bootstrap peer; one DHT lookup, put or provide
    record: RecordConfig = field(default_factory=RecordConfig)
    swarm_key: SwarmKey | None = None  # a private swarm (node.swarmkey): only holders of the key are spoken to

    def dht(self) -> DhtConfig:
        return DhtConfig(server=self.server, timeout_s=self.timeout_s)


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


def quiet_libp2p() -> None:
    """py-libp2p's logger has no handler and does not propagate, so its routine warnings about
    unreachable peers reach stderr through logging's last resort (hundreds of lines for one
    SDK client). Unless the application gave it a handler, it gets a NullHandler; set
    `logging.getLogger("libp2p").propagate = True` to see its records in your own logging."""
    logger = logging.getLogger("libp2p")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


class MeshNode:
    """A libp2p host and its protocols; `serve` is started in the trio thread's nursery.

    `dht`, `record`, `nat` and `installed` (the pieces of `protocols`) exist once `serve`
    has reported started."""

    def __init__(
        self,
        key_pair: KeyPair,
        config: MeshConfig,
        nat: NatConfig | None = None,
        *,
        protocols: Sequence[Installer] = (),
    ) -> None:
        quiet_libp2p()
        self.key_pair = key_pair
        self.config = config
        self.peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
        self._bootstrap = [_multiaddr(b) for b in config.bootstrap]
        self._listen = [Multiaddr(f"/ip4/{config.listen_host}/tcp/{config.port}")]
        self._nat_config = nat
        self._protocols = list(protocols)
        self.host = noise_only_host(key_pair, self._listen)
        attach(self.host, config.swarm_key)  # our protocols' streams prove the key (node.mesh.keyed)
        self.addresses: list[str] = []
        self._dht: Dht | None = None
        self._record: RecordProtocol | None = None
        self.nat: Nat | None = None
        self.installed: list[Piece] = []

    @property
    def dht(self) -> Dht:
        if self._dht is None:
            raise MeshError("the mesh node is not running")
        return self._dht

    @property
    def record_protocol(self) -> RecordProtocol:
        if self._record is None:
            raise MeshError("the mesh node is not running")
        return self._record

    def _install_nat(self, config: NatConfig) -> list[Piece]:
        found = autonat.install(self.host, config.autonat)
        relaying = relay.install(self.host, config.relay, found)
        punching = holepunch.install(self.host, config.holepunch)
        found.on_change.append(self.dht.follow)
        self.nat = Nat(self.host, config, found, relaying, punching)
        return [found, relaying, punching]

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, install our protocols, join the swarm through the bootstrap peers, then run until cancelled."""
        async with self.host.run(self._listen):
            try:
                if not self.host.get_addrs():  # py-libp2p logs a failed bind and goes on without a listener
                    where = f"{self.config.listen_host}:{self.config.port}"
                    raise OSError(f"cannot listen for libp2p on {where}: the port is in use (or the host is not ours)")
                self._dht = kademlia.install(self.host, self.config.dht())
                self._record = asking.install(self.host, self.config.record)
                self.installed = [install(self.host) for install in self._protocols]
                after_join = self._install_nat(self._nat_config) if self._nat_config is not None else []
                self.addresses = [str(a) for a in self.host.get_addrs()]
                before_join: list[Piece] = [self._dht, self._record, *self.installed]
                async with trio.open_nursery() as nursery:
                    for piece in before_join:
                        await nursery.start(piece.run)
                    await self._join()
                    for piece in after_join:
                        await nursery.start(piece.run)
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
                await self.dht.kad.add_peer(info.peer_id)
                joined += 1
            except Exception as e:  # libp2p raises several types for an unreachable peer
                errors.append(f"{addr}: {e}")
        if not joined:
            raise MeshError("no bootstrap peer could be reached: " + "; ".join(errors))
        if self.config.server:
            with trio.move_on_after(self.config.timeout_s):
                await self.dht.kad.refresh_routing_table()

    async def publish(self, signed_record: bytes, provider_keys: Sequence[str], full: bool = True) -> None:
        """Store our record under our peer key and announce us as provider of `provider_keys`.

        The record is first pushed straight to every DHT server we know, concurrently and
        briefly (a dead peer costs at most one push timeout): that alone reaches the whole
        table of a small swarm and is what a withdrawal on shutdown relies on. With `full`,
        a regular Kademlia put (lookup of the closest peers, then stores) follows.
        """
        key = peer_key(self.peer_id)
        swarm_key = self.config.swarm_key
        if swarm_key is not None:  # only members can read it; the validators refuse anything else
            signed_record = swarm_key.seal(key, signed_record)
            provider_keys = [swarm_key.provider_key(k) for k in provider_keys]
        self.record_protocol.signed = signed_record
        self.dht.store_locally(key, signed_record)
        peers = set(self.dht.servers()) | set(self.host.get_connected_peers())
        peers.discard(self.host.get_id())
        await self.dht.push(sorted(peers, key=str), key, signed_record)
        if not full:
            return
        await self.dht.put(key, signed_record)
        await self.dht.provide(provider_keys)

    async def providers(self, provider_key: str, count: int = 64) -> list[str]:
        """Peer ids that announced `provider_key` (deduplicated)."""
        if self.config.swarm_key is not None:
            provider_key = self.config.swarm_key.provider_key(provider_key)
        return await self.dht.providers(provider_key, count)

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
        """A peer's signed record: asked of the peer itself, else of the DHT (not of our cache)."""
        value = await self._sealed_record(peer_id)
        try:
            return None if value is None else unseal_record(peer_key(peer_id), value, self.config.swarm_key)
        except InvalidRecord as e:
            log.info("%s", e)
            return None

    async def _sealed_record(self, peer_id: str) -> bytes | None:
        key = peer_key(peer_id)
        if peer_id != self.peer_id:
            direct = await self.record_protocol.ask(peer_id)
            if direct is not None:
                return direct
            self.dht.forget(key)
            # A peer behind NAT cannot be asked; the DHT servers it pushed its record to can,
            # one request each (a full lookup takes ~20 s in py-libp2p 0.8.1 when a peer is unreachable).
            stored = await self.dht.ask_servers(key)
            if stored is not None:
                return stored
        return await self.dht.get(key)

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

    async def nat_state(self) -> NatState:
        """What we advertise about NAT; the default when NAT is off."""
        if self.nat is None:
            return NatState(0, Reachability.REACHABILITY_UNKNOWN, (), False)
        return await self.nat.state()
