"""The engine: one loaded span, its sessions and their KV caches, compute on one thread.

A request is checked here (model id, layers, lengths, memory budget) and refused with a
domain error (`node.errors.RequestError`; only the gRPC edge picks the status). Compute runs
on one dedicated executor thread, so the asyncio loop (heartbeats, other streams, lease
renewals) never waits on a long prefill, nor on loading the span: `await Engine.load(...)`
reads the checkpoint on that thread while the loop goes on.

Session steps go through the scheduler (`node.serve.scheduler`, continuous batching); the
engine executes each batch it schedules (`Engine.execute`, on the compute thread) and owns
the scheduler's task: `start()` starts it on the running loop, `aclose()` stops it.

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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from kernels import CacheError, CacheFullError, KVCache, ShapeError, SpanModel
from node.errors import (
    Draining,
    InvalidRequest,
    OutOfRange,
    Overloaded,
    RequestError,
    SessionStateError,
    Stopped,
    WrongModel,
)
from node.progress import Ticks, ticks
from node.serve.codec import from_message, to_message
from node.serve.config import ServerConfig
from node.serve.device import check_fits, resolve_device
from node.serve.scheduler import Batch, BatchResult, QueuedStep, Scheduler
from protocol import InvalidTensorError
from protocol.shard_pb2 import Tensor
from shards import DTYPES, Checkpoint

__all__ = ["Engine", "Session"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Progress = Callable[[str], None]


@dataclass
class Session:
    id: str
    first: int  # local layers [first, last) of the span
    last: int
    cache: KVCache
    closed: bool = False
    decoding: bool = False  # its last step was one token: the next one is due soon
    last_done: float = 0.0  # when its last step finished (monotonic)
    client: str = ""  # who opened it (the gRPC peer): its share of sessions and its turn in the scheduler
    compact_logits: bool = False  # its logits leave in the compute dtype (fp32 would be their exact widening)


@dataclass(frozen=True)
class _Sliced:
    """A Forward run layer by layer: its input to `next_layer` (token ids before the first)."""

    hidden: torch.Tensor
    next_layer: int


def _compute_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="moemesh-compute")


def _load_span(config: ServerConfig, progress: Progress | None, tick: Ticks) -> tuple[SpanModel, str, str]:
    """Runs on the compute thread: read only the span's tensors from the checkpoint."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    checkpoint = Checkpoint(config.model)
    device = resolve_device(config.device)
    check_fits(config, checkpoint, device)  # before reading: a span that cannot fit is refused
    if progress:
        layers = checkpoint.config.num_layers
        progress(f"loading layers {config.start}:{config.end} of {checkpoint.name} ({layers} layers) on {device}")
    dtype = DTYPES[config.dtype] if config.dtype else None
    span = checkpoint.load_span(
        config.start, config.end, dtype, quantize=config.quantize, progress=tick, pack=device == "cpu"
    )
    if device != "cpu":  # weights, rotary tables and the KV caches it makes live there; the wire stays CPU
        span = span.to(device)
    return span, checkpoint.model_id(), checkpoint.name


