"""Serving a span: the gRPC edge, the engine, the scheduler and the one lifecycle.

    config.py      ServerConfig: what serving was asked for
    engine.py      Engine: the span, sessions, KV budget, the compute thread; executes batches
    scheduler.py   Scheduler: continuous batching, one round = schedule -> execute -> update
    service.py     the gRPC edge: parse, call the engine, answer
    refusals.py    how the edge refuses: parsing, domain errors as statuses, bytes in flight per client
    push.py        Pusher: a hop's outputs pushed straight to the next hop's session
    lifecycle.py   Lifecycle: signals, drain, grace (serve and daemon); serve()
    throughput.py  measure_throughput: tokens/s per block, cached

Importing `node.serve` (or its config, lifecycle and throughput modules) does not import
torch; the names of the engine, scheduler and service load their modules when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from node.serve.config import ServerConfig
from node.serve.lifecycle import Lifecycle, serve
from node.serve.throughput import measure_throughput

if TYPE_CHECKING:
    from node.serve.engine import Engine, Session
    from node.serve.refusals import STATUS_OF
    from node.serve.scheduler import Batch, BatchResult, QueuedStep, Scheduler
    from node.serve.service import ShardService, start_server

__all__ = [
    "STATUS_OF",
    "Batch",
    "BatchResult",
    "Engine",
    "Lifecycle",
    "QueuedStep",
    "Scheduler",
    "ServerConfig",
    "Session",
    "ShardService",
    "measure_throughput",
    "serve",
    "start_server",
]

_LAZY = {
    "Engine": "node.serve.engine",
    "Session": "node.serve.engine",
    "Batch": "node.serve.scheduler",
    "BatchResult": "node.serve.scheduler",
    "QueuedStep": "node.serve.scheduler",
    "Scheduler": "node.serve.scheduler",
    "STATUS_OF": "node.serve.refusals",
    "ShardService": "node.serve.service",
    "start_server": "node.serve.service",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
