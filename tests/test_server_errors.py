"""Bad input gets a clear gRPC status, and the server keeps serving."""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from node.testing.launch import ServerProcess, local_swarm
from node.tls import pinned_channel
from protocol import make_tensor
from protocol.shard_pb2 import (
    CloseSession,
    DType,
    ForwardRequest,
    InfoRequest,
    InfoResponse,
    OpenSession,
    SessionRequest,
    SessionResponse,
    Step,
    Tensor,
)

HIDDEN = 64


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path]) -> Iterator[list[ServerProcess]]:
    args = ["--max-message-mb", "1", "--max-length", "32", "--max-sessions", "3", "--max-sessions-per-client", "2"]
    with local_swarm(tiny_models["mixtral"], [(0, 2), (2, 4)], extra_args=args) as procs:
        yield procs


@pytest.fixture(scope="module")
def channels(servers: list[ServerProcess]) -> Iterator[list[grpc.Channel]]:
    opts = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    chans = [pinned_channel(s.address, s.fingerprint, opts) for s in servers]
    yield chans
    for c in chans:
        c.close()


def _ids(n: int) -> Tensor:
    return make_tensor("int64", (1, n), np.arange(n, dtype="<i8").tobytes())


def _hidden(n: int, width: int = HIDDEN, dtype: str = "float32") -> Tensor:
    return make_tensor(
        dtype, (1, n, width), np.zeros((1, n, width), dtype="<f4" if dtype == "float32" else "<f2").tobytes()
    )


def _forward_raw(channel: grpc.Channel, payload: bytes) -> bytes:
    call = channel.unary_unary("/moemesh.v1.Shard/Forward")
    result: bytes = call(payload, timeout=30)
    return result


def _forward(channel: grpc.Channel, start: int, end: int, tensor: Tensor) -> bytes:
    return _forward_raw(channel, ForwardRequest(start=start, end=end, input=tensor).SerializeToString())


def _session(channel: grpc.Channel, requests: Sequence[SessionRequest]) -> list[SessionResponse]:
    call = channel.stream_stream(
        "/moemesh.v1.Shard/InferenceSession",
        request_serializer=SessionRequest.SerializeToString,
        response_deserializer=SessionResponse.FromString,
    )
    return list(call(iter(requests), timeout=30))


def _still_serving(channel: grpc.Channel) -> None:
    call = channel.unary_unary(
        "/moemesh.v1.Shard/Info",
        request_serializer=InfoRequest.SerializeToString,
        response_deserializer=InfoResponse.FromString,
    )
    assert call(InfoRequest(), timeout=10).num_layers == 4


def _refused(code: grpc.StatusCode, match: str, fn: object, *args: object) -> None:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)  # type: ignore[operator]
    err = info.value
    assert err.code() == code, err.details()
    assert match in (err.details() or ""), err.details()


def _open(start: int, end: int, max_length: int = 16) -> SessionRequest:
    return SessionRequest(open=OpenSession(start=start, end=end, max_length=max_length))


def _step(tensor: Tensor, position: int = 0) -> SessionRequest:
    return SessionRequest(step=Step(position=position, input=tensor))


def test_valid_requests_work(channels: list[grpc.Channel]) -> None:
    first, second = channels
    assert _forward(first, 0, 2, _ids(3))
    assert _forward(second, 2, 4, _hidden(3))
    assert _forward(second, 3, 4, _hidden(2))  # a sub-span of the served one
    replies = _session(first, [_open(0, 2), _step(_ids(4)), _step(_ids(1), 4), _step(_ids(2), 2)])
    assert [r.result.length for r in replies[1:]] == [4, 5, 4]  # the last step rolled back to position 2


def test_wrong_dtype(channels: list[grpc.Channel]) -> None:
    first, second = channels
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "int64 token ids", _forward, first, 0, 2, _hidden(3))
    _refused(
        grpc.StatusCode.INVALID_ARGUMENT, "float32 hidden states", _forward, second, 2, 4, _hidden(3, dtype="float16")
    )
    _still_serving(first)
    _still_serving(second)


def test_wrong_shape_or_hidden_size(channels: list[grpc.Channel]) -> None:
    second = channels[1]
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "[batch, tokens, 64]", _forward, second, 2, 4, _hidden(3, width=32))
    flat = make_tensor("float32", (3, HIDDEN), b"\0" * 3 * HIDDEN * 4)
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "hidden states", _forward, second, 2, 4, flat)
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "no tokens", _forward, second, 2, 4, _hidden(0))
    _still_serving(second)


def test_byte_length_not_matching_shape(channels: list[grpc.Channel]) -> None:
    short = Tensor(dtype=DType.FLOAT32, shape=[1, 2, HIDDEN], data=b"\0" * 100)
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "bytes do not hold", _forward, channels[1], 2, 4, short)
    _still_serving(channels[1])


