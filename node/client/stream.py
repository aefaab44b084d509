"""The client's calls on a peer's Shard service: Info, Tokenizer, and one InferenceSession stream per hop.

Sync gRPC: a stream's answers are read by a thread of its own, so that every step waits with
a timeout, and a hop that hangs is told from one that is slow.

Step ids come from the session (one counter for all its hops), so a step pushed along a chain
(`Step.route`, see `node.serve.push`) has one id at every hop, and an answer to a step the
client has given up on (an older id) is told apart and skipped.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from node.client.config import ClientConfig
from node.errors import PeerError, PeerTimeout, PeerUnavailable, PushNotDelivered, peer_error
from node.plan.routing import Hop
from protocol.shard_pb2 import (
    CloseSession,
    InfoRequest,
    InfoResponse,
    OpenSession,
    PushTarget,
    Sample,
    SessionRequest,
    SessionResponse,
    Step,
    Tensor,
    TokenizerRequest,
)

__all__ = ["HopStream", "StepRecord", "ask_info", "ask_tokenizer"]

log = logging.getLogger(__name__)
_SERVICE = "/moemesh.v1.Shard/"
_END = object()


def ask_info(channel: grpc.Channel, address: str, timeout_s: float) -> InfoResponse:
    """The peer's Info answer (PeerError when it does not give one)."""
    call = channel.unary_unary(
        _SERVICE + "Info",
        request_serializer=InfoRequest.SerializeToString,
        response_deserializer=InfoResponse.FromString,
    )
    try:
        return call(InfoRequest(), timeout=timeout_s)  # type: ignore[no-any-return]
    except grpc.RpcError as e:
        raise peer_error(address, e) from None


def ask_tokenizer(channel: grpc.Channel, address: str, model_id: str, timeout_s: float) -> bytes:
    """The peer's Tokenizer answer as the bytes it sent, to be checked (`node.textfiles.unpack`)
    before they are parsed further (PeerError when it does not give one)."""
    call = channel.unary_unary(
        _SERVICE + "Tokenizer", request_serializer=TokenizerRequest.SerializeToString, response_deserializer=None
    )
    try:
        return call(TokenizerRequest(model_id=model_id), timeout=timeout_s)  # type: ignore[no-any-return]
    except grpc.RpcError as e:
        raise peer_error(address, e) from None


@dataclass(frozen=True)
class StepRecord:
    """One step as a hop received it: enough to replay it to a replacement."""

    position: int
    input: Tensor
    last_only: bool


