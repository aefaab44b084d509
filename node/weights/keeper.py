"""The daemon's weights: what it serves to peers, and fetching the span it is about to serve.

`WeightsKeeper` runs on the daemon's asyncio loop; the libp2p work (discovery, streams) runs
on the trio thread through the bridge. Its `holding()` is what the `/moemesh/weights/1.0.0`
server answers from (read on the trio thread per request), and `provider_keys()` what the
daemon announces in the DHT: one key per (model id, group) it holds whole.

Where the weights come from, by `WeightsPlan`:
- a local folder: it is served as it is (its manifest hashed once, then cached);
- a model id: the manifest is asked of the swarm's peers (any peer of the model has it and
  its hash must be the id), then each span's tensors are fetched (`node.weights.fetch`) into
  `<cache>/weights/<model id>/`, which `Checkpoint` then loads.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from node.errors import InvalidRecord, NoProviders
from node.mesh.bridge import TrioThread
from node.mesh.host import MeshNode
from node.mesh.reader import addresses_to_dial
from node.mesh.records import is_live, verify_record
from node.mesh.weights import Holding
from node.weights.cache import ModelCache, folder_holding
from node.weights.fetch import FetchConfig, FetchReport, SpanFetch, connect_candidates, find_manifest
from node.weights.hub import HubModel, fill_from_folder
from shards.manifest import Manifest, load_manifest

__all__ = ["MODEL_ID", "WeightsKeeper", "WeightsPlan", "weights_key"]

log = logging.getLogger(__name__)
MODEL_ID = re.compile(r"[0-9a-f]{24}")
DISCOVERY_TIMEOUT_S = 8.0


def weights_key(model_id: str, group: str) -> str:
    """DHT provider key of one tensor group (a layer, "embed", "head") of one model's weights."""
    return f"moemesh:w:{model_id}:{group}"


@dataclass(frozen=True)
class WeightsPlan:
    model_id: str = ""  # fetch this model's spans from the swarm ("": see hub_id, else a local folder)
    hub_id: str = ""  # a Hugging Face Hub repository: the swarm's copy first, the Hub for what it lacks
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "moemesh")
    fetch: FetchConfig = field(default_factory=FetchConfig)


Members = Callable[[], Mapping[str, tuple[str, Sequence[str]]]]  # swarm state: peer -> (its model id, p2p addresses)