class Engine:
    """Owns the span, the sessions, the KV budget, the compute thread and the scheduler.

    Make one with `await Engine.load(config)`: the loop keeps running while the span loads, and
    the engine comes back with its scheduler started on that loop; `await aclose()` ends it.
    """

    def __init__(
        self, config: ServerConfig, executor: ThreadPoolExecutor, span: SpanModel, model_id: str, name: str
    ) -> None:
        self.config = config
        self.span, self.model_id, self.model_name = span, model_id, name
        self._executor = executor  # the compute thread
        self.max_length = min(config.max_length, span.cfg.max_position_embeddings)
        self.sessions: dict[str, Session] = {}
        self._kv_bytes = 0
        self._ids = itertools.count()
        self.draining = False  # refuse new sessions (shutting down)
        self.moving = asyncio.Event()  # open sessions must move to another peer now
        self.scheduler = Scheduler(config, self.sessions, self._execute_on_compute_thread)
        self._scheduler_task: asyncio.Task[None] | None = None

    @classmethod
    async def load(cls, config: ServerConfig, progress: Progress | None = None) -> Engine:
        """Load the span on the compute thread without blocking the running loop; the scheduler
        is started. `progress` is called (on the compute thread) with what is being loaded; a
        terminal gets a bar (node.progress). Cancelled, the load stops at its next tensor."""
        executor = _compute_thread()
        cancelled = threading.Event()  # the load was cancelled: it ends at its next tensor

        def tick(done: int, total: int) -> None:
            if cancelled.is_set():
                raise Stopped("loading was cancelled")
            bar(done, total)

        try:
            with ticks("loading", unit="tensors") as bar:
                loop = asyncio.get_running_loop()
                loaded = await loop.run_in_executor(executor, _load_span, config, progress, tick)
        except BaseException:
            cancelled.set()
            executor.shutdown(wait=False)
            raise
        engine = cls(config, executor, *loaded)
        engine.start()
        return engine

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler's task on the running loop (idempotent). The engine owns the
        task: `aclose()` (or `shutdown()`) stops it."""
        if self._scheduler_task is None:
            loop = asyncio.get_running_loop()
            self._scheduler_task = loop.create_task(self.scheduler.run(), name="moemesh-scheduler")

    async def aclose(self) -> None:
        """Stop the scheduler (waiting for it), fail the steps still queued, stop the compute thread."""
        task, self._scheduler_task = self._scheduler_task, None
        try:
            if task is not None:
                task.cancel()
                await asyncio.wait([task])  # its end, without swallowing a cancellation of our own
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop now, without waiting for the scheduler's task (for sync callers; prefer `aclose`)."""
        if self._scheduler_task is not None:
            self._scheduler_task.cancel()
            self._scheduler_task = None
        self.scheduler.fail_queued(Draining("server is shutting down: move this session to another peer"))
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def drain(self, grace_s: float | None = None) -> None:
        """Shut down gracefully: refuse new sessions, let open ones finish for `grace_s`, then
        tell the rest to move (their streams end with Draining, UNAVAILABLE on the wire, and
        the client replays them elsewhere), so no client loses work. Setting `moving` while
        this waits cuts the grace short. `node.serve.lifecycle.Lifecycle.drain` calls this."""
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

    # -- the compute thread -----------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` on the compute thread and wait (for callers outside the event loop)."""
        return self._executor.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` on the compute thread; the loop goes on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- checks -----------------------------------------------------------------------------

    def local_layers(self, model_id: str, start: int, end: int) -> tuple[int, int]:
        """Translate global layers [start, end) into the span's local ones, or reject."""
        if model_id and model_id != self.model_id:
            raise WrongModel(f"this server serves model {self.model_id} ({self.model_name}), not {model_id}")
        s, e = self.span.start, self.span.end
        if not s <= start < end <= e:
            raise OutOfRange(f"layers [{start}, {end}) are outside the served span [{s}, {e})")
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

    async def forward(
        self, model_id: str, start: int, end: int, msg: Tensor, last_only: bool, client: str = ""
    ) -> Tensor:
        """A stateless prefill; it waits for `client`'s turn in the scheduler like a session step."""
        layers = self.local_layers(model_id, start, end)
        if self._scheduler_task is None:
            raise RuntimeError("the engine is not started: call Engine.start() in the serving loop")
        return await self.scheduler.submit_forward(client, layers, msg, last_only)

    def _forward(self, step: QueuedStep) -> Tensor | None:
        """Runs on the compute thread: a Forward, with throwaway caches. A long one runs one layer
        per call (None: more to run; its hidden states wait in `step.progress`), so that other
        clients' steps run between its layers; the result is the same bit for bit, as through
        a pipeline of one-layer hops."""
        first, last = step.layers
        if step.progress is None:
            x = self.decode_input(step.msg, first)
            if x.shape[1] > self.max_length:
                raise OutOfRange(f"{x.shape[1]} tokens exceed max length {self.max_length}")
            if x.shape[1] < self.config.slice_tokens:
                cache = self.span.new_cache(x.shape[1], layers=(first, last))
                out = self.span(x, cache, 0, last_only=step.last_only, layers=(first, last))
                return to_message(out.float() if self.emits_logits(last) else out)
            step.progress = _Sliced(x, first)
        sliced: _Sliced = step.progress
        layer = sliced.next_layer
        cache = self.span.new_cache(sliced.hidden.shape[1], layers=(layer, layer + 1))
        out = self.span(
            sliced.hidden, cache, 0, last_only=step.last_only and layer + 1 == last, layers=(layer, layer + 1)
        )
        if layer + 1 < last:
            step.progress = _Sliced(out, layer + 1)
            return None
        step.progress = None
        return to_message(out.float() if self.emits_logits(last) else out)

    # -- sessions ---------------------------------------------------------------------------

    async def open(self, model_id: str, start: int, end: int, max_length: int, client: str = "") -> Session:
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
        held = sum(1 for s in self.sessions.values() if s.client == client)
        if held >= self.config.sessions_per_client:
            raise Overloaded(f"this client holds {held} sessions, its share of this server: close one first")
        need = self.span.cache_bytes(length, (first, last))  # right for MLA latents and sliding windows too
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
        session = Session(f"{next(self._ids)}-{secrets.token_hex(6)}", first, last, cache, client=client)
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
        return self.scheduler.queued

    @property
    def batched_steps(self) -> int:
        return self.scheduler.batched_steps

    async def step(self, session: Session, position: int, msg: Tensor, last_only: bool) -> Tensor:
        """Queue one step of `session` for the scheduler and wait for its output."""
        if self._scheduler_task is None:
            raise RuntimeError("the engine is not started: call Engine.start() in the serving loop")
        return await self.scheduler.submit(session, position, msg, last_only)

    # -- executing a batch ------------------------------------------------------------------

    async def _execute_on_compute_thread(self, batch: Batch) -> BatchResult:
        return await self.run(self.execute, batch)

    def execute(self, batch: Batch) -> BatchResult:
        """Runs on the compute thread: check every step, run the good ones together (a Forward alone)."""
        if len(batch.steps) == 1 and batch.steps[0].session is None:
            try:
                return BatchResult((self._forward(batch.steps[0]),))
            except RequestError as e:
                return BatchResult((e,))
        outputs: dict[int, Tensor | RequestError | None] = {}  # by index in the batch
        ready: list[tuple[int, Session, torch.Tensor]] = []  # (index in the batch, session, input)
        for i, s in enumerate(batch.steps):
            try:
                if s.session is None:
                    raise InvalidRequest("a Forward cannot run batched")  # the scheduler never does this
                if s.session.closed:
                    raise SessionStateError(f"session {s.session.id} is closed")
                x = self.decode_input(s.msg, s.session.first)
                try:
                    s.session.cache.check_step(s.position, x.shape[1])
                except CacheFullError as e:
                    raise OutOfRange(str(e)) from None
                except CacheError as e:
                    raise InvalidRequest(str(e)) from None
                ready.append((i, s.session, x))
            except RequestError as e:
                outputs[i] = e
        batched = 0
        if ready:
            started = time.perf_counter()
            first, last = batch.layers
            if len(ready) == 1:
                i, session, x = ready[0]
                step = batch.steps[i]
                outs = [self.span(x, session.cache, step.position, last_only=step.last_only, layers=(first, last))]
            else:
                x = torch.cat([x for _, _, x in ready])  # [B, 1] ids or [B, 1, H] hidden states
                positions = [batch.steps[i].position for i, _, _ in ready]
                out = self.span.decode(x, [session.cache for _, session, _ in ready], positions, (first, last))
                outs = list(out.split(1))
                batched = len(ready)
            logits = self.emits_logits(last)
            for (i, session, _), out in zip(ready, outs, strict=True):
                outputs[i] = to_message(out.float() if logits and not session.compact_logits else out)
            log.debug(
                "%d step(s) of %s tokens in %.2f ms",
                len(ready),
                "/".join(str(x.shape[1]) for _, _, x in ready),
                1000 * (time.perf_counter() - started),
            )
        return BatchResult(tuple(outputs[i] for i in range(len(batch.steps))), batched=batched)
