"""The gRPC edge: Forward, InferenceSession, Info and Tokenizer over one engine.

Requests arrive as raw bytes and are parsed here, so a garbage payload gets a clear
INVALID_ARGUMENT instead of gRPC's generic deserialisation error. The engine refuses with
domain errors (`node.errors.RequestError`); `node.serve.refusals.STATUS_OF` is the one
place they become gRPC statuses. Every refusal is a status with a message; the server keeps serving whatever
a client sends. Anything else a handler raises (a bug) is logged here and answered with
INTERNAL and a short message: never a traceback or our internals. Signals, drain and grace
are `node.serve.lifecycle`'s.

A client is its connection (`context.peer()`). Before a request's bytes are parsed (copied
into a message, then into a tensor) they count against what that client has in flight
(`node.serve.refusals.InFlight`); past its share it gets RESOURCE_EXHAUSTED. gRPC's max receive message size
stays the bound of one message. The engine bounds its sessions, the scheduler its queued steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from node.client.sampling import sampled_token, sampling_of
from node.errors import (
    ConfigError,
    Draining,
    IdleTimeout,
    InvalidRequest,
    RequestError,
    SessionStateError,
    TokenizerError,
    WrongModel,
)
from node.serve.device import block_bytes, device_name
from node.serve.engine import Engine, Session
from node.serve.push import Dial, Pusher
from node.serve.refusals import InFlight, abort, internal, parse
from node.textfiles import pack
from node.tls import Certificate
from protocol import PROTOCOL_VERSION, grpc_options, software_version
from protocol.shard_pb2 import (
    Capacity,
    DType,
    ForwardRequest,
    ForwardResponse,
    InfoResponse,
    PushedStep,
    PushSummary,
    Sample,
    SessionClosed,
    SessionOpened,
    SessionRequest,
    SessionResponse,
    Step,
    StepResult,
    Tensor,
    TokenizerRequest,
    TokenizerResponse,
)

__all__ = ["ShardService", "start_server"]

log = logging.getLogger(__name__)
SERVICE = "moemesh.v1.Shard"
_WIRE_DTYPES = {torch.float32: DType.FLOAT32, torch.bfloat16: DType.BFLOAT16, torch.float16: DType.FLOAT16}


@dataclass
class _Stream:
    """One InferenceSession stream: who it belongs to and the session it opened; with push, the
    steps other servers pushed to that session wait in `pushed` for this stream's turn."""

    client: str
    session: Session | None = None
    token: bytes = b""  # the session's push token: set when it takes pushed steps
    pushed: asyncio.Queue[PushedStep | StepResult] = field(default_factory=lambda: asyncio.Queue(_PUSH_BACKLOG))
    read: asyncio.Future[bytes | None] | None = None  # the client's next request, being read
    active: float = field(default_factory=time.monotonic)  # the last request, the client's or a pushed one
    last_step: int = -1  # the step_id of the last step run: a pushed step must come after it


_PUSH_BACKLOG = 64  # pushed steps one session may have waiting; more are dropped (the client times out)


