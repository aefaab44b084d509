"""A generation session across a chain of hops, and its failover.

The session keeps every step's input to every hop. When a hop fails (killed, reset, hung, an
error status, told to move by a peer shutting down), the layers it ran are routed to other
peers, its past inputs are replayed to them, step by step as it got them, to rebuild the
same KV cache, and the step goes on. So a failure changes no token.

What the session needs from outside is the narrow `SessionHost` (routes for a span, an
avoid list, channels, the config, where recoveries are told); `Client` is one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import grpc
import numpy as np

from node.client.config import ClientConfig
from node.client.stream import HopStream, StepRecord
from node.errors import PeerError, PeerRefused, PeerUnavailable, RouteError, SessionClosed
from node.plan.routing import Hop
from protocol import check_tensor, make_tensor
from protocol.shard_pb2 import Tensor

# Called after each hop's step with (hop, its past inputs, this step, its output), before the output
# goes on: a spot-check (node.client.verify) raises PeerLied, and the hop fails over like any other.
StepCheck = Callable[[Hop, Sequence[StepRecord], StepRecord, Tensor], None]

__all__ = ["InferenceSession", "SessionHost", "should_fail_over"]

log = logging.getLogger(__name__)

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


class InferenceSession:
    """A generation session across a chain of hops; each hop keeps its own KV cache."""

    def __init__(self, host: SessionHost, hops: Sequence[Hop], model_id: str, max_length: int) -> None:
        self.hops = list(hops)
        self.max_length = max_length
        self.model_id = model_id
        self.position = 0
        self.recoveries: list[str] = []  # what failed and where its layers went, in order
        self.check: StepCheck | None = None
        self._host = host
        self._closed = False
        self._streams: list[HopStream | None] = [None] * len(self.hops)
        self._history: list[list[StepRecord]] = [[] for _ in self.hops]
        try:
            for k in range(len(self.hops)):
                self._open(k)
        except BaseException:
            self.close()
            raise

    def _connect(self, hop: Hop) -> HopStream:
        return HopStream(self._host.channel(hop.address), hop, self.model_id, self.max_length, self._host.config)

    def _open(self, k: int) -> HopStream:
        stream = self._streams[k]
        while stream is None:
            try:
                stream = self._streams[k] = self._connect(self.hops[k])
            except PeerError as e:
                if not should_fail_over(e):
                    raise
                self._recover(k, e)
                stream = self._streams[k]
        return stream

    def step(self, ids: Sequence[int], position: int | None = None, last_only: bool = True) -> np.ndarray:
        """Feed token ids at `position` (default: after the last step); return fp32 logits.

        The result is ``[V]`` when `last_only`, else ``[T, V]``.
        """
        if self._closed:
            raise SessionClosed("the session is closed")
        position = self.position if position is None else position
        for history in self._history:  # a step at an earlier position rolls every cache back
            while history and history[-1].position >= position:
                history.pop()
        tensor = make_tensor("int64", (1, len(ids)), np.asarray(ids, dtype="<i8").tobytes())
        k = 0
        while k < len(self.hops):
            try:
                out = self._open(k).step(tensor, position, last_only)
                if self.check is not None:
                    self.check(self.hops[k], self._history[k], StepRecord(position, tensor, last_only), out)
            except PeerError as e:
                if not should_fail_over(e):
                    raise
                self._recover(k, e)
                continue  # the same input, to the replacement
            self._history[k].append(StepRecord(position, tensor, last_only))
            tensor = out
            k += 1
        self.position = position + len(ids)
        meta = check_tensor(tensor, what="logits")
        if meta.dtype != "float32" or len(meta.shape) != 3:
            raise PeerError(self.hops[-1].address, f"expected fp32 logits [1, T, V], got {meta.dtype} {meta.shape}")
        logits = np.frombuffer(tensor.data, dtype="<f4").reshape(meta.shape)[0]
        return logits[-1] if last_only else logits

    # -- failover ----------------------------------------------------------------------------

    def _recover(self, k: int, error: PeerError) -> None:
        """Replace hop k by a chain of other peers holding the same KV cache, or raise.

        Each attempt asks for a route around the avoided peers (the swarm is asked again
        after the first), opens a stream on every new hop and replays hop k's past inputs
        through them. A route that cannot be found raises RouteError when it was the last
        try; a peer that fails the replay is avoided too and the next attempt goes around it.
        """
        failed = self.hops[k]
        self._host.avoid(failed, error)
        self._drop(k)
        problems = [f"{failed.address}: {error}"]
        no_route: RouteError | None = None
        for attempt in self._attempts():
            try:
                hops = self._host.replacement(failed.start, failed.end, refresh=attempt > 0)
            except RouteError as e:
                no_route = e
                problems.append(str(e))
                continue
            no_route = None
            try:
                streams, histories = self._rebuild(hops, self._history[k])
            except PeerError as e:
                if not should_fail_over(e):
                    raise
                self._avoid_the_one_of(hops, e)
                problems.append(str(e))
                continue
            self._splice(k, hops, streams, histories)
            self._tell(
                f"layers {failed.start}:{failed.end} moved from {failed.address} ({error})"
                f" to {', '.join(f'{h.address} [{h.start}:{h.end}]' for h in hops)},"
                f" {len(histories[0])} steps replayed"
            )
            return
        if no_route is not None:
            raise RouteError(
                f"layers {failed.start}:{failed.end} failed on {failed.address} ({error}) and {no_route}",
                no_route.missing,
            )
        raise PeerUnavailable(
            failed.address, f"gave up on layers {failed.start}:{failed.end}: " + "; ".join(problems[-4:])
        )

    def _attempts(self) -> Iterator[int]:
        """Attempt numbers, with exponential backoff between them, while the retries and the deadline last."""
        config = self._host.config
        deadline = time.monotonic() + config.recovery_deadline_s
        for attempt in range(config.max_retries):
            if attempt and time.monotonic() <= deadline:
                time.sleep(min(config.retry_backoff_s * 2 ** (attempt - 1), 5.0))
            if time.monotonic() > deadline:
                return
            yield attempt

    def _rebuild(self, hops: Sequence[Hop], inputs: list[StepRecord]) -> tuple[list[HopStream], list[list[StepRecord]]]:
        """Open `hops` and replay `inputs` through them in turn; each hop's inputs are its history.

        Closes what it opened when a hop fails (PeerError)."""
        streams: list[HopStream] = []
        histories: list[list[StepRecord]] = []
        try:
            for hop in hops:
                streams.append(self._connect(hop))
            for stream in streams:
                histories.append(inputs)
                outputs = stream.replay(inputs)
                inputs = [StepRecord(r.position, out, r.last_only) for r, out in zip(inputs, outputs, strict=True)]
        except PeerError:
            for stream in streams:
                stream.close()
            raise
        return streams, histories

    def _avoid_the_one_of(self, hops: Sequence[Hop], error: PeerError) -> None:
        bad = next((h for h in hops if h.address == error.address), None)
        if bad is not None:
            self._host.avoid(bad, error)

    def _drop(self, k: int) -> None:
        stream, self._streams[k] = self._streams[k], None
        if stream is not None:
            stream.close()

    def _splice(
        self, k: int, hops: Sequence[Hop], streams: Sequence[HopStream], histories: Sequence[list[StepRecord]]
    ) -> None:
        """Hop k becomes the chain `hops`, with their open streams and the histories they replayed."""
        self.hops[k : k + 1] = hops
        self._streams[k : k + 1] = list(streams)
        self._history[k : k + 1] = histories

    def _tell(self, note: str) -> None:
        log.info("%s", note)
        self.recoveries.append(note)
        self._host.recovered(note)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        for stream in self._streams:
            if stream is not None:
                stream.close()
        self._streams = [None] * len(self.hops)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
