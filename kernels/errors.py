"""Errors raised by the compute layer.

KernelError                    (a MoemeshError: the root is in protocol/errors.py)
├── UnsupportedModelError      the architecture or one of its options has no kernel here
├── CacheError                 a session's KV cache cannot take the step
│   └── CacheFullError         the step would run past the cache's max length
└── ShapeError                 an input tensor has the wrong shape or dtype for this span
"""

from __future__ import annotations

from protocol.errors import MoemeshError

__all__ = ["CacheError", "CacheFullError", "KernelError", "ShapeError", "UnsupportedModelError"]


class KernelError(MoemeshError):
    """Base class of every error raised by `kernels`."""


class UnsupportedModelError(KernelError):
    """The model asks for something these kernels do not implement."""


class CacheError(KernelError):
    """The KV cache cannot take this step."""


class CacheFullError(CacheError):
    """The step would write past the cache's max length."""


class ShapeError(KernelError):
    """An input has the wrong shape or dtype for the span."""