class ShardService:
    """Handlers of the Shard service; state lives in the engine."""

    def __init__(self, engine: Engine, dial: Dial | None = None) -> None:
        self.engine = engine
        self.inflight = InFlight(engine.config.inflight_bytes_per_client)
        self._tokenizer: bytes | None = None  # the Tokenizer answer, read from the model folder once
        config = engine.config
        self.pusher = Pusher(config.max_message_bytes, config.insecure_lan, swarm_key=config.swarm_key, dial=dial)
        self._pushable: dict[str, _Stream] = {}  # session id -> its stream, for sessions opened with push
        self.pushed_steps = 0  # statistics: steps run that another server pushed here

    async def forward(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        client = context.peer()
        try:
            with self.inflight.hold(client, len(raw)):  # before the bytes are copied anywhere
                req = parse(ForwardRequest, raw)
                if not req.HasField("input"):
                    raise InvalidRequest("ForwardRequest has no input tensor")
                out = await self.engine.forward(req.model_id, req.start, req.end, req.input, req.last_only, client)
        except RequestError as e:
            await abort(context, e)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await internal(context, "Forward")
        return ForwardResponse(output=out).SerializeToString()

    async def info(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return self._info()
        except Exception:
            await internal(context, "Info")

    def _pack_tokenizer(self) -> TokenizerResponse | None:
        from shards.manifest import load_manifest

        folder = self.engine.config.model
        return pack(folder, self.engine.model_id, load_manifest(folder).canonical())  # cached: no hashing

    async def tokenizer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """The model folder's tokenizer files and chat template (node.textfiles), read once."""
        try:
            req = parse(TokenizerRequest, raw)
            if req.model_id != self.engine.model_id:
                raise WrongModel(f"this peer serves model {self.engine.model_id}, not {req.model_id[:40]!r}")
            if self._tokenizer is None:
                response = await asyncio.to_thread(self._pack_tokenizer)
                self._tokenizer = b"" if response is None else response.SerializeToString()
        except RequestError as e:
            await abort(context, e)
        except TokenizerError as e:
            log.warning("not serving the tokenizer: %s", e)
            self._tokenizer = b""
        except Exception:
            await internal(context, "Tokenizer")
        answer = self._tokenizer
        if not answer:
            await context.abort(grpc.StatusCode.NOT_FOUND, "this peer has no tokenizer to give (or one over the bound)")
            raise AssertionError("unreachable: context.abort raises")
        return answer

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
                pushed_steps=self.pushed_steps,
                decode_ms=1000 * engine.scheduler.decode_ewma_s,
            ),
        ).SerializeToString()

    async def _next_request(
        self, requests: AsyncIterator[bytes], moving: asyncio.Future[Any], stream: _Stream
    ) -> bytes | PushedStep | StepResult | None:
        """The stream's next request: the client's raw bytes, a step pushed to its session (or a
        push failure to report), None at the client's end. Raises IdleTimeout or Draining when the
        session sat idle too long or `moving` is done (the server is shutting down: the session
        must move)."""
        idle_s = self.engine.config.idle_timeout_s
        if not stream.pushed.empty():
            return stream.pushed.get_nowait()
        if stream.read is None:
            stream.read = asyncio.ensure_future(anext(requests, None))
        while True:
            pushed = asyncio.ensure_future(stream.pushed.get()) if stream.token else None
            waiting: set[asyncio.Future[Any]] = (
                {stream.read, moving} if pushed is None else {stream.read, moving, pushed}
            )
            try:
                done, _ = await asyncio.wait(waiting, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if pushed is not None and not pushed.done():
                    pushed.cancel()
            if pushed is not None and pushed in done:
                return pushed.result()  # the client's read, if done too, waits for the next call
            if stream.read in done:
                read, stream.read = stream.read, None
                return read.result()
            if moving in done:
                raise Draining("server is shutting down: move this session to another peer")
            if time.monotonic() - stream.active >= idle_s:
                raise IdleTimeout(f"no request for {idle_s:g} s: session closed")

    async def session(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        client = context.peer()
        stream = _Stream(client)
        moving = asyncio.ensure_future(self.engine.moving.wait())  # one waiter for the stream's life
        try:
            while True:
                try:
                    item = await self._next_request(requests, moving, stream)
                    if item is None:
                        return
                    stream.active = time.monotonic()
                    if isinstance(item, PushedStep):
                        if item.step.step_id <= stream.last_step:  # overtaken while it waited: stale
                            continue
                        response = await self._run_step(stream, item.step)
                        self.pushed_steps += 1
                    elif isinstance(item, StepResult):  # a step of ours that could not be pushed on
                        response = SessionResponse(result=item).SerializeToString()
                    else:
                        with self.inflight.hold(client, len(item)):  # before the bytes are copied anywhere
                            response = await self._answer(stream, parse(SessionRequest, item))
                    yield response  # not holding the bytes while a slow reader takes the answer
                except RequestError as e:
                    await abort(context, e)
                except grpc.aio.AbortError:
                    raise
                except Exception:
                    await internal(context, "InferenceSession")
        finally:  # also when the client went away (the handler is cancelled): free the cache
            moving.cancel()
            if stream.read is not None:
                stream.read.cancel()
            if stream.session is not None:
                self._pushable.pop(stream.session.id, None)
                self.engine.close(stream.session)

    async def _run_step(self, stream: _Stream, s: Step) -> bytes:
        """Run step `s` of the stream's session, push its output on along `s.route`, and answer it."""
        session = stream.session
        if session is None:
            raise SessionStateError("unknown session: send open before steps")
        if session.closed:
            raise SessionStateError(f"session {session.id} is closed")
        if not s.HasField("input"):
            raise InvalidRequest("step has no input tensor")
        stream.last_step = max(stream.last_step, s.step_id)
        out = await self.engine.step(session, s.position, s.input, s.last_only)
        if s.route and not session.closed:  # the next hop first: it is on the critical path
            self._push_on(stream, s, out)
        elif s.HasField("sample") and s.last_only and self.engine.emits_logits(session.last):
            out = await self._sampled(out, s.sample)
        result = StepResult(step_id=s.step_id, output=out, length=session.cache.length)
        return SessionResponse(result=result).SerializeToString()

    async def _sampled(self, logits: Tensor, request: Sample) -> Tensor:
        """The token id `request` draws from these logits (`node.client.sampling`: the client's own
        function on the very bytes it would get), else the logits. Off the loop unless greedy: a
        nucleus sorts the whole vocabulary."""
        try:
            sampling = sampling_of(request)
        except ConfigError as e:
            raise InvalidRequest(f"the step's sample: {e}") from None
        if sampling.temperature == 0:
            token = sampled_token(logits, sampling, request.index)
        else:
            token = await asyncio.to_thread(sampled_token, logits, sampling, request.index)
        return logits if token is None else token

    def _push_on(self, stream: _Stream, s: Step, out: Tensor) -> None:
        target, rest = s.route[0], s.route[1:]
        step = Step(step_id=s.step_id, position=s.position, input=out, last_only=s.last_only, route=rest)
        if s.HasField("sample"):  # for the chain's last hop
            step.sample.CopyFrom(s.sample)
        message = PushedStep(session_id=target.session_id, token=target.token, step=step)

        def failed(why: str) -> None:  # back on this stream: its client relays the step instead
            if stream.session is not None and not stream.session.closed:
                with contextlib.suppress(asyncio.QueueFull):
                    stream.pushed.put_nowait(StepResult(step_id=s.step_id, push_error=why))

        self.pusher.push(target.address, message, failed)

    async def push(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        """Steps another server pushes to sessions opened here with push, each put in its
        session's turn. A step for an unknown or closed session, with a wrong token, or older
        than the session's last step (a hop the client gave up on, waking up) is dropped."""
        accepted = dropped = 0
        try:
            async for raw in requests:
                message = parse(PushedStep, raw)
                stream = self._pushable.get(message.session_id)
                if (
                    stream is None
                    or not secrets.compare_digest(stream.token, message.token)
                    or not message.HasField("step")
                    or message.step.step_id <= stream.last_step
                    or stream.pushed.full()
                ):
                    dropped += 1
                    log.debug("dropped a step pushed to session %s by %s", message.session_id, context.peer())
                    continue
                stream.pushed.put_nowait(message)
                accepted += 1
        except RequestError as e:
            await abort(context, e)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await internal(context, "Push")
        return PushSummary(accepted=accepted, dropped=dropped).SerializeToString()

    async def _answer(self, stream: _Stream, req: SessionRequest) -> bytes:
        """One request of a session stream, and the answer to send (RequestError when refused)."""
        session = stream.session
        kind = req.WhichOneof("kind")
        if kind == "open":
            if session is not None:
                raise SessionStateError("a session is already open on this stream")
            o = req.open
            stream.session = session = await self.engine.open(o.model_id, o.start, o.end, o.max_length, stream.client)
            session.compact_logits = o.compact_logits
            opened = SessionOpened(session_id=session.id, max_length=session.cache.max_length)
            if o.push:
                stream.token = opened.push_token = secrets.token_bytes(16)
                self._pushable[session.id] = stream
            return SessionResponse(opened=opened).SerializeToString()
        if kind == "step":
            return await self._run_step(stream, req.step)
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
                "Tokenizer": grpc.unary_unary_rpc_method_handler(self.tokenizer),
                "InferenceSession": grpc.stream_stream_rpc_method_handler(self.session),
                "Push": grpc.stream_unary_rpc_method_handler(self.push),
            },
        )


async def start_server(
    engine: Engine, certificate: Certificate | None = None, dial: Dial | None = None
) -> tuple[grpc.aio.Server, int]:
    """Bind and start the gRPC server over `engine` (its scheduler started too); returns the
    server with the bound port. The caller stops it: `await server.stop(grace)`. `dial` opens
    tunnels to peers behind NAT for pushes to them (a daemon's libp2p host; none: refused).

    It serves TLS with `certificate` (whose fingerprint the caller announces); plaintext only
    when the config says `insecure_lan`, and never both: a plaintext client of a TLS port
    fails its handshake."""
    config = engine.config
    if certificate is None and not config.insecure_lan:
        raise ConfigError("serving gRPC needs a TLS certificate (or insecure_lan for a trusted LAN)")
    engine.start()
    # gRPC sets SO_REUSEPORT by default: a second server on a port in use would start and share it.
    gates = []
    if config.swarm_key is not None:  # a private swarm: every call proves the key before any work
        from node.serve.gate import SwarmGate

        gates.append(SwarmGate(config.swarm_key, certificate.fingerprint if certificate is not None else ""))
    options = [*grpc_options(config.max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options, interceptors=gates)
    server.add_generic_rpc_handlers([ShardService(engine, dial).handler()])
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
