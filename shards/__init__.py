"""Model partitioning: span specs and span loading from local safetensors checkpoints."""

from shards.checkpoint import DTYPES, Checkpoint, compute_dtype_of, embedding_dtype, model_config_from_hf
from shards.errors import CheckpointError, ManifestError, ShardError, SpanSpecError, UnsupportedModelError
from shards.spec import SpanSpec, parse_layers, split_evenly

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
