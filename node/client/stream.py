"""The client's calls on a peer's Shard service: Info, Tokenizer, and one InferenceSession stream per hop.

Sync gRPC: a stream's answers are read by a thread of its own, so that every step waits with
a timeout, and a hop that hangs is told from one that is slow.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from node.client.config import ClientConfig
from node.errors import PeerError, PeerTimeout, PeerUnavailable, peer_error
from node.plan.routing import Hop
from protocol.shard_pb2 import (
    CloseSession,
    InfoRequest,
    InfoResponse,
    OpenSession,
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
    """One InferenceSession stream to one hop, opened on construction (PeerError if it cannot be)."""

    def __init__(self, channel: grpc.Channel, hop: Hop, model_id: str, max_length: int, config: ClientConfig) -> None:
        self.hop = hop
        self._config = config
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._broken: PeerError | None = None
        call = channel.stream_stream(
            _SERVICE + "InferenceSession",
            request_serializer=SessionRequest.SerializeToString,
            response_deserializer=SessionResponse.FromString,
        )
        self._call = call(iter(self._requests.get, _END), wait_for_ready=False)
        threading.Thread(target=self._read, name=f"moemesh-hop-{hop.address}", daemon=True).start()
        self._step_ids = itertools.count()
        request = OpenSession(model_id=model_id, start=hop.start, end=hop.end, max_length=max_length)
        self._requests.put(SessionRequest(open=request))
        self.max_length = self._answer("opened", self._config.info_timeout_s).opened.max_length

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(_END)
        except grpc.RpcError as e:  # the call itself is the error
            self._responses.put(e)

    def _answer(self, expect: str, timeout: float) -> SessionResponse:
        if self._broken is not None:
            raise self._broken
        try:
            response = self._responses.get(timeout=timeout)
        except queue.Empty:
            self._call.cancel()
            self._broken = PeerTimeout(self.hop.address, f"no answer within {timeout:g} s")
            raise self._broken from None
        if response is _END:
            self._broken = PeerUnavailable(self.hop.address, "the stream ended without an answer")
        elif isinstance(response, grpc.RpcError):
            self._broken = peer_error(self.hop.address, response)
        elif response.WhichOneof("kind") != expect:
            self._broken = PeerError(self.hop.address, f"expected {expect}, got {response.WhichOneof('kind')}")
        if self._broken is not None:
            raise self._broken
        return response  # type: ignore[no-any-return]

    def _send(self, tensor: Tensor, position: int, last_only: bool) -> float:
        step = Step(step_id=next(self._step_ids), position=position, input=tensor, last_only=last_only)
        self._requests.put(SessionRequest(step=step))
        tokens = tensor.shape[1] if len(tensor.shape) > 1 else 1
        return self._config.decode_timeout_s if tokens == 1 else self._config.step_timeout_s

    def step(self, tensor: Tensor, position: int, last_only: bool) -> Tensor:
        return self._answer("result", self._send(tensor, position, last_only)).result.output

    def replay(self, steps: Sequence[StepRecord]) -> list[Tensor]:
        """Send every step at once and collect the outputs in order (one round trip, not one per
        step; the server runs a stream's steps in order)."""
        timeouts = [self._send(r.input, r.position, r.last_only) for r in steps]
        return [self._answer("result", t).result.output for t in timeouts]

    def close(self) -> None:
        if self._broken is None:
            try:
                self._requests.put(SessionRequest(close=CloseSession()))
                self._answer("closed", self._config.info_timeout_s)
            except PeerError as e:
                log.debug("closing session on %s: %s", self.hop.address, e)
        self._requests.put(_END)
        self._call.cancel()
