"""Fetch a span's tensors from several providers at once, verified, resumable (trio side).

    SpanFetch.run()
    ├── tokenizer and generation files (whole, sha256-checked) from the first provider that has them
    └── per provider, `streams_per_provider` workers, each on its own weights stream:
        take the next tensor of a group that provider holds, ask its missing chunks one by one,
        write each where it belongs (`GroupFile`), verify the tensor's sha256

A worker whose provider breaks the stream, times out or refuses gives its tensor back (the
chunks written stay: another provider continues from there) and that provider is dropped for
this transfer; one whose provider sent bytes that do not verify forgets them and bans the
provider for good. The fetch ends when every tensor verified, or fails with `NoProviders`
naming the groups no live provider holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from node.errors import BadWeights, FrameError, NoProviders, PeerError
from node.mesh.weights import WeightsConfig, WeightsSession, open_session
from node.weights.cache import GroupFile, ModelCache
from shards.manifest import Manifest, ManifestError, TensorEntry, group_of

__all__ = ["FetchConfig", "FetchReport", "SpanFetch", "connect_candidates", "find_manifest"]

log = logging.getLogger(__name__)
Progress = Callable[[int], None]  # bytes received since the last call


@dataclass(frozen=True)
class FetchConfig:
    chunk_bytes: int = 1 << 20
    streams_per_provider: int = 2
    max_disk_bytes: int = 0  # 0: no quota
    rounds: int = 3  # discovery + fetch attempts before giving up
    weights: WeightsConfig = field(default_factory=WeightsConfig)


@dataclass
class FetchReport:
    bytes: int = 0
    seconds: float = 0.0
    by_provider: dict[str, int] = field(default_factory=dict)
    banned: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)


async def connect_candidates(host: IHost, candidates: Mapping[str, Iterable[str]], timeout_s: float) -> list[str]:
    """Connect to each candidate (peer id -> multiaddrs, maybe none: known to the peerstore) at once."""
    me = host.get_id().to_base58()
    reached: list[str] = []

    async def one(peer_id: str, addrs: list[str]) -> None:
        try:
            info = PeerInfo(ID.from_base58(peer_id), [Multiaddr(a) for a in addrs])
            with trio.fail_after(timeout_s):
                await host.connect(info)
            reached.append(peer_id)
        except Exception as e:  # an unreachable candidate: the others may have the weights
            log.info("weights candidate %s unreachable: %r", peer_id, e)

    async with trio.open_nursery() as nursery:
        for peer_id, addrs in candidates.items():
            if peer_id != me:
                nursery.start_soon(one, peer_id, [a.removesuffix(f"/p2p/{peer_id}") for a in addrs])
    return sorted(reached)


async def find_manifest(
    host: IHost, model_id: str, peers: Iterable[str], config: WeightsConfig, banned: set[str] | None = None
) -> tuple[Manifest | None, dict[str, tuple[str, ...]]]:
    """Ask every peer for the manifest of `model_id`: the one whose hash is the id, and who holds which groups."""
    holds: dict[str, tuple[str, ...]] = {}
    found: list[Manifest] = []

    async def one(peer: str) -> None:
        session: WeightsSession | None = None
        try:
            session = await open_session(host, peer, config)
            manifest, groups = await session.manifest(model_id)
        except (PeerError, FrameError, ManifestError, BadWeights) as e:
            log.info("no manifest of %s from %s: %s", model_id, peer, e)
            return
        finally:
            if session is not None:
                await session.aclose()
        found.append(manifest)
        holds[peer] = groups

    async with trio.open_nursery() as nursery:
        for peer in peers:
            if banned is None or peer not in banned:
                nursery.start_soon(one, peer)
    return (found[0] if found else None), holds


class SpanFetch:
    """One transfer: the tensors of `groups` into `cache`, from `providers` (peer -> groups held)."""

    def __init__(
        self,
        host: IHost,
        cache: ModelCache,
        groups: list[str],
        providers: Mapping[str, Iterable[str]],
        config: FetchConfig,
        progress: Progress | None = None,
        on_group: Callable[[str], None] | None = None,
        banned: set[str] | None = None,
    ) -> None:
        self.host, self.cache, self.config = host, cache, config
        self.model_id = cache.manifest.model_id
        self.providers = {p: set(g) for p, g in providers.items()}
        self.progress = progress or (lambda n: None)
        self.on_group = on_group or (lambda g: None)
        self.report = FetchReport(banned=banned if banned is not None else set())
        self.files: dict[str, GroupFile] = {}
        self.remaining: dict[str, tuple[GroupFile, TensorEntry]] = {}
        self.taken: set[str] = set()
        self._changed = trio.Event()
        for group in groups:
            if cache.has_group(group):
                continue
            gf = cache.open_group(group)
            self.files[group] = gf
            for t in gf.tensors:
                if t.name not in gf.verified:
                    self.remaining[t.name] = (gf, t)

    def _alive(self, peer: str) -> bool:
        return peer not in self.report.banned and peer not in self.report.dropped

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _pick(self, peer: str) -> tuple[GroupFile, TensorEntry] | None:
        held = self.providers.get(peer, set())
        # resumed tensors first (their chunks are half there), then in order
        choices = [u for name, u in self.remaining.items() if name not in self.taken and group_of(name) in held]
        if not choices:
            return None
        holders: dict[str, int] = {}
        for p, g in self.providers.items():
            if self._alive(p):
                for group in g:
                    holders[group] = holders.get(group, 0) + 1
        # resumed tensors first (half there already), then the rarest: what only this provider holds
        gf, t = min(choices, key=lambda u: (not u[0].done.get(u[1].name), holders.get(u[0].group, 0)))
        self.taken.add(t.name)
        return gf, t

    def _anyone_can_help(self) -> bool:
        if self.taken:
            return True
        live = [g for p, g in self.providers.items() if self._alive(p)]
        return any(any(group_of(name) in g for g in live) for name in self.remaining)

    async def run(self) -> FetchReport:
        started = time.monotonic()
        await self._finish_ready_groups()
        await self._fetch_files()
        async with trio.open_nursery() as nursery:
            for peer, held in self.providers.items():
                if held and self._alive(peer):
                    for _ in range(self.config.streams_per_provider):
                        nursery.start_soon(self._worker, peer)
        self.report.seconds = time.monotonic() - started
        if self.remaining or self.cache.missing_files():
            groups = sorted({group_of(n) for n in self.remaining}, key=lambda g: (not g.isdigit(), g.zfill(9)))
            files = [f.name for f in self.cache.missing_files()]
            raise NoProviders(
                f"no live provider holds {'groups ' + ', '.join(groups) if groups else ''}"
                f"{' files ' + ', '.join(files) if files else ''} of model {self.model_id}"
                f" (banned for bad bytes: {', '.join(sorted(self.report.banned)) or 'none'})"
            )
        return self.report

    async def _finish_ready_groups(self) -> None:
        for gf in list(self.files.values()):
            if gf.complete():
                await self._finish(gf)

    async def _finish(self, gf: GroupFile) -> None:
        if self.files.pop(gf.group, None) is None:
            return  # another worker's last tensor finished it meanwhile
        await trio.to_thread.run_sync(gf.finish)
        await trio.to_thread.run_sync(self.cache.write_index)
        self.on_group(gf.group)

    async def _fetch_files(self) -> None:
        for entry in self.cache.missing_files():
            for peer in [p for p in self.providers if self._alive(p)]:
                try:
                    session = await open_session(self.host, peer, self.config.weights)
                    try:
                        parts, at = [], 0
                        while at < entry.size:
                            length = min(self.config.weights.max_chunk_bytes, entry.size - at)
                            parts.append(await session.chunk(self.model_id, entry.name, at, length, file=True))
                            at += length
                    finally:
                        await session.aclose()
                except (PeerError, FrameError, BadWeights) as e:
                    log.info("file %s from %s: %s", entry.name, peer, e)
                    continue
                if self.cache.store_file(entry, b"".join(parts)):
                    break
                log.warning("%s sent %s with the wrong sha256: banned", peer, entry.name)
                self.report.banned.add(peer)

    async def _worker(self, peer: str) -> None:
        try:
            session = await open_session(self.host, peer, self.config.weights)
        except PeerError as e:
            log.warning("weights provider %s unreachable: %s", peer, e)
            self._drop(peer)
            return
        try:
            while self._alive(peer):
                unit = self._pick(peer)
                if unit is None:
                    if not self.remaining or not self._anyone_can_help():
                        return
                    await self._changed.wait()
                    continue
                if not await self._tensor(session, peer, *unit):
                    return
        finally:
            await session.aclose()

    def _drop(self, peer: str) -> None:
        self.report.dropped.add(peer)
        self._notify()

    async def _tensor(self, session: WeightsSession, peer: str, gf: GroupFile, t: TensorEntry) -> bool:
        """Fetch and verify one tensor; False when this provider is out (dropped or banned)."""
        step = self.config.chunk_bytes
        try:
            for index, length in gf.chunks(t):
                data = await session.chunk(self.model_id, t.name, index * step, length)
                await trio.to_thread.run_sync(gf.write, t, index, data)
                self.report.bytes += len(data)
                self.report.by_provider[peer] = self.report.by_provider.get(peer, 0) + len(data)
                self.progress(len(data))
            if not await trio.to_thread.run_sync(gf.verify, t):
                raise BadWeights(f"{peer} sent bytes of {t.name} that do not match its sha256")
        except BadWeights as e:
            log.warning("%s: banning this provider", e)
            self.report.banned.add(peer)
            self.taken.discard(t.name)
            self._notify()
            return False
        except (PeerError, FrameError) as e:
            log.warning("weights provider %s dropped for this transfer: %s", peer, e)
            self.taken.discard(t.name)
            self._drop(peer)
            return False
        self.taken.discard(t.name)
        self.remaining.pop(t.name, None)
        if gf.complete():
            await self._finish(gf)
        self._notify()
        return True
