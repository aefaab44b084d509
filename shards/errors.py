"""Errors raised while describing and loading shards.

ShardError                    (a MoemeshError: the root is in protocol/errors.py)
├── SpanSpecError            a span such as "0:8" is malformed or outside the model
├── CheckpointError          the checkpoint folder is missing, unreadable or inconsistent
│   └── ManifestError        a model manifest is malformed, or does not match what it names
└── UnsupportedModelError    (kernels) the architecture has no kernel here: "not supported: ..."
"""

from __future__ import annotations

from kernels.errors import UnsupportedModelError
from protocol.errors import MoemeshError

__all__ = ["CheckpointError", "ManifestError", "ShardError", "SpanSpecError", "UnsupportedModelError"]


class ShardError(MoemeshError):
    """Base class of the errors raised by `shards` itself."""


class SpanSpecError(ShardError, ValueError):
    """A span spec is malformed or does not fit the model."""


class CheckpointError(ShardError):
    """The checkpoint cannot be read as the model it claims to be."""


class ManifestError(CheckpointError):
    """A manifest is malformed (a hostile or broken peer sent it) or does not match what it names."""
