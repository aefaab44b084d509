"""`moemesh`: serve a span of a model, join a swarm, generate through a chain of peers, inspect it.

Imports no torch at import time; `serve` and `daemon` load it when they run.
"""

from node.cli.main import main

__all__ = ["main"]
