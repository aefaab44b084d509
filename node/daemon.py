"""`moemesh daemon`: serve a span over gRPC and advertise it in the libp2p DHT.

The asyncio loop owns the gRPC server and the announcer; the libp2p host and DHT run on
the trio thread behind `node.bridge`. The record is republished every ttl/3, withdrawn
(a signed tombstone with a higher seq) on SIGTERM/SIGINT before the server stops.

Beside the DHT, the daemon keeps a replica of the swarm state (`node.swarm`): its member
record, load and RTTs, synced with every other daemon. With `auto_layers` it picks its span
from that view (`node.placement`) and later moves it when the swarm is badly unbalanced:
it drains its open sessions first (they finish within the grace period, or move to other
peers, whose clients replay them) before it loads the new span.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from crdt import Load, Member
from node.mesh.bridge import TrioThread
from node.mesh.host import MeshConfig, MeshNode
from node.mesh.identity import load_or_create_identity
from node.mesh.nat import NatConfig, NatState, reachability_name
from node.mesh.records import ALL_PEERS_KEY, block_key, make_record, sign_record
from node.mesh.tunnel import TunnelConfig, install_server
from node.serve.engine import ServerConfig, SpanRunner
from node.swarm.agent import SwarmAgent, SwarmConfig
from protocol import software_version
from protocol.mesh_pb2 import Reachability, ShardAd

__all__ = ["DaemonConfig", "measure_throughput", "run_daemon"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaemonConfig:
    identity: Path
    mesh: MeshConfig
    server: ServerConfig | None  # None: a bootstrap-only node (DHT, no model)
    announce_host: str | None = None  # host others dial for gRPC (default: the listen host)
    ttl_s: float = 60.0
    nat: NatConfig = field(default_factory=NatConfig)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "moemesh")
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    auto_layers: bool = False  # choose the span from the swarm state (server.start/end are ignored)
    max_layers: int = 0  # with auto_layers: layers this daemon holds (0: the whole model)


def measure_throughput(runner: SpanRunner, cache_dir: Path, steps: int = 8) -> float:
    """Decode tokens/s through one block, measured once per (model, device, dtype) and cached."""
    span = runner.span
    key = f"{runner.model_id}|{span.device}|{span.dtype}"
    cache_file = cache_dir / "throughput.json"
    try:
        cached: dict[str, float] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]

    def measure() -> float:
        import torch

        cache = span.new_cache(steps + 2)
        x = (
            torch.zeros(1, 1, dtype=torch.int64)
            if span.is_first
            else torch.zeros(1, 1, span.cfg.hidden_size, dtype=span.dtype)
        )
        span(x, cache, 0)  # warm-up
        started = time.perf_counter()
        for i in range(steps):
            span(x, cache, 1 + i, last_only=True)
        per_token = (time.perf_counter() - started) / steps
        return len(span.layers) / per_token

    value = runner.call(measure)
    cached[key] = value
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")  # several daemons may start at once
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(cache_file)
    return value


async def run_daemon(config: DaemonConfig, say: Callable[[str], None]) -> None:
    key_pair, created = load_or_create_identity(config.identity)
    if created:
        say(f"created identity {config.identity}")
    runner: SpanRunner | None = None
    grpc_server = None
    shards: list[ShardAd] = []
    grpc_addresses: list[str] = []

    async def start_serving(server_config: ServerConfig) -> None:
        nonlocal runner, grpc_server, shards, grpc_addresses
        from node.serve.service import start_server

        runner = SpanRunner(server_config, progress=say)
        grpc_server, port = await start_server(runner)
        grpc_addresses = [f"{config.announce_host or server_config.host}:{port}"]
        throughput = measure_throughput(runner, config.cache_dir)
        shards = [
            ShardAd(
                model_id=runner.model_id,
                model_name=runner.model_name,
                start=runner.span.start,
                end=runner.span.end,
                num_layers=runner.span.cfg.num_layers,
                throughput=throughput,
            )
        ]
        say(
            f"serving {runner.model_name} ({runner.model_id}) layers {runner.span.start}:{runner.span.end}"
            f" on {grpc_addresses[0]}, {throughput:.1f} tokens/s per block"
        )

    if config.server is not None and not config.auto_layers:
        await start_serving(config.server)

    def grpc_target() -> tuple[str, int] | None:
        """Where tunnelled gRPC goes: our server as it listens now (None while we serve none)."""
        if config.server is None or not grpc_addresses:
            return None
        listen = config.server.host
        return ("127.0.0.1" if listen in ("0.0.0.0", "") else listen, int(grpc_addresses[0].rsplit(":", 1)[1]))

    bridge = TrioThread()
    bridge.start()
    tunnel = partial(install_server, config=TunnelConfig(), target=grpc_target)
    node = MeshNode(key_pair, config.mesh, config.nat, protocols=[tunnel])
    nat = NatState(0, Reachability.REACHABILITY_UNKNOWN, (), False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # the first stops gracefully; a second one cuts the grace period short
        if stop.is_set() and runner is not None:
            runner.moving.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        addresses = await bridge.call(bridge.start_service, node.serve)
        say(f"peer {node.peer_id} listening on {', '.join(addresses)}")
        if not config.mesh.bootstrap:
            say(f"new swarm: others join with --bootstrap {addresses[0]}")
        agent = SwarmAgent(
            bridge,
            node.host,
            Member(node.peer_id, p2p_addresses=tuple(addresses), version=software_version()),
            config.swarm,
            bootstrap=[(info_from_p2p_addr(Multiaddr(b)).peer_id.to_base58(), b) for b in config.mesh.bootstrap],
            load=lambda: _load_of(runner),
            on_move=lambda start, end: move(start, end),
        )
        await agent.start()
        if config.server is not None and config.auto_layers:
            span = await _auto_span(config, agent, say)
            await start_serving(replace(config.server, start=span[0], end=span[1]))
        agent.update_member(**_serving_fields(runner, grpc_addresses, shards, config))
        seq = time.time_ns()

        def provider_keys() -> list[str]:
            return [ALL_PEERS_KEY] + [block_key(ad.model_id, b) for ad in shards for b in range(ad.start, ad.end)]

        async def publish(withdrawn: bool = False) -> None:
            nonlocal seq, nat
            seq = max(seq + 1, time.time_ns())
            fresh = await bridge.call(node.nat_state)
            if (fresh.reachability, fresh.relay) != (nat.reachability, nat.relay):
                relaying = ", relaying" if fresh.relay else ""
                say(f"reachability: {reachability_name(fresh.reachability)}{relaying}")
            if fresh.circuit_addresses != nat.circuit_addresses:
                say(f"reachable through relays at: {', '.join(fresh.circuit_addresses) or 'none'}")
            nat = fresh
            record = make_record(
                key_pair,
                grpc_addresses=grpc_addresses,
                p2p_addresses=addresses,
                shards=shards,
                ttl_s=config.ttl_s,
                seq=seq,
                withdrawn=withdrawn,
                reachability=nat.reachability,
                circuit_addresses=nat.circuit_addresses,
                relay=nat.relay,
            )
            started = time.monotonic()
            await bridge.call(node.publish, sign_record(record, key_pair), provider_keys(), not withdrawn)
            log.info("published %s record in %.2f s", "a withdrawn" if withdrawn else "our", time.monotonic() - started)

        async def move(start: int, end: int) -> None:
            """Drain the open sessions (bounded), load layers [start, end), advertise them."""
            nonlocal shards
            assert config.server is not None and runner is not None and grpc_server is not None
            say(f"moving to layers {start}:{end}: draining {len(runner.sessions)} open sessions")
            agent.update_member(start=start, end=end, state="loading")  # others see the new span at once
            shards = []
            await publish()  # clients stop routing new sessions to the old span
            old_server, old_runner = grpc_server, runner
            await old_runner.drain()  # refuses new sessions; open ones finish within the grace, or move
            await old_server.stop(grace=1.0)
            old_runner.shutdown()
            await start_serving(replace(config.server, start=start, end=end))
            agent.update_member(**_serving_fields(runner, grpc_addresses, shards, config))
            await publish()
            say(f"moved to layers {start}:{end}")

        await publish()
        say(f"advertised {len(provider_keys()) - 1} blocks, record ttl {config.ttl_s:g} s")

        async def keep_published() -> None:
            """Republish every ttl/3, and at once when our reachability or relays change."""
            published_at = time.monotonic()
            while True:
                await asyncio.sleep(1.0)
                fresh = await bridge.call(node.nat_state)
                if fresh.version == nat.version and time.monotonic() - published_at < config.ttl_s / 3:
                    continue
                try:
                    await publish()
                except Exception as e:  # keep serving; the next round retries
                    log.warning("republishing the record failed: %s", e)
                published_at = time.monotonic()

        # A DHT put can hang for tens of seconds on peers that died; a signal must not wait for it.
        republisher = asyncio.create_task(keep_published())
        await stop.wait()
        republisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await republisher
        drained = None
        if runner is not None:  # refuse new sessions at once; open ones finish, or move after the grace
            if runner.sessions:
                say(f"draining {len(runner.sessions)} open sessions (grace {runner.config.grace_s:g} s)")
            drained = asyncio.create_task(runner.drain())
        say("stopping: withdrawing the record")
        try:
            await asyncio.wait_for(agent.stop(leave=True), timeout=10)
        except Exception as e:  # our member record then expires by its lease
            log.warning("leaving the swarm state failed: %r", e)
        try:
            await asyncio.wait_for(publish(withdrawn=True), timeout=30)
        except Exception as e:  # the record then expires by its ttl
            log.warning("withdrawing the record failed (it expires in %g s): %r", config.ttl_s, e)
        if drained is not None:
            await drained
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        if runner is not None:
            runner.shutdown()
        bridge.stop()


def _serving_fields(
    runner: SpanRunner | None, grpc_addresses: list[str], shards: list[ShardAd], config: DaemonConfig
) -> dict[str, object]:
    """Our member record's fields about what we serve."""
    if runner is None or not shards:
        return {"state": ""}
    ad = shards[0]
    return {
        "addresses": tuple(grpc_addresses),
        "model_id": ad.model_id,
        "start": ad.start,
        "end": ad.end,
        "num_layers": ad.num_layers,
        "max_layers": (config.max_layers or ad.num_layers) if config.auto_layers else ad.end - ad.start,
        "throughput": ad.throughput,
        "capacity_bytes": runner.config.kv_budget_bytes,
        "state": "serving",
    }


