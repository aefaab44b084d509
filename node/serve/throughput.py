"""A span's decode throughput, measured once per (model, device, dtype, quantization, kernels)
and cached on disk."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from node.progress import Ticks, ticks

if TYPE_CHECKING:
    from kernels import SpanModel
    from node.serve.engine import Engine

__all__ = ["CACHE_FILE", "kernels_key", "measure_throughput"]

CACHE_FILE = "throughput.json"  # in the cache folder: {"model_id|device|dtype": tokens/s per block}


async def measure_throughput(engine: Engine, cache_dir: Path, steps: int = 8) -> float:
    """Decode tokens/s through one block of `engine`'s span: read from `cache_dir` when this
    (model, device, dtype) was measured before, else measured on the compute thread (the loop
    goes on meanwhile) and cached."""
    span = engine.span
    quantized = "" if span.quantization == "none" else f"|{span.quantization}"  # the old keys stay valid
    key = f"{engine.model_id}|{span.device}|{span.dtype}{quantized}{kernels_key(span)}"
    cache_file = cache_dir / CACHE_FILE
    cached = _read(cache_file)
    if key in cached:
        return cached[key]

    def measure(tick: Ticks) -> float:  # on the compute thread
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
            tick(i + 1, steps)
        per_token = (time.perf_counter() - started) / steps
        return len(span.layers) / per_token

    with ticks("measuring throughput", unit="steps") as tick:
        value = await engine.run(measure, tick)
    cached = _read(cache_file)  # another daemon may have written meanwhile
    cached[key] = value
    _write_atomically(cache_file, json.dumps(cached, indent=1))
    return value


def kernels_key(span: SpanModel) -> str:
    """The faster CPU kernels a span runs on ("|packed", "|split", or ""): a figure measured
    before they existed (or where they are off) is not this span's."""
    from kernels import SplitLinear

    packed = "|packed" if getattr(span, "packed", False) else ""
    split = "|split" if any(isinstance(m, SplitLinear) for m in span.modules()) else ""
    return packed + split


def _read(cache_file: Path) -> dict[str, float]:
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _write_atomically(path: Path, text: str) -> None:
    """Write a file of its own, then rename it over `path`: several daemons may start at once,
    and a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
