"""`moemesh daemon`: serve a span over gRPC, advertise it in the libp2p DHT, keep the swarm state.

One `Daemon` owns everything a volunteer's node runs. Its state is explicit: `Serving` is
what it serves now (engine, gRPC server, advertised shard), `Advert` what it last told the
DHT. All of its asyncio tasks live in one `asyncio.TaskGroup`, the root of the node:

    run()
    ├── the swarm agent's rounds (renew the lease, anti-entropy, reap, rebalance)
    │   └── pushes of local changes, a move (drain, load the new span, advertise it)
    ├── the republisher: a new record every ttl/3 counted from the last one's issue time
    │   └── the slow Kademlia put of that record, one at a time
    └── (main) wait for a stop signal, then drain, withdraw, leave

The libp2p host and DHT run on the trio thread behind `node.mesh.bridge`. Loading a span
runs on the engine's compute thread and never blocks this loop: lease renewals and sync
answers go on while a large model loads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from crdt import Load, Member
from node.errors import MoemeshError, Stopped
from node.mesh.addresses import WILDCARDS, advertised, local_ipv4_addresses
from node.mesh.bridge import TrioThread, unwrap
from node.mesh.host import Installer, MeshConfig, MeshNode
from node.mesh.identity import claim_identity
from node.mesh.nat import NatConfig
from node.mesh.outbound import PushTunnels
from node.mesh.tunnel import TunnelConfig, install_server
from node.mesh.weights import WeightsConfig
from node.mesh.weights import install as install_weights
from node.serve.lifecycle import Lifecycle
from node.swarm.advertiser import Advert, Advertiser, Offer
from node.swarm.agent import SwarmAgent, SwarmConfig
from node.tls import Certificate, make_certificate
from node.weights.keeper import WeightsKeeper, WeightsPlan
from protocol import software_version
from protocol.mesh_pb2 import ShardAd

if TYPE_CHECKING:
    import grpc

    from node.serve.config import ServerConfig
    from node.serve.engine import Engine
    from shards import Checkpoint
    from shards.manifest import Manifest

__all__ = ["Daemon", "DaemonConfig", "Serving"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaemonConfig:
    identity: Path | None  # None: the first default key file no other daemon holds
    mesh: MeshConfig
    server: ServerConfig | None  # None: a bootstrap-only node (DHT, no model)
    announce_host: str | None = None  # host others dial for gRPC (default: the listen host)
    ttl_s: float = 60.0
    nat: NatConfig = field(default_factory=NatConfig)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "moemesh")
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    auto_layers: bool = False  # choose the span from the swarm state (server.start/end are ignored)
    max_layers: int = 0  # with auto_layers: layers this daemon holds (0: the whole model)
    metrics_port: int | None = None  # serve Prometheus metrics on this port (0: any free one; None: off)
    weights: WeightsPlan = field(default_factory=WeightsPlan)  # a model id: fetch spans from peers (node.weights)
    layers: str = ""  # with weights.model_id and not auto_layers: the --layers text (the model is known later)
    serve_weights: WeightsConfig = field(default_factory=WeightsConfig)  # what we serve of our weights to peers


@dataclass(frozen=True)
class Serving:
    """What the daemon serves now: one engine behind one gRPC server, advertised as one shard."""

    engine: Engine
    server: grpc.aio.Server
    grpc_address: str  # what others dial (announce host : bound port)
    local_port: int  # where our own tunnel endpoint pipes to
    shard: ShardAd


class Daemon:
    """A volunteer's node. `run()` until `stop()` (or SIGINT/SIGTERM through the lifecycle)."""

    def __init__(self, config: DaemonConfig, say: Callable[[str], None], events: Callable[..., None] | None = None):
        self.config = config
        self.say = say
        self.event = events or (lambda kind, **fields: None)  # machine-readable events (launch helpers read them)
        self.serving: Serving | None = None
        self.addresses: list[str] = []
        self.metrics_address = ""
        self.lifecycle = Lifecycle()  # signals, drain and grace: the same as `moemesh serve`
        self._advertiser: Advertiser | None = None
        self._bridge = TrioThread()
        self._node: MeshNode | None = None
        self.push_tunnels: PushTunnels | None = None  # our host's tunnels to next hops behind NAT
        self._agent: SwarmAgent | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._key_pair: Any = None
        self.certificate: Certificate | None = None  # our gRPC TLS certificate (its fingerprint is in our record)
        self.weights = WeightsKeeper(config.weights, say, self.event)

    # -- control --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop gracefully; a second call cuts the grace period short (open sessions move now)."""
        self.lifecycle.on_signal()

    @property
    def agent(self) -> SwarmAgent | None:
        return self._agent

    @property
    def peer_id(self) -> str:
        return self._node.peer_id if self._node is not None else ""

    # -- the root -------------------------------------------------------------------------

    async def run(self, handle_signals: bool = True) -> None:
        """Serve until `stop()`; with `handle_signals`, SIGINT/SIGTERM call it (a second one hurries)."""
        config = self.config
        if handle_signals:
            self.lifecycle.install()
        identity = claim_identity(config.identity)  # held (locked) while we run
        key_pair = identity.key_pair
        if identity.created:
            self.say(f"created identity {identity.path}")
        elif config.identity is None:
            self.say(f"identity {identity.path}")
        metrics = self._start_metrics()
        if config.server is not None and not config.server.insecure_lan:
            self.certificate = make_certificate()  # one for the process: a move keeps the fingerprint
        try:
            if config.server is not None and not config.auto_layers and not self.weights.remote:
                await self.lifecycle.unless_stopped(self._start_serving(config.server))
            self._bridge.start()
            # A NAT'd peer is reached through the tunnel endpoint, whichever span (and port) it serves later.
            tunnel = partial(install_server, config=TunnelConfig(), target=self._tunnel_target)
            weights = partial(install_weights, config=config.serve_weights, holding=self.weights.holding)
            protocols: list[Installer] = [tunnel, weights] if config.server is not None else []
            self._node = node = MeshNode(key_pair, config.mesh, config.nat, protocols=protocols)
            self.push_tunnels = PushTunnels(self._bridge, node)
            self._key_pair = key_pair
            listening = await self._bridge.call(self._bridge.start_service, node.serve)
            self.addresses = advertised(listening, config.announce_host)  # never /ip4/0.0.0.0
            self.say(f"peer {node.peer_id} listening on {', '.join(self.addresses)}")
            if not config.mesh.bootstrap:
                self.say(f"new swarm: others join with --bootstrap {self.addresses[0]}")
            try:
                async with asyncio.TaskGroup() as tasks:
                    self._tasks = tasks
                    await self._serve_in(tasks)
            except BaseExceptionGroup as group:  # one failure is the daemon's error, not a group of one
                raise unwrap(group) from None
        except Stopped:  # a signal before we were serving: nothing of ours was announced yet
            self.say("stopped before serving")
        finally:
            self._tasks = None
            serving, self.serving = self.serving, None
            if serving is not None:
                await serving.server.stop(grace=1.0)
                await serving.engine.aclose()
            self._bridge.stop()
            identity.release()
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()
            if handle_signals:
                self.lifecycle.uninstall()

    async def _serve_in(self, tasks: asyncio.TaskGroup) -> None:
        config, node = self.config, self._node
        assert node is not None
        self._agent = agent = SwarmAgent(
            self._bridge,
            node.host,
            Member(node.peer_id, p2p_addresses=tuple(self.addresses), version=software_version()),
            config.swarm,
            bootstrap=[(info_from_p2p_addr(Multiaddr(b)).peer_id.to_base58(), b) for b in config.mesh.bootstrap],
            load=self._load,
            on_move=self.move,
        )
        await agent.start(tasks)
        rounds = tasks.create_task(agent.run(), name="moemesh-swarm-rounds")
        if config.server is not None and (config.auto_layers or self.weights.remote):
            try:
                await self.lifecycle.unless_stopped(self._first_span(agent, config.server))  # a fetch: hours
            except Stopped:  # our claim of the span leaves with our member record
                if self.weights.remote:
                    self.say("fetched weights are kept, and the fetch resumes at the next start")
                rounds.cancel()
                await self._shutdown(agent)
                raise
        agent.update_member(**self._serving_fields())
        self._advertiser = advertiser = Advertiser(
            self._bridge, node, self._key_pair, config.ttl_s, self.addresses, self._offer, self.say
        )
        await advertiser.publish(tasks)
        blocks = sum(ad.end - ad.start for ad in self._offer().shards)
        self.say(f"advertised {blocks} blocks, record ttl {config.ttl_s:g} s")
        self.event("ready", **self._ready_fields())
        republisher = tasks.create_task(advertiser.run(tasks), name="moemesh-republish")
        await self.lifecycle.stop_requested()
        republisher.cancel()  # a DHT put can hang for tens of seconds on peers that died: never wait for it
        advertiser.stop()
        rounds.cancel()
        await self._shutdown(agent)

    async def _first_span(self, agent: SwarmAgent, server: ServerConfig) -> None:
        start, end = await self._auto_span(agent)
        await self._start_serving(replace(server, start=start, end=end))

    async def _shutdown(self, agent: SwarmAgent) -> None:
        """Refuse new sessions at once and withdraw; open sessions finish, or move after the grace."""
        drained = None
        serving = self.serving
        if serving is not None and self._tasks is not None:
            engine = serving.engine
            if engine.sessions:
                self.say(f"draining {len(engine.sessions)} open sessions (grace {engine.config.grace_s:g} s)")
            drained = self._tasks.create_task(self.lifecycle.drain(engine), name="moemesh-drain")
        self.say("stopping: withdrawing the record")
        self.event("stopping")
        try:
            await asyncio.wait_for(agent.stop(leave=True), timeout=10)
        except (TimeoutError, OSError, RuntimeError) as e:  # our member record then expires by its lease
            log.warning("leaving the swarm state failed: %r", e)
        try:
            await asyncio.wait_for(self._publish(withdrawn=True), timeout=30)
        except (TimeoutError, OSError, RuntimeError) as e:  # the record then expires by its ttl
            log.warning("withdrawing the record failed (it expires in %g s): %r", self.config.ttl_s, e)
        if drained is not None:
            await drained

    def _start_metrics(self) -> Any:
        if self.config.metrics_port is None:
            return None
        from node.swarm.metrics import serve_metrics

        server, self.metrics_address = serve_metrics(self, self.config.mesh.listen_host, self.config.metrics_port)
        self.say(f"metrics on http://{self.metrics_address}/metrics")
        return server

    # -- serving --------------------------------------------------------------------------

    async def _start_serving(self, server_config: ServerConfig) -> None:
        from node.serve.device import block_bytes, device_name
        from node.serve.engine import Engine
        from node.serve.service import start_server
        from node.serve.throughput import measure_throughput

        if self.weights.remote:  # fetch the span's tensors first (those we lack), verified
            assert self._node is not None and self._agent is not None
            folder = await self.weights.fetch(
                self._bridge, self._node, server_config.start, server_config.end, self._model_peers
            )
            server_config = replace(server_config, model=folder)
        engine = await Engine.load(server_config, progress=self.say)  # on its compute thread: the loop goes on
        if not self.weights.remote and self.weights.holding() is None:
            await self.weights.serve_folder(server_config.model)  # peers may fetch our tensors
        try:
            server, port = await start_server(engine, self.certificate, dial=self._push_tunnel)
        except BaseException:
            await engine.aclose()
            raise
        host = self.config.announce_host or server_config.host
        address = f"{local_ipv4_addresses()[0] if host in WILDCARDS else host}:{port}"
        try:
            throughput = await measure_throughput(engine, self.config.cache_dir)
        except BaseException:  # cancelled by a stop: not serving yet, so nothing else closes them
            await server.stop(grace=None)
            await engine.aclose()
            raise
        span = engine.span
        shard = ShardAd(
            model_id=engine.model_id,
            model_name=engine.model_name,
            start=span.start,
            end=span.end,
            num_layers=span.cfg.num_layers,
            throughput=throughput,
            quantization=span.quantization,
            device=device_name(span),
            block_bytes=block_bytes(span),
        )
        self.serving = Serving(engine, server, address, port, shard)
        tls = f"TLS fingerprint {self.certificate.fingerprint}" if self.certificate else "PLAINTEXT (--insecure-lan)"
        self.say(
            f"serving {engine.model_name} ({engine.model_id}) layers {span.start}:{span.end}"
            f" on {address}, {throughput:.1f} tokens/s per block, {tls}"
        )

    def _push_tunnel(self, peer_id: str) -> AbstractAsyncContextManager[str]:
        """How our pushes reach a next hop behind NAT: a tunnel of our own host (node.mesh.outbound)."""
        if self.push_tunnels is None:
            raise MoemeshError("our libp2p host is not up yet: no tunnel to a peer behind NAT")
        return self.push_tunnels.open(peer_id)

    def _tunnel_target(self) -> tuple[str, int] | None:
        """Where tunnelled gRPC connections go now (the port changes when a move starts a new server)."""
        serving, server = self.serving, self.config.server
        if serving is None or server is None:
            return None
        host = server.host
        return ("127.0.0.1" if host in WILDCARDS else host, serving.local_port)

    async def move(self, start: int, end: int) -> None:
        """Drain the open sessions (bounded), load layers [start, end), advertise them."""
        old, agent, server = self.serving, self._agent, self.config.server
        assert old is not None and agent is not None and server is not None
        self.say(f"moving to layers {start}:{end}: draining {len(old.engine.sessions)} open sessions")
        agent.update_member(start=start, end=end, state="loading")  # others see the new span at once
        self.serving = replace(old, shard=ShardAd())  # no shard advertised while we move
        await self._publish()  # clients stop routing new sessions to the old span
        await self.lifecycle.drain(old.engine)  # refuses new sessions; open ones finish within the grace, or move
        self.serving = None
        await old.server.stop(grace=1.0)
        await old.engine.aclose()
        await self._start_serving(replace(server, start=start, end=end))
        agent.update_member(**self._serving_fields())
        await self._publish()
        self.say(f"moved to layers {start}:{end}")
        self.event("moved", **self._ready_fields())

    def _load(self) -> Load:
        serving = self.serving
        if serving is None:
            return Load()
        engine = serving.engine
        typical = engine.config.default_length  # not linear in length once sliding windows cap a cache
        per_token = engine.span.cache_bytes(typical) / typical
        free = max(0, engine.kv_free_bytes) // max(1.0, per_token)
        return Load(
            active_sessions=len(engine.sessions),
            free_kv_tokens=int(free),
            queue_length=engine.queued,
            decode_ms=1000 * engine.scheduler.decode_ewma_s,  # measured from real steps: a slow peer shows
        )

    def _serving_fields(self) -> dict[str, Any]:
        """Our member record's fields about what we serve."""
        serving = self.serving
        if serving is None or not serving.shard.model_id:
            return {"state": ""}
        ad = serving.shard
        return {
            "addresses": (serving.grpc_address,),
            "model_id": ad.model_id,
            "start": ad.start,
            "end": ad.end,
            "num_layers": ad.num_layers,
            "max_layers": (self.config.max_layers or ad.num_layers) if self.config.auto_layers else ad.end - ad.start,
            "throughput": ad.throughput,
            "capacity_bytes": serving.engine.config.kv_budget_bytes,
            "state": "serving",
        }

    def _ready_fields(self) -> dict[str, Any]:
        serving = self.serving
        shard = serving.shard if serving is not None else None
        return {
            "peer_id": self.peer_id,
            "multiaddrs": list(self.addresses),
            "grpc_address": serving.grpc_address if serving is not None else None,
            "model_id": shard.model_id if shard is not None else None,
            "layers": [shard.start, shard.end] if shard is not None else None,
            "metrics_address": self.metrics_address or None,
            "tls_fingerprint": self.certificate.fingerprint if self.certificate is not None else None,
        }

    def _model_peers(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """The swarm state's peers (but us): the model each serves or loads, and its libp2p addresses."""
        agent = self._agent
        members = agent.members().items() if agent is not None else ()
        return {pid: (m.model_id, m.p2p_addresses) for pid, m in members if pid != self.peer_id}

    async def _auto_span(self, agent: SwarmAgent) -> tuple[int, int]:
        """Pick the span (the weakest window of the swarm's view that fits in memory, or --layers
        of a fetched model) and claim it (state "loading") before loading it."""
        from node.serve.device import blocks_that_fit
        from shards import Checkpoint, parse_layers

        server = self.config.server
        assert server is not None and self._node is not None
        source: Checkpoint | Manifest
        if self.weights.remote:
            source = manifest = await self.weights.manifest(self._bridge, self._node, self._model_peers)
            num_layers, model_id = manifest.num_layers, manifest.model_id
        else:
            source = checkpoint = await asyncio.get_running_loop().run_in_executor(None, Checkpoint, server.model)
            num_layers = checkpoint.config.num_layers
            model_id = await asyncio.get_running_loop().run_in_executor(None, checkpoint.model_id)
        if self.config.auto_layers:
            fit = blocks_that_fit(server, source, server.device)  # what --max-memory (or free memory) holds
            length = min(self.config.max_layers or num_layers, num_layers, fit)
            start, end = agent.choose_span(model_id, num_layers, length)
        else:
            start, end = parse_layers(self.config.layers, num_layers)
            length = end - start
        served = len(agent.servers(model_id))
        why = "the weakest window" if self.config.auto_layers else "as asked"
        self.say(f"placement: layers {start}:{end} of {num_layers} ({why}; {served} peers serve this model)")
        agent.update_member(
            model_id=model_id, start=start, end=end, num_layers=num_layers, max_layers=length, state="loading"
        )
        return start, end

    # -- the DHT record -------------------------------------------------------------------

    async def _publish(self, withdrawn: bool = False) -> None:
        if self._advertiser is not None:
            await self._advertiser.publish(self._tasks, withdrawn)

    @property
    def advert(self) -> Advert:
        return self._advertiser.advert if self._advertiser is not None else Advert()

    def _offer(self) -> Offer:
        serving, cert = self.serving, self.certificate
        if serving is None:
            return Offer((), (), "")
        shards = (serving.shard,) if serving.shard.model_id else ()
        fingerprint = cert.fingerprint if cert is not None else ""
        return Offer((serving.grpc_address,), shards, fingerprint, tuple(self.weights.provider_keys()))
