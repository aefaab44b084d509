"""The gRPC edge: Forward, InferenceSession and Info over one engine.

Requests arrive as raw bytes and are parsed here, so a garbage payload gets a clear
INVALID_ARGUMENT instead of gRPC's generic deserialisation error. The engine refuses with
domain errors (`node.errors.RequestError`); `STATUS_OF` here is the one place they become
gRPC statuses. Every refusal is a status with a message; the server keeps serving whatever
a client sends. Anything else a handler raises (a bug) is logged here and answered with
INTERNAL and a short message: never a traceback or our internals. Signals, drain and grace
are `node.serve.lifecycle`'s.

A client is its connection (`context.peer()`). Before a request's bytes are parsed (copied
into a message, then into a tensor) they count against what that client has in flight
(`InFlight`); past its share it gets RESOURCE_EXHAUSTED. gRPC's max receive message size
stays the bound of one message. The engine bounds its sessions, the scheduler its queued steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError, Message

from node.errors import (
    ConfigError,
    Draining,
    IdleTimeout,
    InvalidRequest,
    OutOfRange,
    Overloaded,
    RequestError,
    SessionStateError,
    WrongModel,
)
from node.serve.device import block_bytes, device_name
from node.serve.engine import Engine, Session
from node.tls import Certificate
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

__all__ = ["STATUS_OF", "InFlight", "ShardService", "start_server", "status_of"]

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


class InFlight:
    """Request bytes each client has being served now; Overloaded past its share.

    A client with nothing in flight may always send one message (up to gRPC's limit), so a
    share below the message limit slows a client down but never locks it out."""

    def __init__(self, share: int) -> None:
        self.share = share
        self._bytes: dict[str, int] = {}  # only clients with something in flight

    def of(self, client: str) -> int:
        return self._bytes.get(client, 0)

    @contextlib.contextmanager
    def hold(self, client: str, size: int) -> Iterator[None]:
        held = self._bytes.get(client, 0)
        if held and held + size > self.share:
            raise Overloaded(
                f"this client has {held} request bytes in flight; {size} more exceed its share {self.share}"
            )
        self._bytes[client] = held + size
        try:
            yield
        finally:
            left = self._bytes[client] - size
            if left:
                self._bytes[client] = left
            else:
                del self._bytes[client]


def status_of(error: RequestError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, error: RequestError) -> NoReturn:
    await context.abort(status_of(error), str(error))
    raise AssertionError("unreachable: context.abort raises")


async def _internal(context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    """A handler failed unexpectedly (a bug): log it whole here, tell the client only that."""
    log.exception("%s failed for %s", method, context.peer())
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (logged by the server)")
    raise AssertionError("unreachable: context.abort raises")


@dataclass
class _Stream:
    """One InferenceSession stream: who it belongs to and the session it opened."""

    client: str
    session: Session | None = None


class ShardService:
    """Handlers of the Shard service; state lives in the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inflight = InFlight(engine.config.inflight_bytes_per_client)

    async def forward(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        client = context.peer()
        try:
            with self.inflight.hold(client, len(raw)):  # before the bytes are copied anywhere
                req = _parse(ForwardRequest, raw)
                if not req.HasField("input"):
                    raise InvalidRequest("ForwardRequest has no input tensor")
                out = await self.engine.forward(req.model_id, req.start, req.end, req.input, req.last_only, client)
        except RequestError as e:
            await _abort(context, e)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _internal(context, "Forward")
        return ForwardResponse(output=out).SerializeToString()

    async def info(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return self._info()
        except Exception:
            await _internal(context, "Info")

    def _info(self) -> bytes:
        engine = self.engine
        cfg = engine.span.cfg
        return InfoResponse(
            model_id=engine.model_id,
            model_name=engine.model_name,
            start=engine.span.start,
            end=engine.span.end,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            dtype=_WIRE_DTYPES[engine.span.dtype],
            version=software_version(),
            protocol_version=PROTOCOL_VERSION,
            quantization=engine.span.quantization,
            device=device_name(engine.span),
            block_bytes=block_bytes(engine.span),
            capacity=Capacity(
                max_sessions=engine.config.max_sessions,
                active_sessions=len(engine.sessions),
                max_length=engine.max_length,
                max_message_bytes=engine.config.max_message_bytes,
                draining=engine.draining,
                kv_budget_bytes=engine.config.kv_budget_bytes,
                kv_free_bytes=max(engine.kv_free_bytes, 0),
                queued_steps=engine.queued,
                batched_steps=engine.batched_steps,
            ),
        ).SerializeToString()

    async def _next_request(self, requests: AsyncIterator[bytes], moving: asyncio.Future[Any]) -> bytes | None:
        """The stream's next request; None at its end. Raises IdleTimeout or Draining when the session sat
        idle too long or `moving` is done (the server is shutting down: the session must move)."""
        engine = self.engine
        read = asyncio.ensure_future(anext(requests, None))
        try:
            done, _ = await asyncio.wait(
                {read, moving}, timeout=engine.config.idle_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not read.done():
                read.cancel()
        if read in done:
            return read.result()
        if moving in done:
            raise Draining("server is shutting down: move this session to another peer")
        raise IdleTimeout(f"no request for {engine.config.idle_timeout_s:g} s: session closed")

    async def session(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        client = context.peer()
        stream = _Stream(client)
        moving = asyncio.ensure_future(self.engine.moving.wait())  # one waiter for the stream's life
        try:
            while True:
                try:
                    raw = await self._next_request(requests, moving)
                    if raw is None:
                        return
                    with self.inflight.hold(client, len(raw)):  # before the bytes are copied anywhere
                        response = await self._answer(stream, _parse(SessionRequest, raw))
                    yield response  # not holding the bytes while a slow reader takes the answer
                except RequestError as e:
                    await _abort(context, e)
                except grpc.aio.AbortError:
                    raise
                except Exception:
                    await _internal(context, "InferenceSession")
        finally:  # also when the client went away (the handler is cancelled): free the cache
            moving.cancel()
            if stream.session is not None:
                self.engine.close(stream.session)

    async def _answer(self, stream: _Stream, req: SessionRequest) -> bytes:
        """One request of a session stream, and the answer to send (RequestError when refused)."""
        session = stream.session
        kind = req.WhichOneof("kind")
        if kind == "open":
            if session is not None:
                raise SessionStateError("a session is already open on this stream")
            o = req.open
            stream.session = session = await self.engine.open(o.model_id, o.start, o.end, o.max_length, stream.client)
            opened = SessionOpened(session_id=session.id, max_length=session.cache.max_length)
            return SessionResponse(opened=opened).SerializeToString()
        if kind == "step":
            if session is None:
                raise SessionStateError("unknown session: send open before steps")
            if session.closed:
                raise SessionStateError(f"session {session.id} is closed")
            s = req.step
            if not s.HasField("input"):
                raise InvalidRequest("step has no input tensor")
            out = await self.engine.step(session, s.position, s.input, s.last_only)
            result = StepResult(step_id=s.step_id, output=out, length=session.cache.length)
            return SessionResponse(result=result).SerializeToString()
        if kind == "close":
            if session is None or session.closed:
                raise SessionStateError("no open session to close")
            self.engine.close(session)
            return SessionResponse(closed=SessionClosed()).SerializeToString()
        raise InvalidRequest("empty SessionRequest (no open, step or close)")

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Forward": grpc.unary_unary_rpc_method_handler(self.forward),
                "Info": grpc.unary_unary_rpc_method_handler(self.info),
                "InferenceSession": grpc.stream_stream_rpc_method_handler(self.session),
            },
        )


async def start_server(engine: Engine, certificate: Certificate | None = None) -> tuple[grpc.aio.Server, int]:
    """Bind and start the gRPC server over `engine` (its scheduler started too); returns the
    server with the bound port. The caller stops it: `await server.stop(grace)`.

    It serves TLS with `certificate` (whose fingerprint the caller announces); plaintext only
    when the config says `insecure_lan`, and never both: a plaintext client of a TLS port
    fails its handshake."""
    config = engine.config
    if certificate is None and not config.insecure_lan:
        raise ConfigError("serving gRPC needs a TLS certificate (or insecure_lan for a trusted LAN)")
    engine.start()
    # gRPC sets SO_REUSEPORT by default: a second server on a port in use would start and share it.
    server = grpc.aio.server(options=[*grpc_options(config.max_message_bytes), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([ShardService(engine).handler()])
    where = f"{config.host}:{config.port}"
    try:
        if config.insecure_lan or certificate is None:
            port = server.add_insecure_port(where)
        else:
            port = server.add_secure_port(where, certificate.server_credentials())
    except RuntimeError:  # grpc's way of saying the address is taken
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}: the port is in use (or the host is not ours)")
    await server.start()
    return server, port