def _load_of(runner: SpanRunner | None) -> Load:
    if runner is None:
        return Load()
    from kernels import KVCache

    span = runner.span
    cfg = span.cfg
    per_token = KVCache.bytes_for(len(span.layers), cfg.num_kv_heads, cfg.head_dim, 1, span.dtype)
    free = max(0, runner.kv_free_bytes) // max(1, per_token)
    return Load(active_sessions=len(runner.sessions), free_kv_tokens=int(free), queue_length=runner.queued)


async def _auto_span(config: DaemonConfig, agent: SwarmAgent, say: Callable[[str], None]) -> tuple[int, int]:
    """Pick the weakest window of the swarm's view and claim it (state "loading") before loading it."""
    from shards import Checkpoint

    assert config.server is not None
    checkpoint = Checkpoint(config.server.model)
    num_layers = checkpoint.config.num_layers
    model_id = checkpoint.model_id()
    length = min(config.max_layers or num_layers, num_layers)
    start, end = agent.choose_span(model_id, num_layers, length)
    served = len(agent.servers(model_id))
    say(f"placement: layers {start}:{end} of {num_layers} (the weakest window; {served} peers serve this model)")
    agent.update_member(
        model_id=model_id, start=start, end=end, num_layers=num_layers, max_layers=length, state="loading"
    )
    return start, end
