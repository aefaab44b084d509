"""Model partitioning: span specs and span loading from local safetensors checkpoints.

The loader (`shards.checkpoint`) and the config translation (`shards.hfconfig`), which need
torch, are imported on first use, so that the parts of a node that only read manifests and
span specs (a bootstrap or relay daemon, the weights protocol) start without torch, and run
where it is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shards.errors import CheckpointError, ManifestError, ShardError, SpanSpecError, UnsupportedModelError
from shards.spec import SpanSpec, parse_layers, split_evenly

if TYPE_CHECKING:
    from shards.checkpoint import Checkpoint
    from shards.hfconfig import DTYPES, compute_dtype_of, embedding_dtype, model_config_from_hf

_LAZY = {"Checkpoint": "checkpoint"} | dict.fromkeys(
    ("DTYPES", "compute_dtype_of", "embedding_dtype", "model_config_from_hf"), "hfconfig"
)

__all__ = [
    "DTYPES",
    "Checkpoint",
    "CheckpointError",
    "ManifestError",
    "ShardError",
    "SpanSpec",
    "SpanSpecError",
    "UnsupportedModelError",
    "compute_dtype_of",
    "embedding_dtype",
    "model_config_from_hf",
    "parse_layers",
    "split_evenly",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"shards.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'shards' has no attribute {name!r}")


del TYPE_CHECKING  # not part of the package