class WeightsKeeper:
    def __init__(self, plan: WeightsPlan, say: Callable[[str], None], event: Callable[..., None] | None = None) -> None:
        self.plan, self.say = plan, say
        self.event = event or (lambda kind, **fields: None)
        self._holding: Holding | None = None
        self.model_id = plan.model_id  # a Hub model's is known once resolved
        self.local: Path | None = None  # a Hub model nobody in the swarm had: downloaded whole, served as a folder
        self.hub: HubModel | None = None
        self.cache: ModelCache | None = None
        self.banned: set[str] = set()  # providers that sent bytes that did not verify
        self.last_report: FetchReport | None = None

    @property
    def remote(self) -> bool:
        """The weights are not in a local folder: resolved (and fetched) once the mesh is up."""
        return bool(self.plan.model_id or self.plan.hub_id)

    def peers_of(self, members: Members, model_id: str | None = None) -> dict[str, Sequence[str]]:
        wanted = model_id or self.model_id
        return {peer: addrs for peer, (mid, addrs) in members().items() if mid == wanted}

    def holding(self) -> Holding | None:
        return self._holding

    def provider_keys(self) -> list[str]:
        holding = self._holding
        return [weights_key(holding.model_id, g) for g in holding.groups] if holding is not None else []

    async def serve_folder(self, folder: Path) -> None:
        """Offer a local checkpoint's tensors to peers (its manifest is cached after the first hash)."""
        loop = asyncio.get_running_loop()
        self._holding = await loop.run_in_executor(None, lambda: folder_holding(folder, load_manifest(folder)))

    async def manifest(self, bridge: TrioThread, node: MeshNode, members: Members) -> Manifest:
        """The manifest of our model id, from whichever peer of the swarm has it."""
        if self.cache is not None:
            return self.cache.manifest
        if self.plan.hub_id and not self.model_id:
            return await self._hub_manifest(bridge, node, members)
        model_id = self.model_id
        for attempt in range(self.plan.fetch.rounds):
            peers = await bridge.call(_discover, node, [weights_key(model_id, "embed")], self.peers_of(members))
            found, _ = await bridge.call(
                find_manifest, node.host, model_id, peers, self.plan.fetch.weights, self.banned
            )
            if found is not None:
                loop = asyncio.get_running_loop()
                fetch = self.plan.fetch
                self.cache = await loop.run_in_executor(
                    None, ModelCache, self.plan.cache_dir, found, fetch.max_disk_bytes, fetch.chunk_bytes
                )
                self._holding = self.cache.holding()
                self.say(f"manifest of model {model_id}: {found.num_layers} layers, {found.total_bytes / 1e9:.3f} GB")
                return found
            log.info("no peer has the manifest of %s yet (attempt %d)", model_id, attempt + 1)
            await asyncio.sleep(2.0)
        raise NoProviders(f"no peer of the swarm has the manifest of model {model_id}")

    async def _hub_manifest(self, bridge: TrioThread, node: MeshNode, members: Members) -> Manifest:
        """A Hub repository's manifest: a peer's whose config and layout are the Hub's, else hashed here
        from every shard downloaded (this daemon then seeds the swarm with it)."""
        loop = asyncio.get_running_loop()
        hub_id = self.plan.hub_id
        self.hub = hub = await loop.run_in_executor(None, HubModel, hub_id, None)
        swarm = members()
        for model_id in sorted({mid for mid, _ in swarm.values() if mid}):
            peers = await bridge.call(_discover, node, [], self.peers_of(members, model_id))
            found, _ = await bridge.call(
                find_manifest, node.host, model_id, peers, self.plan.fetch.weights, self.banned
            )
            if found is not None and hub.matches(found):
                self.say(f"{hub_id} is model {model_id} of the swarm: its spans come from peers first")
                self.model_id = model_id
                return await self.manifest(bridge, node, members)
        self.say(f"no peer of the swarm serves {hub_id}: downloading every shard from the Hub to hash its manifest")
        folder = await loop.run_in_executor(None, hub.download, hub.shard_files())
        manifest = await loop.run_in_executor(None, load_manifest, folder)
        self.local, self.model_id = folder, manifest.model_id
        return manifest

    async def fetch(self, bridge: TrioThread, node: MeshNode, start: int, end: int, members: Members) -> Path:
        """Fetch (or find in the cache) every tensor layers [start, end) need; the folder to load."""
        if self.local is not None:
            await self.serve_folder(self.local)
            return self.local
        cache = self.cache
        assert cache is not None, "manifest() first"
        manifest = cache.manifest
        groups = manifest.groups_for_span(start, end)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, cache.check_quota, groups)
        bar = _Bar(cache.bytes_of(g for g in groups if not cache.has_group(g)), f"layers {start}:{end}")
        keys = [weights_key(manifest.model_id, g) for g in groups]
        try:
            for attempt in range(self.plan.fetch.rounds):
                peers = await bridge.call(_discover, node, keys, self.peers_of(members))
                _, holds = await bridge.call(
                    find_manifest, node.host, manifest.model_id, peers, self.plan.fetch.weights, self.banned
                )
                self.event("fetching", layers=[start, end], providers={p: list(g) for p, g in holds.items()})
                try:
                    report = await bridge.call(
                        _transfer, node, cache, groups, holds, self.plan.fetch, bar, self._group_done, self.banned
                    )
                except NoProviders as e:
                    if attempt + 1 == self.plan.fetch.rounds:
                        if self.hub is None:
                            raise
                        await self._from_hub(cache, groups)
                        return cache.root
                    log.warning("%s; looking for providers again", e)
                    await asyncio.sleep(2.0)
                    continue
                self.last_report = report
                self.event(
                    "fetched",
                    layers=[start, end],
                    bytes=report.bytes,
                    seconds=report.seconds,
                    by_provider=report.by_provider,
                    banned=sorted(report.banned),
                    dropped=sorted(report.dropped),
                    folder=str(cache.root),
                )
                rate = report.bytes / max(report.seconds, 1e-6) / 1e6
                self.say(
                    f"fetched layers {start}:{end}: {report.bytes / 1e6:.1f} MB in {report.seconds:.2f} s"
                    f" ({rate:.1f} MB/s) from {len(report.by_provider)} providers, every tensor verified"
                    + (f"; banned for bad bytes: {', '.join(sorted(report.banned))}" if report.banned else "")
                )
                return cache.root
        finally:
            bar.close()
        raise AssertionError("unreachable")

    async def _from_hub(self, cache: ModelCache, groups: list[str]) -> None:
        """Groups no peer holds: only the Hub shard files that hold them, every tensor verified."""
        assert self.hub is not None
        missing = [g for g in groups if not cache.has_group(g)]
        files = self.hub.shard_files(t.name for t in cache.manifest.tensors_of(missing))
        self.say(f"no peer holds groups {', '.join(missing)}: downloading {', '.join(files)} from the Hub")
        loop = asyncio.get_running_loop()
        folder = await loop.run_in_executor(None, self.hub.download, files)
        copied = await loop.run_in_executor(None, fill_from_folder, cache, missing, folder)
        self._holding = cache.holding()
        self.say(f"filled {copied / 1e6:.1f} MB from the Hub, every tensor verified")

    def _group_done(self, group: str) -> None:
        """On the trio thread: a group verified whole is served to others at once."""
        if self.cache is not None:
            self._holding = self.cache.holding()


