"""Reading the swarm from the DHT: verified, live peer records, per model or all of them."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from crdt import Replica, SwarmState, decode_frame, encode_frame
from node.bridge import TrioThread
from node.errors import ConfigError, RouteError
from node.identity import ephemeral_identity
from node.p2p import MeshConfig, MeshNode
from node.records import ALL_PEERS_KEY, InvalidRecord, block_key, is_live, now_ms, verify_record
from node.syncwire import fetch_state
from protocol.mesh_pb2 import PeerRecord

__all__ = ["SwarmReader", "SwarmSnapshot"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmSnapshot:
    records: dict[str, PeerRecord]  # peer id -> live, verified record
    ignored: dict[str, str]  # peer id -> why its record was not believed
    taken_at_ms: int

    def models(self) -> dict[str, tuple[str, int]]:
        """model id -> (name, number of layers)."""
        return {ad.model_id: (ad.model_name, ad.num_layers) for r in self.records.values() for ad in r.shards}


class SwarmReader:
    """A DHT client (ephemeral identity) on its own trio thread; use as a context manager."""

    def __init__(self, bootstrap: Sequence[str], timeout_s: float = 20.0) -> None:
        if not bootstrap:
            raise ConfigError("give at least one bootstrap multiaddr")
        self._bootstrap = list(bootstrap)
        self._thread = TrioThread("moemesh-dht-client")
        self._node = MeshNode(
            ephemeral_identity(), MeshConfig(bootstrap=tuple(bootstrap), server=False, timeout_s=timeout_s)
        )

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
        reader = Replica(self._node.peer_id)
        data = self._thread.call_sync(fetch_state, self._node.host, peer_id, [target], encode_frame(reader.pull()))
        if data is None:
            return None
        reader.receive(decode_frame(data))  # its whole document: the answer to our empty state vector
        return reader.state

    def _read(self, peer_ids: Sequence[str]) -> SwarmSnapshot:
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
        snapshot = self._read(self._thread.call_sync(self._node.providers, ALL_PEERS_KEY))
        for attempt in range(1, attempts):
            if snapshot.records:
                break
            time.sleep(0.5 * attempt)
            snapshot = self._read(self._thread.call_sync(self._node.providers, ALL_PEERS_KEY))
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
            first = self._read(self._thread.call_sync(self._node.providers, block_key(model_id, 0)))
            layers = {ad.num_layers for r in first.records.values() for ad in r.shards if ad.model_id == model_id}
        if not layers:
            raise RouteError(f"no peer serves model {model_id}")
        keys = [block_key(model_id, block) for block in range(max(layers))]
        providers = set(self._thread.call_sync(self._node.providers_of_all, keys))
        extra = self._read(sorted(providers - set(everyone.records) - set(everyone.ignored)))
        records = {**everyone.records, **extra.records}
        serving = {pid: r for pid, r in records.items() if any(ad.model_id == model_id for ad in r.shards)}
        return model_id, SwarmSnapshot(serving, {**everyone.ignored, **extra.ignored}, everyone.taken_at_ms)
