"""The bridge from the HTTP event loop to the SDK's blocking generator.

Each generation runs the SDK's `Client.generate` in a worker thread of a pool the relay owns
(one thread per active request, so many requests run at once and the servers batch their
decode steps). Tokens cross to the event loop through `call_soon_threadsafe`. Stopping is
cooperative: the loop sets a flag, the worker sees it after the token it is waiting for and
closes the generator, which closes the session on every hop and frees its KV cache. So a
client that disconnects, or a stop string that matches, ends the session within one token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc

from node.api.decode import Detokenizer, StopMatcher
from node.api.metrics import ApiMetrics
from node.client import Client, Sampling
from node.errors import ApiError, ConfigError, MoemeshError, PeerError, PeerRefused, RouteError, TokenizerError

if TYPE_CHECKING:
    from node.client.text import TextCodec

__all__ = ["ApiConfig", "Generation", "Job", "Relay", "api_error", "sampling_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiConfig:
    default_max_tokens: int = 256  # when a request gives no max_tokens
    max_streams: int = 64  # generations running at once; more wait for a worker
    route_ttl_s: float = 5.0  # a planned route is reused this long (planning asks every peer)
    swarm_refresh_s: float = 3.0  # the dashboard's swarm view is read at most this often


@dataclass(frozen=True)
class Job:
    """One generation: prompt ids in, at most `max_tokens` out."""

    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: Sampling
    stops: tuple[str, ...] = ()


def sampling_of(temperature: float, top_p: float, seed: int | None) -> Sampling:
    """OpenAI's sampling: a request without a seed gets a fresh one (the SDK's default seed is
    fixed, which would make every unseeded request answer the same)."""
    if seed is None and temperature > 0:
        seed = secrets.randbits(31)
    return Sampling(temperature=temperature, top_p=top_p, seed=seed)


def api_error(error: MoemeshError) -> ApiError:
    """The HTTP face of an SDK failure."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RouteError):
        return ApiError(f"the swarm cannot serve the model now: {error}", status=503, type="server_error",
                        code="no_route")  # fmt: skip
    if isinstance(error, PeerRefused) and error.code in (
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.INVALID_ARGUMENT,
    ):
        return ApiError(f"the swarm refused the request: {error.details}", param="max_tokens",
                        code="context_length_exceeded")  # fmt: skip
    if isinstance(error, PeerError):
        return ApiError(f"a peer of the swarm failed: {error}", status=502, type="server_error", code="peer_failed")
    if isinstance(error, ConfigError):
        return ApiError(str(error))
    return ApiError(str(error), status=500, type="server_error")


_END = ("end", None)


class Generation:
    """A running generation, read as an async iterator of text pieces.

    After the iteration: `finish_reason` ("stop": end of sequence or a stop string,
    "length": max_tokens reached) and `completion_tokens`.
    """

    def __init__(self, relay: Relay, job: Job, started: float) -> None:
        self.job = job
        self.tokens: list[int] = []
        self.finish_reason = "length"
        self._relay = relay
        self._started = started
        self._cancel = threading.Event()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[None] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def cancel(self) -> None:
        """Ask the worker to stop after the token it is waiting for (and close the session)."""
        self._cancel.set()

    def _post(self, item: tuple[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is going away and nobody listens
            self._cancel.set()

    def _work(self) -> None:
        """The worker thread: pull tokens from the SDK until done or told to stop."""
        if self._cancel.is_set():  # cancelled while it waited for a worker
            self._post(_END)
            return
        job = self.job
        tokens: Generator[int, None, None] | None = None
        try:
            # `generate` is a generator function: closing it ends its session on every hop.
            tokens = cast(
                Generator[int, None, None],
                self._relay.client.generate(
                    list(job.prompt_ids), job.max_tokens, sampling=job.sampling, route=self._relay.route()
                ),
            )
            for token in tokens:
                self._post(("token", token))
                if self._cancel.is_set():
                    break
        except MoemeshError as e:
            self._post(("error", e))
        except Exception as e:  # a bug of ours or the SDK's: this request fails, the server lives on
            log.exception("generation failed")
            self._post(("error", ApiError(f"internal error: {e!r}", status=500, type="server_error")))
        finally:
            if tokens is not None:
                tokens.close()
            self._post(_END)

    async def __aiter__(self) -> AsyncIterator[str]:
        relay, metrics = self._relay, self._relay.metrics
        detokenizer = Detokenizer(relay.text)
        stops = StopMatcher(self.job.stops)
        eos = set(relay.text.eos_token_ids)
        self._future = self._loop.run_in_executor(relay.pool, self._work)
        metrics.active_streams.inc()
        metrics.prompt_tokens.inc(len(self.job.prompt_ids))
        first_at = 0.0
        try:
            while True:
                kind, value = await self._queue.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    self.finish_reason = "stop" if self.tokens and self.tokens[-1] in eos else "length"
                    if tail := stops.feed(detokenizer.flush()) + stops.flush():
                        yield tail
                    return
                if not self.tokens:
                    first_at = time.monotonic()
                    metrics.time_to_first_token.observe(first_at - self._started)
                self.tokens.append(value)
                metrics.generated_tokens.inc()
                if piece := stops.feed(detokenizer.add(value)):
                    yield piece
                if stops.stopped:
                    self.finish_reason = "stop"
                    return
        finally:
            self.cancel()
            metrics.active_streams.dec()
            if len(self.tokens) > 1 and (spent := time.monotonic() - first_at) > 0:
                metrics.tokens_per_second.observe((len(self.tokens) - 1) / spent)

    async def text(self) -> str:
        return "".join([piece async for piece in self])


class Relay:
    """Owns the SDK client, the worker pool and the cached route; shared by every request."""

    def __init__(self, client: Client, config: ApiConfig) -> None:
        self.client = client
        self.config = config
        self.metrics = ApiMetrics(lambda: len(client.recoveries))
        self.pool = concurrent.futures.ThreadPoolExecutor(config.max_streams, thread_name_prefix="moemesh-api")
        self._route_lock = threading.Lock()
        self._route: tuple[float, Any] | None = None  # (monotonic time planned, route)
        self._names: dict[str, str] = {}  # model id -> its name, as the first hop's Info says

    @property
    def text(self) -> TextCodec:
        """The SDK's tokenizer (blocking the first time, when it comes from the swarm: call it
        from a thread until it is known)."""
        try:
            return self.client.text
        except (ConfigError, TokenizerError) as e:
            raise ApiError(
                f"this API server has no tokenizer ({e}): start it with --model FOLDER", status=500, type="server_error"
            ) from None

    def route(self) -> Any:
        """The route the SDK planned, reused for `route_ttl_s` (a failed hop is replaced by the
        session itself, so a slightly old route costs at most a recovery)."""
        with self._route_lock:
            now = time.monotonic()
            if self._route is None or now - self._route[0] > self.config.route_ttl_s:
                self._route = (now, self.client.route())
            return self._route[1]

    def model(self) -> tuple[str, str]:
        """(id, name) of the model the swarm serves (blocking: call it from a thread)."""
        model_id, hops = self.route()
        if model_id not in self._names:
            self._names[model_id] = self.client.info(hops[0].address).model_name
        return model_id, self._names[model_id]

    def start(self, job: Job) -> Generation:
        return Generation(self, job, time.monotonic())

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