async def _transfer(node: MeshNode, cache: ModelCache, groups: list[str], *args: Any) -> FetchReport:
    return await SpanFetch(node.host, cache, groups, *args).run()


async def _discover(node: MeshNode, keys: Sequence[str], members: Mapping[str, Sequence[str]]) -> list[str]:
    """Peers that may hold the weights: DHT providers of `keys`, peers of the model in the swarm
    state, peers we are connected to (the bootstrap ones); those we could reach."""
    found: dict[str, list[str]] = {p: list(a) for p, a in members.items()}

    async def one(key: str) -> None:
        with trio.move_on_after(DISCOVERY_TIMEOUT_S):
            for peer in await node.providers(key):
                found.setdefault(peer, [])

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(one, key)
    for peer in node.host.get_connected_peers():
        found.setdefault(peer.to_base58(), [])
    found.pop(node.peer_id, None)
    reached = await connect_candidates(node.host, found, DISCOVERY_TIMEOUT_S)
    behind_nat = await _circuits(node, [p for p in found if p not in reached])
    return sorted(set(reached) | set(await connect_candidates(node.host, behind_nat, DISCOVERY_TIMEOUT_S)))


async def _circuits(node: MeshNode, peers: Sequence[str]) -> dict[str, list[str]]:
    """Where to dial peers we could not reach directly, from their signed records: their relays'
    circuit addresses when they are behind NAT (the weights stream then runs relayed, or
    hole-punched, as the gRPC tunnel does)."""
    dial: dict[str, list[str]] = {}
    if not peers:
        return dial
    records: dict[str, bytes] = {}
    with trio.move_on_after(DISCOVERY_TIMEOUT_S):  # a dead peer's record lookup can take tens of seconds
        records = await node.records(peers)
    for peer, data in records.items():
        try:
            record = verify_record(data, peer_id=peer)
        except InvalidRecord as e:
            log.info("the record of weights candidate %s is not believed: %s", peer, e)
            continue
        if is_live(record) and (addresses := addresses_to_dial(record)):
            dial[peer] = addresses
    return dial


class _Bar:
    """A tqdm bar of bytes and rate on a terminal; nothing otherwise (events stay one per line)."""

    def __init__(self, total: int, what: str) -> None:
        self._tqdm: Any = None
        try:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=None)
        except ImportError:
            pass

    def __call__(self, n: int) -> None:
        if self._tqdm is not None:
            self._tqdm.update(n)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
