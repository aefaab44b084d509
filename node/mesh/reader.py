"""Reading the swarm from the DHT: verified, live peer records, per model or all of them."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from crdt import Replica, SwarmState, decode_frame, encode_frame
from node.errors import ConfigError, InvalidRecord, RouteError
from node.mesh.autonat import AutoNATConfig
from node.mesh.bridge import TrioThread
from node.mesh.host import MeshConfig, MeshNode
from node.mesh.identity import Libp2pVerifier, ephemeral_identity
from node.mesh.nat import NOT_CONNECTED, NatConfig
from node.mesh.records import ALL_PEERS_KEY, block_key, is_live, now_ms, verify_record
from node.mesh.relay import RelayConfig
from node.mesh.sync import fetch_state
from node.mesh.tunnel import TunnelClient
from node.swarmkey import SwarmKey
from protocol.mesh_pb2 import PeerRecord, Reachability

__all__ = ["SwarmReader", "SwarmSnapshot", "addresses_to_dial"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmSnapshot:
    records: dict[str, PeerRecord]  # peer id -> live, verified record
    ignored: dict[str, str]  # peer id -> why its record was not believed
    taken_at_ms: int

    def models(self) -> dict[str, tuple[str, int]]:
        """model id -> (name, number of layers)."""
        return {ad.model_id: (ad.model_name, ad.num_layers) for r in self.records.values() for ad in r.shards}


def addresses_to_dial(record: PeerRecord) -> list[str]:
    """Where to dial a peer's libp2p host: through its relays when it is behind NAT."""
    if record.reachability == Reachability.REACHABILITY_PRIVATE:
        return list(record.circuit_addresses)
    return list(record.p2p_addresses) + list(record.circuit_addresses)


