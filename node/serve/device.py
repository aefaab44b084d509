"""Where a span computes (`--device`) and how much memory its weights may take (`--max-memory`).

`resolve_device` turns "cpu" | "cuda" | "auto" into the device used, refusing "cuda" on a
machine without one (a `ConfigError`: the CLI exits 2). The weight budget is `--max-memory`
when given, else a safe share of what is free now on that device (RAM, or the GPU's memory),
less the KV budget. `blocks_that_fit` is what `--layers auto` may take; `check_fits` refuses
an explicit span that cannot fit, before anything is loaded.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from node.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from kernels import ModelConfig, SpanBytes, SpanModel
    from node.serve.config import ServerConfig
    from shards import Checkpoint
    from shards.manifest import Manifest

__all__ = [
    "DEVICES",
    "block_bytes",
    "blocks_that_fit",
    "check_fits",
    "device_name",
    "free_memory",
    "resolve_device",
    "span_sizes",
    "weight_budget",
]

DEVICES = ("cpu", "cuda", "auto")
SAFE_SHARE = {"cpu": 0.75, "cuda": 0.9}  # of the memory free at start that weights and KV caches may take


def resolve_device(requested: str) -> str:
    """ "cpu", or "cuda" when asked for (an error without a usable GPU), or for "auto" when present."""
    if requested not in DEVICES:
        raise ConfigError(f"unknown device {requested!r} (known: {', '.join(DEVICES)})")
    if requested == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        built = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"--device cuda: {built} (use --device cpu, or auto to use a GPU when there is one)")
    return "cuda" if available else "cpu"


def free_memory(device: str) -> int:
    """Bytes free now: the GPU's free memory, or the RAM the kernel says is available."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def weight_budget(config: ServerConfig, device: str) -> int:
    """Bytes the span's weights may take: --max-memory, else a safe share of free memory less the KV budget."""
    if config.max_memory_bytes:
        return config.max_memory_bytes
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return max(0, int(free_memory(device) * SAFE_SHARE[kind]) - config.kv_budget_bytes)


def _dtype(config: ServerConfig, checkpoint: Checkpoint) -> torch.dtype:
    from shards import DTYPES

    return DTYPES[config.dtype] if config.dtype else checkpoint.compute_dtype


def span_sizes(config: ServerConfig, source: Checkpoint | Manifest) -> SpanBytes:
    """The bytes of a span's weights, from a local checkpoint or (for weights still to be
    fetched) the model's manifest."""
    from kernels import SpanBytes
    from shards import DTYPES, Checkpoint, compute_dtype_of, embedding_dtype, model_config_from_hf

    if isinstance(source, Checkpoint):
        return SpanBytes(source.config, _dtype(config, source), config.quantize)
    hf = dict(source.config)
    dtype = DTYPES[config.dtype] if config.dtype else compute_dtype_of(hf, lambda: embedding_dtype(source))
    return SpanBytes(model_config_from_hf(hf), dtype, config.quantize)


def _bytes(n: int) -> str:
    """`n` bytes for a person: GiB, or MiB / KiB where GiB would round to nothing."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def blocks_that_fit(config: ServerConfig, source: Checkpoint | Manifest, device: str) -> int:
    """How many blocks `--layers auto` may take on `device` (at least 1, else a ConfigError)."""
    sizes = span_sizes(config, source)
    budget = weight_budget(config, device)
    fit = sizes.blocks_that_fit(budget)
    if fit < 1:
        raise ConfigError(
            f"not one block of {getattr(source, 'name', source.model_id)} fits in {_bytes(budget)}"
            f" for weights on {device}"
            f" ({_bytes(sizes.per_block)} per block at {sizes.dtype} {config.quantize}, plus"
            f" {_bytes(sizes.embedding + sizes.head)} for the embedding and head): raise --max-memory or --quantize"
        )
    return fit


def check_fits(config: ServerConfig, checkpoint: Checkpoint, device: str) -> int:
    """The bytes of layers [start, end) as configured; a ConfigError when they exceed the budget."""
    sizes = span_sizes(config, checkpoint)
    need = sizes.span(config.start, config.end)
    budget = weight_budget(config, device)
    if need > budget:
        given = "--max-memory" if config.max_memory_bytes else "the free memory's safe share less the KV budget"
        raise ConfigError(
            f"layers {config.start}:{config.end} of {checkpoint.name} need {_bytes(need)} of weights at"
            f" {sizes.dtype} {config.quantize}, more than {_bytes(budget)} ({given}) on {device}:"
            f" serve fewer layers, quantize (--quantize int8|int4) or raise --max-memory"
        )
    return need


@functools.cache
def _per_block(cfg: ModelConfig, dtype: torch.dtype, mode: str) -> int:
    from kernels import SpanBytes

    return SpanBytes(cfg, dtype, mode).per_block


def block_bytes(span: SpanModel) -> int:
    """Bytes of one block of `span`'s model as this span holds its weights (dtype, quantization)."""
    return _per_block(span.cfg, span.dtype, span.quantization)


def device_name(span: SpanModel) -> str:
    """ "cpu" or "cuda": where `span` computes, as records and Info say it."""
    return span.device.type
