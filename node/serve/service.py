"""The gRPC shard service: Forward, InferenceSession and Info over one loaded span.

Requests arrive as raw bytes and are parsed here, so a garbage payload gets a clear
INVALID_ARGUMENT instead of gRPC's generic deserialisation error. Every refusal is a
status with a message; the server keeps serving whatever a client sends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError, Message

from node.errors import (
    Draining,
    IdleTimeout,
    InvalidRequest,
    OutOfRange,
    Overloaded,
    RequestError,
    SessionStateError,
    WrongModel,
)
from node.serve.engine import Session, SpanRunner
from protocol import PROTOCOL_VERSION, grpc_options, software_version
from protocol.shard_pb2 import (
    Capacity,
    DType,
    ForwardRequest,
    ForwardResponse,
    InfoResponse,
    SessionClosed,
    SessionOpened,
    SessionRequest,
    SessionResponse,
    StepResult,
)

__all__ = ["ShardService", "serve", "start_server"]

log = logging.getLogger(__name__)
SERVICE = "moemesh.v1.Shard"
M = TypeVar("M", bound=Message)
_WIRE_DTYPES = {torch.float32: DType.FLOAT32, torch.bfloat16: DType.BFLOAT16, torch.float16: DType.FLOAT16}


def _parse(kind: type[M], raw: bytes) -> M:
    try:
        return kind.FromString(raw)
    except DecodeError:
        raise InvalidRequest(f"request is not a valid {kind.__name__} message") from None


# The one place where our domain errors become gRPC statuses.
STATUS_OF: dict[type[RequestError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    WrongModel: grpc.StatusCode.NOT_FOUND,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SessionStateError: grpc.StatusCode.FAILED_PRECONDITION,
    Draining: grpc.StatusCode.UNAVAILABLE,
    IdleTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(error: RequestError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, error: RequestError) -> NoReturn:
    await context.abort(status_of(error), str(error))
    raise AssertionError("unreachable: context.abort raises")


class ShardService:
    """Handlers of the Shard service; state lives in the runner."""

    def __init__(self, runner: SpanRunner) -> None:
        self.runner = runner

    async def forward(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            req = _parse(ForwardRequest, raw)
            if not req.HasField("input"):
                raise InvalidRequest("ForwardRequest has no input tensor")
            out = await self.runner.forward(req.model_id, req.start, req.end, req.input, req.last_only)
        except RequestError as e:
            await _abort(context, e)
        return ForwardResponse(output=out).SerializeToString()

    async def info(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        r = self.runner
        cfg = r.span.cfg
        return InfoResponse(
            model_id=r.model_id,
            model_name=r.model_name,
            start=r.span.start,
            end=r.span.end,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            dtype=_WIRE_DTYPES[r.span.dtype],
            version=software_version(),
            protocol_version=PROTOCOL_VERSION,
            capacity=Capacity(
                max_sessions=r.config.max_sessions,
                active_sessions=len(r.sessions),
                max_length=r.max_length,
                max_message_bytes=r.config.max_message_bytes,
                draining=r.draining,
                kv_budget_bytes=r.config.kv_budget_bytes,
                kv_free_bytes=max(r.kv_free_bytes, 0),
                queued_steps=r.queued,
                batched_steps=r.batched_steps,
            ),
        ).SerializeToString()

    async def _next_request(self, requests: AsyncIterator[bytes], moving: asyncio.Future[Any]) -> bytes | None:
        """The stream's next request; None at its end. Raises IdleTimeout or Draining when the session sat
        idle too long or `moving` is done (the server is shutting down: the session must move)."""
        runner = self.runner
        read = asyncio.ensure_future(anext(requests, None))
        try:
            done, _ = await asyncio.wait(
                {read, moving}, timeout=runner.config.idle_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not read.done():
                read.cancel()
        if read in done:
            return read.result()
        if moving in done:
            raise Draining("server is shutting down: move this session to another peer")
        raise IdleTimeout(f"no request for {runner.config.idle_timeout_s:g} s: session closed")

    async def session(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        session: Session | None = None
        moving = asyncio.ensure_future(self.runner.moving.wait())  # one waiter for the stream's life
        try:
            while True:
                try:
                    raw = await self._next_request(requests, moving)
                    if raw is None:
                        return
                    req = _parse(SessionRequest, raw)
                    kind = req.WhichOneof("kind")
                    if kind == "open":
                        if session is not None:
                            raise SessionStateError("a session is already open on this stream")
                        o = req.open
                        session = await self.runner.open(o.model_id, o.start, o.end, o.max_length)
                        opened = SessionOpened(session_id=session.id, max_length=session.cache.max_length)
                        yield SessionResponse(opened=opened).SerializeToString()
                    elif kind == "step":
                        if session is None:
                            raise SessionStateError("unknown session: send open before steps")
                        if session.closed:
                            raise SessionStateError(f"session {session.id} is closed")
                        s = req.step
                        if not s.HasField("input"):
                            raise InvalidRequest("step has no input tensor")
                        out = await self.runner.step(session, s.position, s.input, s.last_only)
                        result = StepResult(step_id=s.step_id, output=out, length=session.cache.length)
                        yield SessionResponse(result=result).SerializeToString()
                    elif kind == "close":
                        if session is None or session.closed:
                            raise SessionStateError("no open session to close")
                        self.runner.close(session)
                        yield SessionResponse(closed=SessionClosed()).SerializeToString()
                    else:
                        raise InvalidRequest("empty SessionRequest (no open, step or close)")
                except RequestError as e:
                    await _abort(context, e)
        finally:  # also when the client went away (the handler is cancelled): free the cache
            moving.cancel()
            if session is not None:
                self.runner.close(session)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Forward": grpc.unary_unary_rpc_method_handler(self.forward),
                "Info": grpc.unary_unary_rpc_method_handler(self.info),
                "InferenceSession": grpc.stream_stream_rpc_method_handler(self.session),
            },
        )


async def start_server(runner: SpanRunner) -> tuple[grpc.aio.Server, int]:
    """Bind and start the gRPC server; returns it with the bound port."""
    config = runner.config
    server = grpc.aio.server(options=grpc_options(config.max_message_bytes))
    server.add_generic_rpc_handlers([ShardService(runner).handler()])
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    await server.start()
    return server, port


async def serve(runner: SpanRunner, on_ready: Callable[[int], Awaitable[None] | None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain: refuse new sessions, let open ones finish
    within the grace period, tell the rest to move, and exit."""
    server, port = await start_server(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # the first stops gracefully; a second one cuts the grace period short
        if stop.is_set():
            runner.moving.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        if on_ready is not None:
            maybe: Any = on_ready(port)
            if maybe is not None:
                await maybe
        await stop.wait()
        await runner.drain()
    finally:
        await server.stop(grace=1.0)
        runner.shutdown()
