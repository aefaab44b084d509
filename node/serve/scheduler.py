"""Continuous batching of session steps: one round is schedule -> execute -> update.

Whenever the compute thread is free, the scheduler takes every queued one-token decode step
over the same layers, from any number of sessions, and runs them as one batched forward;
sessions join and leave between rounds. Decode is memory-bound, so B sessions cost little
more than one. Prefill chunks and stateless Forwards run alone.

Clients are served round-robin: each client (one connection, `Session.client`) has its own
queue, and each round goes to the client with work that was served longest ago, so a client
that queued a hundred prefills has one of them run, then everyone else's next step goes
first (a client that sends one step at a time is not sent to the back for having had an
empty queue in between).
A decode batch fills its seats round-robin too (one step per client per pass). A round is
not preempted, so two things keep a long one from standing in a short step's way:

- a long Forward runs one layer per round (the engine keeps its progress on the step, and
  `update` puts it back at the head of its client's queue): other clients' steps go
  between its layers, and the result is bit-identical (a pipeline of one-layer hops);
- before a long round, the scheduler waits briefly (a fraction `batch_wait` of the last long
  round's compute time) for the sessions of other clients that just got an answer and
  whose next step is on its way, as it does for a decode batch.

So a well-behaved client waits about one layer of another client's prefill per step,
however much that client queued; and each client may queue at most
`config.max_queued_per_client` steps (more is Overloaded, RESOURCE_EXHAUSTED on the wire).

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
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from node.errors import Overloaded, RequestError
from protocol.shard_pb2 import Tensor

if TYPE_CHECKING:
    from node.serve.config import ServerConfig
    from node.serve.engine import Session

__all__ = ["Batch", "BatchResult", "QueuedStep", "Scheduler"]


@dataclass
class QueuedStep:
    """A session step (or, without a session, a stateless Forward) waiting for the compute
    thread; its caller awaits `future`."""

    session: Session | None  # None: a Forward over `layers` with a throwaway cache
    position: int
    msg: Tensor
    last_only: bool
    future: asyncio.Future[Tensor] = field(repr=False)
    client: str = ""  # who asked (the gRPC peer): whose turn it takes
    layers: tuple[int, int] = (0, 0)  # local layers [first, last) it runs through
    progress: Any = field(default=None, repr=False)  # the engine's partial work on a Forward run in slices

    def __post_init__(self) -> None:
        if self.session is not None:
            self.layers = (self.session.first, self.session.last)
            self.client = self.session.client

    @property
    def batchable(self) -> bool:  # a session's one new token: [1, 1] ids or [1, 1, H] hidden states
        return (
            self.session is not None and len(self.msg.shape) >= 2 and self.msg.shape[0] == 1 and self.msg.shape[1] == 1
        )


@dataclass(frozen=True)
class Batch:
    """What one round runs: either one step alone, or one-token steps of distinct sessions over `layers`."""

    steps: tuple[QueuedStep, ...]
    layers: tuple[int, int]  # the local layers [first, last) every step of the batch runs through
    decode: bool  # one-token steps: its compute time paces the next decode batch's wait


@dataclass(frozen=True)
class BatchResult:
    """What executing a batch gave, step by step (in the batch's order)."""

    # each step's output, or why it was refused; None: a slice of it ran, queue it again for the rest
    outputs: tuple[Tensor | RequestError | None, ...] = ()
    error: BaseException | None = None  # the whole batch failed (a bug): every step fails with it
    batched: int = 0  # steps that ran together in one batched forward (statistics)

    def outcome(self, i: int) -> Tensor | BaseException | None:
        return self.error if self.error is not None else self.outputs[i]


Execute = Callable[[Batch], Awaitable[BatchResult]]
DECODE_EWMA_WEIGHT = 0.3  # of the newest decode batch in the moving average: a slowdown shows within a few tokens


class Scheduler:
    """The queue of session steps and the policy that turns it into batches."""

    def __init__(self, config: ServerConfig, sessions: Mapping[str, Session], execute: Execute) -> None:
        self.config = config
        self._sessions = sessions  # the engine's open sessions (read only: who is due to decode)
        self._execute = execute
        self._queues: dict[str, deque[QueuedStep]] = {}  # per client with work
        self._served: dict[str, int] = {}  # client -> the round it was last served in
        self._round = 0
        self._wake = asyncio.Event()
        self._decode_s = 0.0  # compute time of the last decode batch
        self._long_s = 0.0  # compute time of the last other round (a prefill, a slice of a Forward)
        self.batched_steps = 0  # statistics: decode steps run batched with other sessions' steps
        self.decode_ewma_s = 0.0  # moving average of decode batches' compute time: what a token costs here now

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queued_of(self, client: str) -> int:
        queue = self._queues.get(client)
        return len(queue) if queue is not None else 0

    def submit(self, session: Session, position: int, msg: Tensor, last_only: bool) -> asyncio.Future[Tensor]:
        """Queue one step of `session` in its client's queue; the future settles with its output or
        its RequestError. Overloaded at once when that client has its whole share queued."""
        return self._enqueue(QueuedStep(session, position, msg, last_only, self._future()))

    def submit_forward(
        self, client: str, layers: tuple[int, int], msg: Tensor, last_only: bool
    ) -> asyncio.Future[Tensor]:
        """Queue a stateless Forward of `client` over local `layers` (it runs alone)."""
        return self._enqueue(QueuedStep(None, 0, msg, last_only, self._future(), client, layers))

    @staticmethod
    def _future() -> asyncio.Future[Tensor]:
        return asyncio.get_running_loop().create_future()

    def _enqueue(self, step: QueuedStep) -> asyncio.Future[Tensor]:
        limit = self.config.max_queued_per_client
        queue = self._queues.get(step.client)
        if queue is not None and len(queue) >= limit:
            raise Overloaded(f"this client has {len(queue)} steps queued (its limit is {limit}): wait for them")
        if queue is None:
            queue = self._queues[step.client] = deque()
        queue.append(step)
        self._wake.set()
        return step.future

    def fail_queued(self, error: BaseException) -> None:
        """Fail every step still queued (the engine is closing)."""
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            for s in queue:
                if not s.future.done():
                    s.future.set_exception(error)

    async def run(self) -> None:
        """Serve the queues until cancelled: a round whenever steps are queued."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queues:
                await self.step()

    async def step(self) -> None:
        """One round: wait for due sessions, schedule a batch, execute it, settle its steps."""
        await self.wait_for_due()
        await self.wait_for_others()
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
        while self._queues and self._head().batchable:
            queued = {s.session.id for s in self._all() if s.session is not None}
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

    async def wait_for_others(self) -> None:
        """Before a long round (a prefill, a slice of a Forward): wait briefly for the sessions of
        other clients that just got an answer and have not sent their next step yet, so that a
        client that queued a lot does not take the compute thread in the moment between two
        steps of one that did not. The wait is a fraction of the last long round's compute time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.batch_wait * self._long_s
        while self._queues:
            head = self._head()
            if head.batchable:
                return
            queued = {s.session.id for s in self._all() if s.session is not None}
            recent = time.monotonic() - 2 * self._decode_s - 0.05
            due = [
                s
                for s in self._sessions.values()
                if s.client != head.client and not s.closed and s.last_done > recent and s.id not in queued
            ]
            remaining = deadline - loop.time()
            if not due or remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def schedule(self) -> Batch | None:
        """Take the next batch off the queues; None when all its steps' callers went away."""
        if not self._queues:
            return None
        steps = [s for s in self._take() if not s.future.done()]  # a cancelled caller went away
        if not steps:
            return None
        head = steps[0]
        return Batch(tuple(steps), head.layers, len(steps) > 1 or head.batchable)

    def _turns(self) -> list[str]:
        """The clients with work, the one served longest ago (or never) first."""
        return sorted(self._queues, key=lambda c: self._served.get(c, -1))

    def _head(self) -> QueuedStep:
        """The oldest step of the client whose turn it is."""
        return self._queues[self._turns()[0]][0]

    def _all(self) -> Iterator[QueuedStep]:
        for queue in self._queues.values():
            yield from queue

    def _take(self) -> list[QueuedStep]:
        """The oldest step of the client whose turn it is; when it is a decode step, with queued
        decode steps over the same layers (one per session), taken round-robin over the clients.
        That client's turn then goes to the back."""
        turns = self._turns()
        queue = self._queues[turns[0]]
        head = queue[0]
        if not head.batchable:
            queue.popleft()
            taken = [head]
        else:
            taken = self._decode_batch(head.layers, turns)
        self._round += 1
        for s in taken:
            self._served[s.client] = self._round
        for client in [c for c, q in self._queues.items() if not q]:
            del self._queues[client]
        if len(self._served) > 4 * (len(self._queues) + self.config.max_sessions):  # bound the memory of turns
            self._served = {c: r for c, r in self._served.items() if c in self._queues}
        return taken

    def _decode_batch(self, layers: tuple[int, int], turns: list[str]) -> list[QueuedStep]:
        """Up to max_batch decode steps over `layers`, one per session, one per client per pass
        (in turn order), each client's oldest first."""
        batch: list[QueuedStep] = []
        sessions: set[str] = set()
        limit = self.config.max_batch
        while len(batch) < limit:
            took = False
            for client in turns:
                queue = self._queues[client]
                found = next(
                    (
                        (s, s.session.id)
                        for s in queue
                        if s.batchable and s.layers == layers and s.session is not None and s.session.id not in sessions
                    ),
                    None,
                )
                if found is None:
                    continue
                step, session_id = found
                queue.remove(step)
                batch.append(step)
                sessions.add(session_id)
                took = True
                if len(batch) >= limit:
                    break
            if not took:
                break
        return batch

    def update(self, batch: Batch, result: BatchResult, *, started: float, finished: float) -> None:
        """Settle each step's future, and record when its session stepped (who is due next)."""
        if batch.decode:
            self._decode_s = finished - started
            a, old = DECODE_EWMA_WEIGHT, self.decode_ewma_s
            self.decode_ewma_s = a * self._decode_s + (1 - a) * old if old else self._decode_s
        else:
            self._long_s = finished - started
        self.batched_steps += result.batched
        for i, s in enumerate(batch.steps):
            if s.session is not None:
                s.session.decoding, s.session.last_done = s.batchable, finished
            if s.future.done():
                continue
            outcome = result.outcome(i)
            if outcome is None:  # a slice ran: the rest at its client's next turn, before its other steps
                self._queues.setdefault(s.client, deque()).appendleft(s)
            elif isinstance(outcome, BaseException):
                s.future.set_exception(outcome)
            else:
                s.future.set_result(outcome)
