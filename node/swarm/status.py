"""`moemesh status`: the swarm as the DHT tells it, per model: coverage, peers, route; and the
replicated swarm state (CRDT) as one daemon holds it: members, load per peer, RTT matrix."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from crdt import SwarmState
from node.errors import RouteError
from node.mesh.nat import reachability_name
from node.mesh.reader import SwarmSnapshot
from node.mesh.records import peer_id_of
from node.plan.peers import PeerView, peers_from_members, peers_from_record
from node.plan.placement import block_capacity, bottleneck
from node.plan.routing import best_chain
from protocol.mesh_pb2 import PeerRecord

__all__ = ["crdt_report", "format_crdt_report", "format_report", "report"]


def _reach(record: PeerRecord, path: str | None) -> dict[str, Any]:
    return {
        "reachability": reachability_name(record.reachability),
        "relay": record.relay,
        "path": path or "not checked",  # how the reporting node is connected to it
        "circuit_addresses": list(record.circuit_addresses),
    }


def report(snapshot: SwarmSnapshot, paths: dict[str, str] | None = None) -> dict[str, Any]:
    """A JSON-ready view of the swarm (`paths`: how this node is connected to each peer)."""
    paths = paths or {}
    models: dict[str, Any] = {}
    for model_id, (name, layers) in sorted(snapshot.models().items()):
        peers = []
        coverage = [0] * layers
        views: list[PeerView] = []
        for pid, record in sorted(snapshot.records.items()):
            for view in peers_from_record(pid, record, model_id):
                for b in range(view.start, min(view.end, layers)):
                    coverage[b] += 1
                peers.append(
                    {
                        "peer_id": pid,
                        "start": view.start,
                        "end": view.end,
                        "grpc_addresses": list(record.grpc_addresses),
                        "tls_fingerprint": record.tls_fingerprint,  # "": plaintext (--insecure-lan)
                        "p2p_addresses": list(record.p2p_addresses),
                        "throughput": round(view.throughput, 3),
                        "quantization": view.quantization or "none",
                        "device": view.device or "cpu",
                        "block_bytes": view.block_bytes,
                        "version": record.software_version,
                        "protocol_version": record.protocol_version,
                        "record_age_s": round((snapshot.taken_at_ms - record.issued_at_ms) / 1000, 1),
                        "expires_in_s": round((record.expires_at_ms - snapshot.taken_at_ms) / 1000, 1),
                        **_reach(record, paths.get(pid)),
                    }
                )
                views.append(view)
        try:
            route = [{"peer_id": h.peer, "start": h.start, "end": h.end} for h in best_chain(views, layers)]
            missing: list[list[int]] = []
        except RouteError as e:
            route, missing = [], [list(gap) for gap in e.missing]
        models[model_id] = {
            "name": name,
            "num_layers": layers,
            "coverage": coverage,
            "full_route": bool(route),
            "route": route,
            "missing": missing,
            "peers": peers,
        }
    bare = sorted(pid for pid, r in snapshot.records.items() if not r.shards)
    return {
        "models": models,
        "bootstrap_only_peers": bare,
        "ignored_records": dict(sorted(snapshot.ignored.items())),
        "peer_ids": sorted({peer_id_of(r) for r in snapshot.records.values()}),
        "reachability": {pid: _reach(r, paths.get(pid)) for pid, r in sorted(snapshot.records.items())},
    }


def _reach_text(p: dict[str, Any]) -> str:
    relay = ", relay" if p["relay"] else ""
    reach = p["reachability"] if p["reachability"] != "unknown" else "unknown: no AutoNAT verdict yet, its log says why"
    return f"[{reach}{relay}; reached {p['path']}]"


def format_report(view: dict[str, Any]) -> str:
    lines = []
    if not view["models"]:
        lines.append("no model is served in this swarm yet")
    for model_id, m in view["models"].items():
        state = (
            "full route available"
            if m["full_route"]
            else "NO full route: missing layers " + ", ".join(f"{a}:{b}" for a, b in m["missing"])
        )
        lines.append(f"model {m['name']} ({model_id}), {m['num_layers']} layers: {state}")
        lines.append("  coverage (peers per block): " + " ".join(str(c) for c in m["coverage"]))
        for p in m["peers"]:
            lines.append(
                f"  {p['peer_id']}  layers {p['start']}:{p['end']}  {', '.join(p['grpc_addresses'])}"
                f"  {p['throughput']:.1f} tok/s/block  weights {p['quantization']} on {p.get('device', 'cpu')}"
                f"  v{p['version']} (proto {p['protocol_version']})"
                f"  record age {p['record_age_s']:.0f} s  {_reach_text(p)}"
            )
    if view["bootstrap_only_peers"]:
        lines.append(f"bootstrap-only peers: {len(view['bootstrap_only_peers'])}")
        for pid in view["bootstrap_only_peers"]:
            lines.append(f"  {pid}  {_reach_text(view['reachability'][pid])}")
    for pid, why in view["ignored_records"].items():
        lines.append(f"ignored {pid}: {why}")
    return "\n".join(lines)


def crdt_report(state: SwarmState, now: float, source: str = "") -> dict[str, Any]:
    """A JSON-ready view of one replica of the swarm state."""
    members, loads, rtts = state.snapshot()
    models: dict[str, Any] = {}
    for model_id in sorted({m.model_id for m in members.values() if m.model_id}):
        num_layers = max(m.num_layers for m in members.values() if m.model_id == model_id)
        capacity = block_capacity(peers_from_members(members, model_id, now), num_layers)
        models[model_id] = {
            "num_layers": num_layers,
            "capacity": [round(c, 3) for c in capacity],  # tokens/s each block can carry
            "bottleneck": round(bottleneck(capacity), 3),
        }
    return {
        "source": source,
        "members": [
            {
                "peer_id": pid,
                "model_id": m.model_id,
                "start": m.start,
                "end": m.end,
                "num_layers": m.num_layers,
                "max_layers": m.max_layers,
                "state": m.state,
                "throughput": round(m.throughput, 3),
                "capacity_bytes": m.capacity_bytes,
                "grpc_addresses": list(m.addresses),
                "p2p_addresses": list(m.p2p_addresses),
                "version": m.version,
                "lease_left_s": round(m.lease_until - now, 1),
                "load": asdict(loads[pid]) if pid in loads else None,
            }
            for pid, m in sorted(members.items())
        ],
        "rtt_ms": {pid: dict(sorted(row.items())) for pid, row in sorted(rtts.items())},
        "models": models,
    }


def _short(peer_id: str) -> str:
    return peer_id[-6:]


def format_crdt_report(view: dict[str, Any]) -> str:
    lines = [f"swarm state (CRDT) held by {view['source']}: {len(view['members'])} members"]
    for m in view["members"]:
        serves = f"layers {m['start']}:{m['end']} of {m['num_layers']} ({m['state']})" if m["model_id"] else "no model"
        load = m["load"]
        busy = (
            f"{load['active_sessions']} sessions, {load['free_kv_tokens']} free KV tokens, queue {load['queue_length']}"
            + (f", {load['decode_ms']:.1f} ms/token" if load.get("decode_ms") else "")
            if load
            else "no load reported"
        )
        lines.append(
            f"  {m['peer_id']}  {serves}  {m['throughput']:.1f} tok/s/block  {busy}  lease {m['lease_left_s']:.0f} s"
        )
    for model_id, info in view["models"].items():
        lines.append(
            f"  model {model_id}: tokens/s per block "
            + " ".join(f"{c:.1f}" for c in info["capacity"])
            + f"  (weakest {info['bottleneck']:.1f})"
        )
    peers = [m["peer_id"] for m in view["members"]]
    if view["rtt_ms"]:
        lines.append("  RTT ms (row: measured by; ids are the last 6 characters)")
        lines.append("  " + " " * 8 + "".join(f"{_short(p):>9}" for p in peers))
        for row_peer in peers:
            row = view["rtt_ms"].get(row_peer, {})
            cells = "".join(f"{row[p]:>9.2f}" if p in row else f"{'-':>9}" for p in peers)
            lines.append(f"  {_short(row_peer):>8}{cells}")
    return "\n".join(lines)
