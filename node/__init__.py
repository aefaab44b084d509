"""moemesh node: the gRPC shard server, the client SDK and the CLI.

Importing `node` or `node.client` does not import torch (the SDK only relays bytes).
"""

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
