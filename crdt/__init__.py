"""The replicated swarm state (pycrdt) and its sync: arrives with the CRDT issue.

Layering: imports only `protocol` of ours.
"""

__all__: list[str] = []
