"""The swarm as the dashboard shows it: per model, each block's coverage and each peer's span,
throughput, load and reachability.

With a bootstrap address it is `moemesh status --json`'s report (the DHT's signed records,
how this node reaches each peer, the load each daemon shares in the replicated state); with
plain peer addresses it is what each peer's `Info` says. Either way the shape is the same,
so the page has one renderer. Reading the swarm blocks (the DHT, dials), so it runs in a
worker thread, at most once per `refresh_s`, and every caller in between gets the last view.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from node.errors import MoemeshError

if TYPE_CHECKING:
    from node.client import Client
    from node.mesh.reader import SwarmReader

__all__ = ["SwarmView"]

log = logging.getLogger(__name__)


class SwarmView:
    """A cached, JSON-ready view of the swarm; `close()` releases the DHT client it opened."""

    def __init__(self, client: Client, bootstrap: Sequence[str], peers: Sequence[str], refresh_s: float) -> None:
        self._client = client
        self._bootstrap = list(bootstrap)
        self._peers = list(peers)
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._reader: SwarmReader | None = None
        self._view: dict[str, Any] | None = None
        self._read_at = 0.0

    def get(self) -> dict[str, Any]:
        """The view, read again when older than `refresh_s` (blocking: call it from a thread)."""
        with self._lock:
            if self._view is None or time.monotonic() - self._read_at >= self._refresh_s:
                try:
                    view = self._from_dht() if self._bootstrap else self._from_peers()
                    view["error"] = None
                except MoemeshError as e:  # shown on the page; the last good view stays beside it
                    log.info("reading the swarm: %s", e)
                    view = {**(self._view or _empty()), "error": str(e)}
                view["source"] = "dht" if self._bootstrap else "peers"
                view["updated_at"] = time.time()
                self._view, self._read_at = view, time.monotonic()
            return self._view

    def close(self) -> None:
        with self._lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.__exit__(None, None, None)

    def _from_dht(self) -> dict[str, Any]:
        from node.mesh.reader import SwarmReader
        from node.swarm.status import crdt_report, report

        if self._reader is None:
            key = self._client.config.swarm_key
            self._reader = SwarmReader(self._bootstrap, traversal=True, swarm_key=key).__enter__()
        reader = self._reader
        snapshot = reader.everyone()
        view = report(snapshot, reader.reach(snapshot.records))
        state = reader.swarm_state()
        crdt = crdt_report(state, time.time(), self._bootstrap[0]) if state is not None else None
        loads = {m["peer_id"]: m["load"] for m in crdt["members"]} if crdt else {}
        capacity = {model_id: m["capacity"] for model_id, m in crdt["models"].items()} if crdt else {}
        for model_id, model in view["models"].items():
            model["capacity"] = capacity.get(model_id)
            for peer in model["peers"]:
                peer["load"] = loads.get(peer["peer_id"])
        view["crdt"] = crdt
        return view

    def _from_peers(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        unreachable: dict[str, str] = {}
        for address in self._peers:
            try:
                info = self._client.info(address)
            except MoemeshError as e:
                unreachable[address] = str(e)
                continue
            model = models.setdefault(
                info.model_id,
                {"name": info.model_name, "num_layers": info.num_layers, "coverage": [0] * info.num_layers,
                 "peers": [], "capacity": None},
            )  # fmt: skip
            for b in range(info.start, min(info.end, info.num_layers)):
                model["coverage"][b] += 1
            model["peers"].append(
                {
                    "peer_id": address,
                    "start": info.start,
                    "end": info.end,
                    "grpc_addresses": [address],
                    "throughput": None,  # peers given by address publish no measured throughput
                    "version": info.version,
                    "reachability": "draining" if info.draining else "reachable",
                    "relay": False,
                    "path": "direct",
                    "load": {"active_sessions": info.active_sessions, "kv_free_bytes": info.kv_free_bytes},
                }
            )
        for model in models.values():
            missing = _gaps(model["coverage"])
            model.update(full_route=not missing, missing=missing, route=[])
        return {"models": models, "bootstrap_only_peers": [], "unreachable": unreachable, "crdt": None}


def _gaps(coverage: Sequence[int]) -> list[list[int]]:
    """Runs of blocks no peer covers, as [start, end) pairs."""
    gaps: list[list[int]] = []
    for b, count in enumerate(coverage):
        if count:
            continue
        if gaps and gaps[-1][1] == b:
            gaps[-1][1] = b + 1
        else:
            gaps.append([b, b + 1])
    return gaps


def _empty() -> dict[str, Any]:
    return {"models": {}, "bootstrap_only_peers": [], "crdt": None}
