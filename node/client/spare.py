"""A warm spare: a second session of one hop's layers on another peer, kept in step.

Right after a hop ran a step, the client sends the spare the same input (the hop's recorded
one), without waiting for its answer: the spare's compute runs beside the chain, off the
critical path, and its KV cache holds the same numbers as the hop's (the same steps, in the
same order, through the same weights). When the hop fails, the spare answers whatever it still
owed and takes the hop's place with nothing to replay, so the stall does not grow with the
session (a replay recomputes every past step one by one).

Its cost: the spare peer computes every token of the session a second time and holds a second
KV cache, so it is for long sessions whose stall matters (`ClientConfig.warm_spares`).
"""

from __future__ import annotations

from node.client.stream import HopStream, StepRecord
from node.errors import PeerError

__all__ = ["WarmSpare"]


class WarmSpare:
    """The spare session of one hop, and the steps sent to it that it has not answered yet."""

    def __init__(self, stream: HopStream) -> None:
        self.stream = stream
        self.broken: PeerError | None = None  # it failed: no use as a spare any more
        self._pending: list[tuple[int, float]] = []  # (step id, timeout) of steps not answered yet

    def feed(self, record: StepRecord) -> None:
        """Send it the step the hop just ran (never waits on it)."""
        if self.broken is not None:
            return
        try:
            while self._pending and self.stream.has_answer():  # take what came, keep the queue short
                self._take()
        except PeerError as e:
            self.broken = e
            return
        self._pending.append(self.stream.send(record.input, record.position, record.last_only))

    def _take(self) -> None:
        step_id, timeout = self._pending[0]
        self.stream.result(step_id, timeout)
        self._pending.pop(0)

    def catch_up(self) -> HopStream:
        """Wait for every answer it owes; its stream then holds the hop's whole history (PeerError if not)."""
        if self.broken is not None:
            raise self.broken
        while self._pending:
            self._take()
        return self.stream

    def close(self) -> None:
        self.stream.close()
