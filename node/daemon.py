"""`moemesh daemon`: serve a span over gRPC and advertise it in the libp2p DHT.

The asyncio loop owns the gRPC server and the announcer; the libp2p host and DHT run on
the trio thread behind `node.bridge`. The record is republished every ttl/3, withdrawn
(a signed tombstone with a higher seq) on SIGTERM/SIGINT before the server stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from node.bridge import TrioThread
from node.identity import load_or_create_identity
from node.nat import NatConfig, NatState, reachability_name
from node.p2p import MeshConfig, MeshNode
from node.records import ALL_PEERS_KEY, block_key, make_record, sign_record
from node.runtime import ServerConfig, SpanRunner
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
    runner = SpanRunner(config.server, progress=say) if config.server else None
    grpc_server = None
    shards: list[ShardAd] = []
    grpc_addresses: list[str] = []
    if runner is not None:
        from node.server import start_server

        assert config.server is not None
        grpc_server, port = await start_server(runner)
        grpc_addresses = [f"{config.announce_host or config.server.host}:{port}"]
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

    bridge = TrioThread()
    bridge.start()
    node = MeshNode(key_pair, config.mesh, config.nat)
    assert node.nat is not None
    if grpc_server is not None:
        from node.tunnel import TunnelServer

        host, port_text = grpc_addresses[0].rsplit(":", 1)
        listen = config.server.host if config.server is not None else host
        TunnelServer(node.host, ("127.0.0.1" if listen in ("0.0.0.0", "") else listen, int(port_text)))
    nat = NatState(0, Reachability.REACHABILITY_UNKNOWN, (), False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        addresses = await bridge.call(bridge.start_service, node.serve)
        say(f"peer {node.peer_id} listening on {', '.join(addresses)}")
        if not config.mesh.bootstrap:
            say(f"new swarm: others join with --bootstrap {addresses[0]}")
        provider_keys = [ALL_PEERS_KEY] + [block_key(ad.model_id, b) for ad in shards for b in range(ad.start, ad.end)]
        seq = time.time_ns()

        async def publish(withdrawn: bool = False) -> None:
            nonlocal seq, nat
            seq = max(seq + 1, time.time_ns())
            assert node.nat is not None
            nat = await bridge.call(node.nat.state)
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
            await bridge.call(node.publish, sign_record(record, key_pair), provider_keys, not withdrawn)
            log.info("published %s record in %.2f s", "a withdrawn" if withdrawn else "our", time.monotonic() - started)

        await publish()
        say(f"advertised {len(provider_keys) - 1} blocks, record ttl {config.ttl_s:g} s")
        published_at = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                fresh = await bridge.call(node.nat.state)
                if fresh.version == nat.version and time.monotonic() - published_at < config.ttl_s / 3:
                    continue
                if (fresh.reachability, fresh.relay) != (nat.reachability, nat.relay):
                    relaying = ", relaying" if fresh.relay else ""
                    say(f"reachability: {reachability_name(fresh.reachability)}{relaying}")
                if fresh.circuit_addresses != nat.circuit_addresses:
                    say(f"reachable through relays at: {', '.join(fresh.circuit_addresses) or 'none'}")
                try:
                    await publish()
                except Exception as e:  # keep serving; the next round retries
                    log.warning("republishing the record failed: %s", e)
                published_at = time.monotonic()
        say("stopping: withdrawing the record")
        try:
            await asyncio.wait_for(publish(withdrawn=True), timeout=30)
        except Exception as e:  # the record then expires by its ttl
            log.warning("withdrawing the record failed (it expires in %g s): %r", config.ttl_s, e)
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=2.0)
        if runner is not None:
            runner.shutdown()
        bridge.stop()