class SwarmReader:
    """A DHT client (ephemeral identity) on its own trio thread; use as a context manager.

    With `traversal`, it can also reach peers behind NAT (through relays, upgraded by hole
    punching when the NATs allow) and tunnel gRPC to them: its host then listens on every
    interface, because hole punching dials from the listen port.
    """

    def __init__(
        self,
        bootstrap: Sequence[str],
        timeout_s: float = 20.0,
        *,
        traversal: bool = False,
        swarm_key: SwarmKey | None = None,
    ) -> None:
        if not bootstrap:
            raise ConfigError("give at least one bootstrap multiaddr")
        self._bootstrap = list(bootstrap)
        self._thread = TrioThread("moemesh-dht-client")
        mesh = MeshConfig(
            listen_host="0.0.0.0" if traversal else "127.0.0.1",
            bootstrap=tuple(bootstrap),
            server=False,
            timeout_s=timeout_s,
            swarm_key=swarm_key,
        )
        nat = NatConfig(AutoNATConfig(check=False, serve=False), RelayConfig(reserve=False)) if traversal else None
        self._node = MeshNode(ephemeral_identity(), mesh, nat)
        self._tunnels: dict[str, str] = {}
        self._tunnel_client = TunnelClient(self._node.host, self._connect) if traversal else None

    def __enter__(self) -> SwarmReader:
        self._thread.start()
        try:
            self._thread.call_sync(self._thread.start_service, self._node.serve)
        except BaseException:
            self._thread.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop()

    def swarm_state(self, multiaddr: str | None = None) -> SwarmState | None:
        """The replicated swarm state as one daemon holds it (the first bootstrap peer by default);
        None when it does not answer the sync protocol."""
        target = multiaddr or self._bootstrap[0]
        peer_id = info_from_p2p_addr(Multiaddr(target)).peer_id.to_base58()
        reader = Replica(Libp2pVerifier())  # read-only: it verifies, it signs nothing
        data = self._thread.call_sync(fetch_state, self._node.host, peer_id, [target], encode_frame(reader.pull()))
        if data is None:
            return None
        reader.receive(decode_frame(data))  # its whole document: the answer to our empty state vector
        return reader.state

    # -- reaching peers behind NAT (with `traversal`) ----------------------------------------

    async def _connect(self, peer: ID, addresses: Sequence[str] = ()) -> None:
        assert self._node.nat is not None
        await self._node.nat.connect(peer, addresses)

    async def _path(self, peer_id: str) -> str:
        return self._node.nat.path(ID.from_base58(peer_id)) if self._node.nat is not None else NOT_CONNECTED

    def tunnel(self, record: PeerRecord) -> str:
        """host:port on loopback whose connections reach the peer's gRPC port over libp2p.

        Dials the peer first (MoemeshError when it cannot be reached)."""
        if self._tunnel_client is None:
            raise ConfigError("this reader was made without traversal=True")
        from node.mesh.records import peer_id_of

        pid = peer_id_of(record)
        if pid not in self._tunnels:
            self._thread.call_sync(self._connect, ID.from_base58(pid), addresses_to_dial(record))
            port = self._thread.call_sync(self._thread.start_service, partial(self._tunnel_client.listen, pid))
            self._tunnels[pid] = f"127.0.0.1:{port}"
        return self._tunnels[pid]

    def path(self, peer_id: str) -> str:
        """How our host is connected to the peer: direct, hole-punched, relayed or not connected."""
        return self._thread.call_sync(self._path, peer_id)

    def reach(self, records: dict[str, PeerRecord], timeout_s: float = 10.0) -> dict[str, str]:
        """Dial every peer (concurrently, bounded) and say how each is connected."""

        async def all_of_them() -> dict[str, str]:
            async def one(pid: str, record: PeerRecord) -> None:
                with trio.move_on_after(timeout_s):
                    try:
                        await self._connect(ID.from_base58(pid), addresses_to_dial(record))
                    except Exception as e:  # shown as "not connected"
                        log.info("cannot reach %s: %s", pid, e)

            async with trio.open_nursery() as nursery:
                for pid, record in records.items():
                    nursery.start_soon(one, pid, record)
            return {pid: await self._path(pid) for pid in records}

        return self._thread.call_sync(all_of_them)

    def read(self, peer_ids: Sequence[str]) -> SwarmSnapshot:
        """The verified live records of `peer_ids` (asked of each peer, else the DHT); the rest ignored, with why."""
        raw = self._thread.call_sync(self._node.records, list(peer_ids))
        at = now_ms()
        records: dict[str, PeerRecord] = {}
        ignored: dict[str, str] = {}
        for pid in peer_ids:
            if pid not in raw:
                ignored[pid] = "no record found"
                continue
            try:
                record = verify_record(raw[pid], peer_id=pid)
            except InvalidRecord as e:
                ignored[pid] = str(e)
                log.info("ignoring the record of %s: %s", pid, e)
                continue
            if record.withdrawn:
                ignored[pid] = "withdrawn"
            elif not is_live(record, at):
                ignored[pid] = "expired"
            else:
                records[pid] = record
        return SwarmSnapshot(records, ignored, at)

    def everyone(self, attempts: int = 3) -> SwarmSnapshot:
        """Every daemon that announced itself (asks again, briefly, while the answer is empty)."""
        snapshot = self.read(self._thread.call_sync(self._node.providers, ALL_PEERS_KEY))
        for attempt in range(1, attempts):
            if snapshot.records:
                break
            time.sleep(0.5 * attempt)
            snapshot = self.read(self._thread.call_sync(self._node.providers, ALL_PEERS_KEY))
        return snapshot

    def model(self, model_id: str | None) -> tuple[str, SwarmSnapshot]:
        """The records of the peers serving any block of `model_id` (the only model, if None).

        Peers are found through the provider keys of every block (and the all-peers key);
        each peer's record is read once.
        """
        everyone = self.everyone()
        if model_id is None:
            models = everyone.models()
            if not models:
                seen = f"{len(everyone.records)} live records"
                if everyone.ignored:
                    reasons = ", ".join(f"{pid[-8:]}: {why}" for pid, why in sorted(everyone.ignored.items()))
                    seen += f"; ignored {reasons}"
                raise RouteError(f"the swarm serves no model yet ({seen})")
            if len(models) > 1:
                listing = ", ".join(f"{m} ({name})" for m, (name, _) in sorted(models.items()))
                raise ConfigError(f"the swarm serves several models, pick one with model_id: {listing}")
            model_id = next(iter(models))
        layers = {ad.num_layers for r in everyone.records.values() for ad in r.shards if ad.model_id == model_id}
        if not layers:
            first = self.read(self._thread.call_sync(self._node.providers, block_key(model_id, 0)))
            layers = {ad.num_layers for r in first.records.values() for ad in r.shards if ad.model_id == model_id}
        if not layers:
            raise RouteError(f"no peer serves model {model_id}")
        keys = [block_key(model_id, block) for block in range(max(layers))]
        providers = set(self._thread.call_sync(self._node.providers_of_all, keys))
        extra = self.read(sorted(providers - set(everyone.records) - set(everyone.ignored)))
        records = {**everyone.records, **extra.records}
        serving = {pid: r for pid, r in records.items() if any(ad.model_id == model_id for ad in r.shards)}
        return model_id, SwarmSnapshot(serving, {**everyone.ignored, **extra.ignored}, everyone.taken_at_ms)
