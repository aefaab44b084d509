"""Prometheus metrics of a daemon (`--metrics-port`), read from its state at each scrape.

Nothing is counted twice: the engine, the scheduler and the swarm agent keep their own
counters, and this collector turns what they hold into metric families when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from node.mesh.nat import reachability_name

if TYPE_CHECKING:
    from node.daemon import Daemon

__all__ = ["DaemonCollector", "registry_for", "serve_metrics"]


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        d = self.daemon
        serving = d.serving
        sessions = GaugeMetricFamily("moemesh_sessions", "open inference sessions")
        queued = GaugeMetricFamily("moemesh_queued_steps", "session steps waiting for the compute thread")
        batched = CounterMetricFamily("moemesh_batched_steps", "decode steps run batched with other sessions'")
        kv_used = GaugeMetricFamily("moemesh_kv_bytes_used", "bytes of KV cache reserved by open sessions")
        kv_budget = GaugeMetricFamily("moemesh_kv_bytes_budget", "bytes the KV caches of all sessions may take")
        throughput = GaugeMetricFamily("moemesh_block_tokens_per_second", "measured decode tokens/s through one block")
        layers = GaugeMetricFamily("moemesh_served_layers", "layers served now", labels=["model_id", "quantization"])
        if serving is not None:
            engine = serving.engine
            sessions.add_metric([], len(engine.sessions))
            queued.add_metric([], engine.queued)
            batched.add_metric([], engine.batched_steps)
            kv_budget.add_metric([], engine.config.kv_budget_bytes)
            kv_used.add_metric([], engine.config.kv_budget_bytes - engine.kv_free_bytes)
            throughput.add_metric([], serving.shard.throughput)
            layers.add_metric(
                [serving.shard.model_id, engine.span.quantization], serving.shard.end - serving.shard.start
            )
        yield from (sessions, queued, batched, kv_used, kv_budget, throughput, layers)
        reach = GaugeMetricFamily("moemesh_reachability", "AutoNAT's verdict (1 for the current one)", labels=["state"])
        current = reachability_name(d.advert.nat.reachability)
        for state in ("public", "private", "unknown"):
            reach.add_metric([state], 1.0 if state == current else 0.0)
        yield reach
        agent = d.agent
        if agent is not None:
            members = GaugeMetricFamily("moemesh_swarm_members", "members in this daemon's view of the swarm state")
            members.add_metric([], len(agent.members()))
            sync = CounterMetricFamily("moemesh_sync_bytes", "swarm-state sync frames", labels=["direction"])
            sync.add_metric(["in"], agent.sync_bytes_in)
            sync.add_metric(["out"], agent.sync_bytes_out)
            yield from (members, sync)


def registry_for(daemon: Daemon) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return registry


def serve_metrics(daemon: Daemon, host: str, port: int) -> tuple[WSGIServer, str]:
    """Start prometheus_client's small HTTP server (its own thread) for `daemon`; stop it with
    `shutdown()` and `server_close()`. Returns it with the address it listens on."""
    server, _ = start_http_server(port, addr=host, registry=registry_for(daemon))
    return server, f"{host}:{server.server_port}"
