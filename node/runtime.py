"""The span runner: one loaded span, its sessions and their KV caches, compute off the event loop.

A request is checked here (model id, layers, lengths, memory budget) and turned into a
`Rejected` with the gRPC status to answer; compute runs on one dedicated executor thread
so the asyncio loop (heartbeats, other streams) never waits on a long prefill.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from kernels import CacheError, CacheFullError, KVCache, ShapeError, SpanModel
from node.codec import from_message, to_message
from node.errors import Rejected
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


@dataclass
class Session:
    id: str
    first: int  # local layers [first, last) of the span
    last: int
    cache: KVCache
    closed: bool = False


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
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- checks -----------------------------------------------------------------------------

    def local_layers(self, model_id: str, start: int, end: int) -> tuple[int, int]:
        """Translate global layers [start, end) into the span's local ones, or reject."""
        if model_id and model_id != self.model_id:
            raise Rejected(
                grpc.StatusCode.NOT_FOUND,
                f"this server serves model {self.model_id} ({self.model_name}), not {model_id}",
            )
        s, e = self.span.start, self.span.end
        if not s <= start < end <= e:
            raise Rejected(
                grpc.StatusCode.OUT_OF_RANGE,
                f"layers [{start}, {end}) are outside the served span [{s}, {e})",
            )
        return start - s, end - s

    def decode_input(self, msg: Tensor, first: int) -> torch.Tensor:
        try:
            x = from_message(msg)
            self.span.check_input(x, first)
        except (InvalidTensorError, ShapeError) as e:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if x.shape[0] != 1:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"batch size {x.shape[0]} is not supported (use 1)")
        if x.shape[1] > self.config.max_tokens_per_step:
            raise Rejected(
                grpc.StatusCode.INVALID_ARGUMENT,
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
                raise Rejected(grpc.StatusCode.OUT_OF_RANGE, f"{x.shape[1]} tokens exceed max length {self.max_length}")
            cache = self.span.new_cache(x.shape[1], layers=(first, last))
            out = self.span(x, cache, 0, last_only=last_only, layers=(first, last))
            return to_message(out.float() if self.emits_logits(last) else out)

        return await self.run(compute)

    # -- sessions ---------------------------------------------------------------------------

    async def open(self, model_id: str, start: int, end: int, max_length: int) -> Session:
        first, last = self.local_layers(model_id, start, end)
        length = max_length or min(self.config.default_length, self.max_length)
        if length > self.max_length:
            raise Rejected(
                grpc.StatusCode.OUT_OF_RANGE, f"max_length {length} exceeds this server's limit {self.max_length}"
            )
        if len(self.sessions) >= self.config.max_sessions:
            raise Rejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is full: {len(self.sessions)} sessions open (limit {self.config.max_sessions})",
            )
        cfg = self.span.cfg
        need = KVCache.bytes_for(last - first, cfg.num_kv_heads, cfg.head_dim, length, self.span.dtype)
        if self._kv_bytes + need > self.config.kv_budget_bytes:
            raise Rejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
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

    async def step(self, session: Session, position: int, msg: Tensor, last_only: bool) -> Tensor:
        layers = (session.first, session.last)
        logits = self.emits_logits(session.last)

        def compute() -> Tensor:
            x = self.decode_input(msg, session.first)
            try:
                session.cache.check_step(position, x.shape[1])
            except CacheFullError as e:
                raise Rejected(grpc.StatusCode.OUT_OF_RANGE, str(e)) from None
            except CacheError as e:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            started = time.perf_counter()
            out = self.span(x, session.cache, position, last_only=last_only, layers=layers)
            message = to_message(out.float() if logits else out)
            log.debug(
                "session %s: %d tokens at %d in %.2f ms",
                session.id,
                x.shape[1],
                position,
                1000 * (time.perf_counter() - started),
            )
            return message

        return await self.run(compute)
