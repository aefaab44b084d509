"""The span runner: one loaded span, its sessions and their KV caches, compute off the event loop.

A request is checked here (model id, layers, lengths, memory budget) and turned into a
domain error (`node.errors.RequestError`; the gRPC edge picks the status); compute runs on one dedicated executor thread
so the asyncio loop (heartbeats, other streams) never waits on a long prefill.

Session steps go through one scheduler (continuous batching): whenever the compute thread
is free it takes every queued one-token decode step over the same layers, from any number
of sessions, and runs them as one batched forward; sessions join and leave between steps.
Decode is memory-bound, so B sessions cost little more than one. Prefill chunks run alone.

Every torch operation of the server (loading included) runs on that one compute thread.
With OpenMP, each thread that enters a parallel region gets its own worker team; two
teams on a 2-core machine fight for the cores, and we measured decode at less than half
speed when the weights were loaded on the main thread and used on another.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from kernels import CacheError, CacheFullError, KVCache, ShapeError, SpanModel
from node.errors import Draining, InvalidRequest, OutOfRange, Overloaded, RequestError, SessionStateError, WrongModel
from node.serve.codec import from_message, to_message
from protocol import DEFAULT_MAX_MESSAGE_BYTES, InvalidTensorError
from protocol.shard_pb2 import Tensor
from shards import DTYPES, Checkpoint

__all__ = ["ServerConfig", "Session", "SpanRunner"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """What `moemesh serve` was asked for."""

    model: Path
    start: int
    end: int
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (printed at start)
    dtype: str | None = None  # None: as stored in the checkpoint
    max_sessions: int = 64
    max_length: int = 8192  # longest session accepted (capped by the model's positions)
    default_length: int = 2048  # when a session does not say
    max_tokens_per_step: int = 8192  # longest chunk one step or Forward may carry
    kv_budget_bytes: int = 4 * 1024**3  # KV caches of all sessions together
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    torch_threads: int | None = None
    max_batch: int = 16  # decode steps of this many sessions run as one forward
    batch_wait: float = 0.25  # a batch may wait this fraction of the last one's compute time for due steps
    idle_timeout_s: float = 300.0  # a session with no request for this long is closed
    grace_s: float = 30.0  # on shutdown: how long open sessions may finish before they are told to move


@dataclass
class Session:
    id: str
    first: int  # local layers [first, last) of the span
    last: int
    cache: KVCache
    closed: bool = False
    decoding: bool = False  # its last step was one token: the next one is due soon
    last_done: float = 0.0  # when its last step finished (monotonic)


@dataclass
class _Step:
    """A session step waiting for the compute thread."""

    session: Session
    position: int
    msg: Tensor
    last_only: bool
    future: asyncio.Future[Tensor] = field(repr=False)

    @property
    def batchable(self) -> bool:  # one new token: [1, 1] ids or [1, 1, H] hidden states
        return len(self.msg.shape) >= 2 and self.msg.shape[0] == 1 and self.msg.shape[1] == 1


class SpanRunner:
    """Owns the span, the sessions and the compute thread."""

    def __init__(self, config: ServerConfig, progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moemesh-compute")
        try:
            self.span, self.model_id, self.model_name = self._executor.submit(self._load, progress).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self.max_length = min(config.max_length, self.span.cfg.max_position_embeddings)
        self.sessions: dict[str, Session] = {}
        self._kv_bytes = 0
        self._ids = itertools.count()
        self._queue: list[_Step] = []
        self._wake: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self.draining = False  # refuse new sessions (shutting down)
        self.moving = asyncio.Event()  # open sessions must move to another peer now
        self._decode_s = 0.0  # compute time of the last decode batch
        self.batched_steps = 0  # statistics: decode steps run batched with other sessions' steps

    def _load(self, progress: Callable[[str], None] | None) -> tuple[SpanModel, str, str]:
        """Runs on the compute thread: read only the span's tensors from the checkpoint."""
        config = self.config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        checkpoint = Checkpoint(config.model)
        if progress:
            layers = checkpoint.config.num_layers
            progress(f"loading layers {config.start}:{config.end} of {checkpoint.name} ({layers} layers)")
        span = checkpoint.load_span(config.start, config.end, DTYPES[config.dtype] if config.dtype else None)
        return span, checkpoint.model_id(), checkpoint.name

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` on the compute thread and wait (for callers outside the event loop)."""
        return self._executor.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def drain(self, grace_s: float | None = None) -> None:
        """Shut down gracefully: refuse new sessions, let open ones finish for `grace_s`, then
        tell the rest to move (their streams end with UNAVAILABLE and the client replays them
        elsewhere), so no client loses work."""
        grace_s = self.config.grace_s if grace_s is None else grace_s
        self.draining = True
        deadline = time.monotonic() + grace_s
        if self.sessions:
            log.info("draining: %d open sessions may finish within %g s", len(self.sessions), grace_s)
        while self.sessions and not self.moving.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.sessions:
            log.info("grace period over: telling %d sessions to move", len(self.sessions))
        self.moving.set()
        deadline = time.monotonic() + 5.0
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # -- checks -----------------------------------------------------------------------------

    def local_layers(self, model_id: str, start: int, end: int) -> tuple[int, int]:
        """Translate global layers [start, end) into the span's local ones, or reject."""
        if model_id and model_id != self.model_id:
            raise WrongModel(
                f"this server serves model {self.model_id} ({self.model_name}), not {model_id}",
            )
        s, e = self.span.start, self.span.end
        if not s <= start < end <= e:
            raise OutOfRange(
                f"layers [{start}, {end}) are outside the served span [{s}, {e})",
            )
        return start - s, end - s

    def decode_input(self, msg: Tensor, first: int) -> torch.Tensor:
        try:
            x = from_message(msg)
            self.span.check_input(x, first)
        except (InvalidTensorError, ShapeError) as e:
            raise InvalidRequest(str(e)) from None
        if x.shape[0] != 1:
            raise InvalidRequest(f"batch size {x.shape[0]} is not supported (use 1)")
        if x.shape[1] > self.config.max_tokens_per_step:
            raise InvalidRequest(
                f"{x.shape[1]} tokens in one step exceed the server's limit {self.config.max_tokens_per_step};"
                " split the prefill into chunks",
            )
        return x

    def emits_logits(self, last: int) -> bool:
        """Whether running up to local layer `last` ends in the LM head (logits travel as fp32)."""
        return self.span.is_last and last == len(self.span.layers)

    # -- stateless forward ------------------------------------------------------------------

    async def forward(self, model_id: str, start: int, end: int, msg: Tensor, last_only: bool) -> Tensor:
        first, last = self.local_layers(model_id, start, end)

        def compute() -> Tensor:
            x = self.decode_input(msg, first)
            if x.shape[1] > self.max_length:
                raise OutOfRange(f"{x.shape[1]} tokens exceed max length {self.max_length}")
            cache = self.span.new_cache(x.shape[1], layers=(first, last))
            out = self.span(x, cache, 0, last_only=last_only, layers=(first, last))
            return to_message(out.float() if self.emits_logits(last) else out)

        return await self.run(compute)

    # -- sessions ---------------------------------------------------------------------------

    async def open(self, model_id: str, start: int, end: int, max_length: int) -> Session:
        first, last = self.local_layers(model_id, start, end)
        if self.draining:
            raise Draining("server is shutting down: open the session on another peer")
        length = max_length or min(self.config.default_length, self.max_length)
        if length > self.max_length:
            raise OutOfRange(f"max_length {length} exceeds this server's limit {self.max_length}")
        if len(self.sessions) >= self.config.max_sessions:
            raise Overloaded(
                f"server is full: {len(self.sessions)} sessions open (limit {self.config.max_sessions})",
            )
        cfg = self.span.cfg
        need = KVCache.bytes_for(last - first, cfg.num_kv_heads, cfg.head_dim, length, self.span.dtype)
        if self._kv_bytes + need > self.config.kv_budget_bytes:
            raise Overloaded(
                f"KV cache budget exhausted: {need} bytes needed, {self.config.kv_budget_bytes - self._kv_bytes} free",
            )
        self._kv_bytes += need  # reserved before the await, so concurrent opens cannot overbook
        try:
            cache = await self.run(lambda: self.span.new_cache(length, layers=(first, last)))
        except BaseException:
            self._kv_bytes -= need
            raise
        session = Session(f"{next(self._ids)}-{secrets.token_hex(6)}", first, last, cache)
        self.sessions[session.id] = session
        log.debug("session %s opened: layers %d:%d, max_length %d", session.id, start, end, length)
        return session

    def close(self, session: Session) -> None:
        if session.closed:
            return
        session.closed = True
        if self.sessions.pop(session.id, None) is not None:
            self._kv_bytes -= session.cache.nbytes
        log.debug("session %s closed", session.id)

    @property
    def kv_free_bytes(self) -> int:
        return self.config.kv_budget_bytes - self._kv_bytes

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def step(self, session: Session, position: int, msg: Tensor, last_only: bool) -> Tensor:
        """Queue one step of `session` for the scheduler and wait for its output."""
        if self._scheduler is None or self._wake is None:
            self._wake = asyncio.Event()
            self._scheduler = asyncio.create_task(self._schedule(), name="moemesh-scheduler")
        future: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        self._queue.append(_Step(session, position, msg, last_only, future))
        self._wake.set()
        return await future

    async def _schedule(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._gather()
                steps = [s for s in self._take() if not s.future.done()]  # a cancelled caller went away
                if not steps:
                    continue
                started = time.monotonic()
                try:
                    outcomes = await self.run(self._compute, steps)
                except BaseException as e:  # a bug, or shutdown: fail these steps, keep scheduling
                    outcomes = [e for _ in steps]
                    if isinstance(e, asyncio.CancelledError):
                        raise
                done = time.monotonic()
                if len(steps) > 1 or steps[0].batchable:
                    self._decode_s = done - started
                for s, outcome in zip(steps, outcomes, strict=True):
                    s.session.decoding, s.session.last_done = s.batchable, done
                    if s.future.done() or outcome is None:
                        continue
                    if isinstance(outcome, BaseException):
                        s.future.set_exception(outcome)
                    else:
                        s.future.set_result(outcome)

    async def _gather(self) -> None:
        """Before a decode batch: wait briefly for the sessions that decoded in the last batch
        and have not sent their next step yet (their answers just left; their next steps are
        on the way). Without this, sessions split into groups that alternate, and each group
        reads every weight again. The wait is a fraction of one batch's compute time."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.batch_wait * self._decode_s
        while self._queue[0].batchable:
            queued = {s.session.id for s in self._queue}
            if len(queued) >= self.config.max_batch:
                return
            recent = time.monotonic() - 2 * self._decode_s - 0.05
            due = [s for s in self.sessions.values() if s.decoding and s.last_done > recent and s.id not in queued]
            remaining = deadline - loop.time()
            if not due or remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Step]:
        """The next batch: the oldest step, with every queued decode step over the same layers."""
        head = self._queue[0]
        if not head.batchable:
            return [self._queue.pop(0)]
        layers = (head.session.first, head.session.last)
        batch: list[_Step] = []
        rest: list[_Step] = []
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

    def _compute(self, steps: list[_Step]) -> list[Tensor | BaseException | None]:
        """Runs on the compute thread: check every step, run the good ones together."""
        outcomes: list[Tensor | BaseException | None] = [None] * len(steps)
        ready: list[tuple[int, _Step, torch.Tensor]] = []
        for i, s in enumerate(steps):
            try:
                if s.session.closed:
                    raise SessionStateError(f"session {s.session.id} is closed")
                x = self.decode_input(s.msg, s.session.first)
                try:
                    s.session.cache.check_step(s.position, x.shape[1])
                except CacheFullError as e:
                    raise OutOfRange(str(e)) from None
                except CacheError as e:
                    raise InvalidRequest(str(e)) from None
                ready.append((i, s, x))
            except RequestError as e:
                outcomes[i] = e
        if not ready:
            return outcomes
        started = time.perf_counter()
        first, last = ready[0][1].session.first, ready[0][1].session.last
        logits = self.emits_logits(last)
        if len(ready) == 1:
            _, s, x = ready[0]
            outs = [self.span(x, s.session.cache, s.position, last_only=s.last_only, layers=(first, last))]
        else:
            x = torch.cat([x for _, _, x in ready])
            out = self.span.decode(
                x, [s.session.cache for _, s, _ in ready], [s.position for _, s, _ in ready], (first, last)
            )
            outs = list(out.split(1))
            self.batched_steps += len(ready)
        for (i, _, _), out in zip(ready, outs, strict=True):
            outcomes[i] = to_message(out.float() if logits else out)
        log.debug(
            "%d step(s) of %s tokens in %.2f ms",
            len(ready),
            "/".join(str(x.shape[1]) for _, _, x in ready),
            1000 * (time.perf_counter() - started),
        )
        return outcomes
