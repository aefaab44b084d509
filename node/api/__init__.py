"""The OpenAI-compatible HTTP API over the swarm (`moemesh api`), its metrics and its dashboard.

It relays through the client SDK (no torch): each request is one session along a route of
peers, run in a worker thread, so the servers batch concurrent requests' decode steps.
"""

from node.api.app import build_app
from node.api.relay import ApiConfig, Relay
from node.api.server import run_api
from node.api.swarm import SwarmView

__all__ = ["ApiConfig", "Relay", "SwarmView", "build_app", "run_api"]
