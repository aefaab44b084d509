"""A span's decode throughput through one block, measured once per (model, device, dtype) and cached."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from node.serve.engine import SpanRunner

__all__ = ["measure_throughput"]


def measure_throughput(runner: SpanRunner, cache_dir: Path, steps: int = 8) -> float:
    """Decode tokens/s through one block (blocks / seconds per token), cached in `cache_dir`.

    Blocks the calling thread while the measurement runs on the engine's compute thread."""
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