def test_message_over_the_limit(channels: list[grpc.Channel]) -> None:
    big = _hidden(5000)  # 1.3 MB > the 1 MiB limit the server was started with
    _refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "", _forward, channels[1], 2, 4, big)
    _still_serving(channels[1])


def test_layers_outside_the_span_and_wrong_model(channels: list[grpc.Channel]) -> None:
    first = channels[0]
    _refused(grpc.StatusCode.OUT_OF_RANGE, "outside the served span [0, 2)", _forward, first, 0, 3, _ids(2))
    _refused(grpc.StatusCode.OUT_OF_RANGE, "outside the served span", _session, first, [_open(2, 4)])
    wrong = ForwardRequest(model_id="not-this-one", start=0, end=2, input=_ids(2)).SerializeToString()
    _refused(grpc.StatusCode.NOT_FOUND, "not not-this-one", _forward_raw, first, wrong)
    _still_serving(first)


def test_garbage_bytes(channels: list[grpc.Channel]) -> None:
    first = channels[0]
    _refused(
        grpc.StatusCode.INVALID_ARGUMENT, "not a valid ForwardRequest", _forward_raw, first, b"\xff\xff\xff\xff\xff"
    )
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "no input tensor", _forward_raw, first, b"")
    stream = first.stream_stream("/moemesh.v1.Shard/InferenceSession")
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([b"\xff\xff\xff"]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _still_serving(first)


def test_unknown_and_closed_sessions(channels: list[grpc.Channel]) -> None:
    first = channels[0]
    _refused(grpc.StatusCode.FAILED_PRECONDITION, "unknown session", _session, first, [_step(_ids(1))])
    closed = [_open(0, 2), SessionRequest(close=CloseSession()), _step(_ids(1))]
    _refused(grpc.StatusCode.FAILED_PRECONDITION, "is closed", _session, first, closed)
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "empty SessionRequest", _session, first, [SessionRequest()])
    _still_serving(first)


def test_session_past_its_max_length(channels: list[grpc.Channel]) -> None:
    first = channels[0]
    _refused(
        grpc.StatusCode.OUT_OF_RANGE,
        "max length 4",
        _session,
        first,
        [_open(0, 2, 4), _step(_ids(3)), _step(_ids(2), 3)],
    )
    _refused(grpc.StatusCode.OUT_OF_RANGE, "exceeds this server's limit 32", _session, first, [_open(0, 2, 1000)])
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "position 5", _session, first, [_open(0, 2), _step(_ids(2), 5)])
    _still_serving(first)


def _connection(server: ServerProcess) -> grpc.Channel:
    """A channel with a connection of its own: the server sees another client."""
    return pinned_channel(server.address, server.fingerprint, [("grpc.use_local_subchannel_pool", 1)])


def _hold_session(channel: grpc.Channel) -> tuple[queue.SimpleQueue[SessionRequest | None], Iterator[SessionResponse]]:
    """Open a session on `channel` and keep its stream open (put None to half-close it)."""
    call = channel.stream_stream(
        "/moemesh.v1.Shard/InferenceSession",
        request_serializer=SessionRequest.SerializeToString,
        response_deserializer=SessionResponse.FromString,
    )
    q: queue.SimpleQueue[SessionRequest | None] = queue.SimpleQueue()
    q.put(_open(0, 2))
    it = call(iter(q.get, None), timeout=30)
    assert next(it).HasField("opened")
    return q, it


def test_one_client_cannot_take_every_session(servers: list[ServerProcess]) -> None:
    greedy, other, third = (_connection(servers[0]) for _ in range(3))
    held = [_hold_session(greedy), _hold_session(greedy)]  # its share: 2 of the 3
    _refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "its share of this server", _session, greedy, [_open(0, 2)])
    held.append(_hold_session(other))  # another client still gets one
    _refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "server is full", _session, third, [_open(0, 2)])
    for q, it in held:
        q.put(None)  # half-close: the server frees the session
        assert list(it) == []
    assert _session(greedy, [_open(0, 2)])[0].HasField("opened")
    for channel in (greedy, other, third):
        channel.close()


def test_full_server_refuses_new_sessions_then_recovers(servers: list[ServerProcess]) -> None:
    clients = [_connection(servers[0]) for _ in range(4)]
    held = [_hold_session(c) for c in clients[:3]]  # one each: 3 clients fill the server
    _refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "server is full", _session, clients[3], [_open(0, 2)])
    for q, it in held:
        q.put(None)  # half-close: the server frees the session
        assert list(it) == []
    assert _session(clients[3], [_open(0, 2)])[0].HasField("opened")
    for channel in clients:
        channel.close()