class HopStream:
    """One InferenceSession stream to one hop, opened on construction (PeerError if it cannot be).

    With `push`, the session also takes steps pushed by the previous hop (when the server
    supports it: `push_token` is then set) and pushes its outputs on along a step's route."""

    def __init__(
        self,
        channel: grpc.Channel,
        hop: Hop,
        model_id: str,
        max_length: int,
        config: ClientConfig,
        *,
        step_ids: Iterator[int] | None = None,
        push: bool = False,
        compact_logits: bool = False,
    ) -> None:
        self.hop = hop
        self._config = config
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._backlog: collections.deque[Any] = collections.deque()  # read while looking for push errors
        self._push_errors: dict[int, str] = {}  # step id -> why this hop could not push it on
        self._broken: PeerError | None = None
        call = channel.stream_stream(
            _SERVICE + "InferenceSession",
            request_serializer=SessionRequest.SerializeToString,
            response_deserializer=SessionResponse.FromString,
        )
        self._call = call(iter(self._requests.get, _END), wait_for_ready=False)
        threading.Thread(target=self._read, name=f"moemesh-hop-{hop.address}", daemon=True).start()
        self._step_ids = step_ids if step_ids is not None else itertools.count()
        request = OpenSession(
            model_id=model_id,
            start=hop.start,
            end=hop.end,
            max_length=max_length,
            push=push,
            compact_logits=compact_logits,
        )
        self._requests.put(SessionRequest(open=request))
        opened = self._answer("opened", self._config.info_timeout_s).opened
        self.max_length = opened.max_length
        self.session_id = opened.session_id
        self.push_token = opened.push_token  # b"": this server takes no pushed steps (or was not asked)

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(_END)
        except grpc.RpcError as e:  # the call itself is the error
            self._responses.put(e)

    def _next(self, timeout: float) -> Any:
        if self._backlog:
            return self._backlog.popleft()
        return self._responses.get(timeout=timeout)

    def _answer(
        self, expect: str, timeout: float, step_id: int | None = None, upstream: HopStream | None = None
    ) -> SessionResponse:
        """The next answer of kind `expect` (for `step_id`: answers to older steps are skipped).
        With `upstream` (the hop pushing the step here), raises PushNotDelivered as soon as that
        hop reports it could not push it."""
        if self._broken is not None:
            raise self._broken
        deadline = time.monotonic() + timeout
        while True:
            if upstream is not None and step_id is not None and (why := upstream.push_error(step_id)) is not None:
                raise PushNotDelivered(upstream.hop.address, why)
            left = max(deadline - time.monotonic(), 0.0)
            try:
                response = self._next(min(left, 0.05) if upstream is not None else left)
            except queue.Empty:
                if upstream is not None and left > 0.05:
                    continue  # a slice of the wait ran out, not the whole of it
                self._call.cancel()
                self._broken = PeerTimeout(self.hop.address, f"no answer within {timeout:g} s")
                raise self._broken from None
            if response is _END:
                self._broken = PeerUnavailable(self.hop.address, "the stream ended without an answer")
            elif isinstance(response, grpc.RpcError):
                self._broken = peer_error(self.hop.address, response)
            elif response.WhichOneof("kind") == "result" and (
                expect != "result" or (step_id is not None and response.result.step_id != step_id)
            ):
                if response.result.push_error:
                    self._push_errors[response.result.step_id] = response.result.push_error
                continue  # the answer to a step given up on (a failover re-sent it under a new id)
            elif response.WhichOneof("kind") != expect:
                self._broken = PeerError(self.hop.address, f"expected {expect}, got {response.WhichOneof('kind')}")
            if self._broken is not None:
                raise self._broken
            if response.WhichOneof("kind") == "result" and response.result.push_error:
                self._push_errors[step_id] = response.result.push_error  # type: ignore[index]
                continue
            return response  # type: ignore[no-any-return]

    def send(
        self,
        tensor: Tensor,
        position: int,
        last_only: bool,
        route: Sequence[PushTarget] = (),
        draw: Sample | None = None,
    ) -> tuple[int, float]:
        """Send one step (pushed on along `route` after this hop; `draw`: the chain's last hop
        samples it); returns its id and how long to wait for a hop's answer to it."""
        step_id = next(self._step_ids)
        step = Step(step_id=step_id, position=position, input=tensor, last_only=last_only, route=route)
        if draw is not None:
            step.sample.CopyFrom(draw)
        self._requests.put(SessionRequest(step=step))
        tokens = tensor.shape[1] if len(tensor.shape) > 1 else 1
        return step_id, self._config.decode_timeout_s if tokens == 1 else self._config.step_timeout_s

    def result(self, step_id: int, timeout: float, upstream: HopStream | None = None) -> Tensor:
        """This hop's output of step `step_id` (see `_answer` for `upstream`)."""
        return self._answer("result", timeout, step_id, upstream).result.output

    def has_answer(self) -> bool:
        """Whether an answer (or the stream's end) has come and not been taken yet (never waits)."""
        return bool(self._backlog) or not self._responses.empty() or self._broken is not None

    def push_error(self, step_id: int) -> str | None:
        """Why this hop could not push step `step_id` on, if it said so (never waits)."""
        while self._broken is None:
            try:
                response = self._responses.get_nowait()
            except queue.Empty:
                break
            if (
                not isinstance(response, grpc.RpcError)
                and response is not _END
                and response.WhichOneof("kind") == "result"
                and response.result.push_error
            ):
                self._push_errors[response.result.step_id] = response.result.push_error
            else:
                self._backlog.append(response)
        return self._push_errors.get(step_id)

    def step(self, tensor: Tensor, position: int, last_only: bool) -> Tensor:
        step_id, timeout = self.send(tensor, position, last_only)
        return self.result(step_id, timeout)

    def replay(self, steps: Sequence[StepRecord]) -> list[Tensor]:
        """Send every step at once and collect the outputs in order (one round trip, not one per
        step; the server runs a stream's steps in order)."""
        sent = [self.send(r.input, r.position, r.last_only) for r in steps]
        return [self.result(step_id, t) for step_id, t in sent]

    def close(self, goodbye: bool = True) -> None:
        """End the stream; with `goodbye`, close the session first and wait for the peer to say so."""
        if self._broken is None and goodbye:
            try:
                self._requests.put(SessionRequest(close=CloseSession()))
                self._answer("closed", self._config.info_timeout_s)
            except PeerError as e:
                log.debug("closing session on %s: %s", self.hop.address, e)
        self._requests.put(_END)
        self._call.cancel()
