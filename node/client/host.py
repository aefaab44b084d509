"""What a session needs from outside (`SessionHost`: `Client` is one), the spot-check hook it
calls after each hop's step (`StepCheck`), and after which peer errors another peer may succeed
(`should_fail_over`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from node.client.config import ClientConfig
from node.client.stream import StepRecord
from node.errors import PeerError, PeerRefused
from node.plan.routing import Hop
from protocol.shard_pb2 import Tensor

__all__ = ["SessionHost", "StepCheck", "should_fail_over"]

# Called after each hop's step with (hop, its past inputs, this step, its output), before the output
# goes on: a spot-check (node.client.verify) raises PeerLied, and the hop fails over like any other.
StepCheck = Callable[[Hop, Sequence[StepRecord], StepRecord, Tensor], None]


# Statuses after which the step is retried on another peer: the peer failed, is leaving, is
# full, or lost the session. Others (a bad argument, past max length) would fail anywhere.
_FAILOVER = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def should_fail_over(error: PeerError) -> bool:
    """Whether another peer may succeed where this one failed."""
    return not isinstance(error, PeerRefused) or error.code in _FAILOVER


class SessionHost(Protocol):
    """What a session asks of the one that made it: all it knows of the rest of the swarm."""

    @property
    def config(self) -> ClientConfig: ...

    def channel(self, address: str) -> grpc.Channel:
        """The gRPC channel to `address`."""
        ...

    def replacement(self, start: int, end: int, refresh: bool = False) -> list[Hop]:
        """A chain of peers not avoided for layers [start, end) (`refresh`: ask the swarm again), or RouteError."""
        ...

    def avoid(self, hop: Hop, error: PeerError) -> None:
        """Leave the peer of `hop` out of replacements for a while: it failed with `error`."""
        ...

    def recovered(self, note: str) -> None:
        """A failed hop was replaced; `note` says what failed and where its layers went."""
        ...

    def push_address(self, hop: Hop) -> str | None:
        """The address another peer dials to push to `hop` ("host:port#fingerprint", or
        "p2p:<peer-id>#fingerprint" behind NAT), or None when no other peer can be told one."""
        ...

    def spare(self, hop: Hop) -> Hop | None:
        """Another peer (not avoided) able to run all of `hop`'s layers, to keep warm; None if none is known."""
        ...

    def observed(self, hop: Hop, seconds: float) -> None:
        """A decode step through `hop` took `seconds` (its compute and the network leg to it)."""
        ...
