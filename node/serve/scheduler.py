"""Continuous batching of session steps: one round is schedule -> execute -> update.

Whenever the compute thread is free, the scheduler takes every queued one-token decode step
over the same layers, from any number of sessions, and runs them as one batched forward;
sessions join and leave between rounds. Decode is memory-bound, so B sessions cost little
more than one. Prefill chunks run alone.

One round (`Scheduler.step`, like vLLM's `EngineCore.step`), with dataclasses between the parts:

    await wait_for_due()        # a decode batch waits briefly for the sessions due to join it
    batch = schedule()          # -> Batch: the steps, their layers, whether it is a decode batch
    result = await execute(batch)   # the engine, on its compute thread -> BatchResult
    update(batch, result, ...)  # settle each step's future; the timing state of the next rounds

The scheduler knows nothing of torch or the model: the engine hands it `execute` and a view
of its sessions, and owns its task (`Engine.start` / `Engine.aclose`); `run` is the loop
that task runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from node.errors import RequestError
from protocol.shard_pb2 import Tensor

if TYPE_CHECKING:
    from node.serve.config import ServerConfig
    from node.serve.engine import Session

__all__ = ["Batch", "BatchResult", "QueuedStep", "Scheduler"]


@dataclass
class QueuedStep:
    """A session step waiting for the compute thread; its caller awaits `future`."""

    session: Session
    position: int
    msg: Tensor
    last_only: bool
    future: asyncio.Future[Tensor] = field(repr=False)

    @property
    def batchable(self) -> bool:  # one new token: [1, 1] ids or [1, 1, H] hidden states
        return len(self.msg.shape) >= 2 and self.msg.shape[0] == 1 and self.msg.shape[1] == 1


@dataclass(frozen=True)
class Batch:
    """What one round runs: either one step alone, or one-token steps of distinct sessions over `layers`."""

    steps: tuple[QueuedStep, ...]
    layers: tuple[int, int]  # the local layers [first, last) every step of the batch runs through
    decode: bool  # one-token steps: its compute time paces the next decode batch's wait


@dataclass(frozen=True)
class BatchResult:
    """What executing a batch gave, step by step (in the batch's order)."""

    outputs: tuple[Tensor | RequestError, ...] = ()  # each step's output, or why it was refused
    error: BaseException | None = None  # the whole batch failed (a bug): every step fails with it
    batched: int = 0  # steps that ran together in one batched forward (statistics)

    def outcome(self, i: int) -> Tensor | BaseException:
        return self.error if self.error is not None else self.outputs[i]


Execute = Callable[[Batch], Awaitable[BatchResult]]


class Scheduler:
    """The queue of session steps and the policy that turns it into batches."""

    def __init__(self, config: ServerConfig, sessions: Mapping[str, Session], execute: Execute) -> None:
        self.config = config
        self._sessions = sessions  # the engine's open sessions (read only: who is due to decode)
        self._execute = execute
        self._queue: list[QueuedStep] = []
        self._wake = asyncio.Event()
        self._decode_s = 0.0  # compute time of the last decode batch
        self.batched_steps = 0  # statistics: decode steps run batched with other sessions' steps

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, session: Session, position: int, msg: Tensor, last_only: bool) -> asyncio.Future[Tensor]:
        """Queue one step of `session`; the future settles with its output or its RequestError."""
        future: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        self._queue.append(QueuedStep(session, position, msg, last_only, future))
        self._wake.set()
        return future

    def fail_queued(self, error: BaseException) -> None:
        """Fail every step still queued (the engine is closing)."""
        queue, self._queue = self._queue, []
        for s in queue:
            if not s.future.done():
                s.future.set_exception(error)

    async def run(self) -> None:
        """Serve the queue until cancelled: a round whenever steps are queued."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self.step()

    async def step(self) -> None:
        """One round: wait for due sessions, schedule a batch, execute it, settle its steps."""
        await self.wait_for_due()
        batch = self.schedule()
        if batch is None:
            return
        started = time.monotonic()
        try:
            result = await self._execute(batch)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug, or shutdown: fail these steps, keep scheduling
            result = BatchResult(error=e)
        self.update(batch, result, started=started, finished=time.monotonic())

    async def wait_for_due(self) -> None:
        """Before a decode batch: wait briefly for the sessions that decoded in the last batch
        and have not sent their next step yet (their answers just left; their next steps are
        on the way). Without this, sessions split into groups that alternate, and each group
        reads every weight again. The wait is a fraction of one batch's compute time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.batch_wait * self._decode_s
        while self._queue[0].batchable:
            queued = {s.session.id for s in self._queue}
            if len(queued) >= self.config.max_batch:
                return
            recent = time.monotonic() - 2 * self._decode_s - 0.05
            due = [s for s in self._sessions.values() if s.decoding and s.last_done > recent and s.id not in queued]
            remaining = deadline - loop.time()
            if not due or remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def schedule(self) -> Batch | None:
        """Take the next batch off the queue; None when all its steps' callers went away."""
        steps = [s for s in self._take() if not s.future.done()]  # a cancelled caller went away
        if not steps:
            return None
        head = steps[0]
        return Batch(tuple(steps), (head.session.first, head.session.last), len(steps) > 1 or head.batchable)

    def _take(self) -> list[QueuedStep]:
        """The oldest step, with every queued decode step over the same layers (one per session)."""
        head = self._queue[0]
        if not head.batchable:
            return [self._queue.pop(0)]
        layers = (head.session.first, head.session.last)
        batch: list[QueuedStep] = []
        rest: list[QueuedStep] = []
        sessions: set[str] = set()
        for s in self._queue:
            if (
                s.batchable
                and (s.session.first, s.session.last) == layers
                and s.session.id not in sessions
                and len(batch) < self.config.max_batch
            ):
                batch.append(s)
                sessions.add(s.session.id)
            else:
                rest.append(s)
        self._queue = rest
        return batch

    def update(self, batch: Batch, result: BatchResult, *, started: float, finished: float) -> None:
        """Settle each step's future, and record when its session stepped (who is due next)."""
        if batch.decode:
            self._decode_s = finished - started
        self.batched_steps += result.batched
        for i, s in enumerate(batch.steps):
            s.session.decoding, s.session.last_done = s.batchable, finished
            if s.future.done():
                continue
            outcome = result.outcome(i)
            if isinstance(outcome, BaseException):
                s.future.set_exception(outcome)
            else:
                s.future.set_result(outcome)
