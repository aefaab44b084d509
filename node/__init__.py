"""moemesh node: the gRPC shard server, the client SDK and the CLI.

Importing `node` or `node.client` does not import torch (the SDK only relays bytes). Importing
`node` alone imports nothing else: its names load their modules when first used, so the CLI
starts (and answers Ctrl-C) before grpc or numpy are imported.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from node.client import Client, ClientConfig, Hop, InferenceSession, PeerInfo, PeerView, Sampling, plan_route
    from node.errors import (
        ConfigError,
        MoemeshError,
        PeerError,
        PeerLied,
        PeerRefused,
        PeerTimeout,
        PeerUnavailable,
        PeerUntrusted,
        RequestError,
        RouteError,
        SessionClosed,
    )

__all__ = [
    "Client",
    "ClientConfig",
    "ConfigError",
    "Hop",
    "InferenceSession",
    "MoemeshError",
    "PeerError",
    "PeerInfo",
    "PeerLied",
    "PeerView",
    "PeerRefused",
    "PeerTimeout",
    "PeerUnavailable",
    "PeerUntrusted",
    "RequestError",
    "RouteError",
    "Sampling",
    "SessionClosed",
    "plan_route",
]

_CLIENT = {"Client", "ClientConfig", "Hop", "InferenceSession", "PeerInfo", "PeerView", "Sampling", "plan_route"}


def __getattr__(name: str) -> object:
    if name in __all__:
        return getattr(_importlib.import_module("node.client" if name in _CLIENT else "node.errors"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
