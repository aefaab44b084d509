"""Property-based fuzzing of every gRPC method of the Shard service (Forward, InferenceSession,
Info) against a live `moemesh serve`: raw garbage and structurally valid but hostile messages
get a status with a message (never UNKNOWN, never a hang), and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.client.channels import Channels
from node.testing.launch import ServerProcess, start_server_process
from protocol import DEFAULT_MAX_MESSAGE_BYTES
from protocol.shard_pb2 import CloseSession, ForwardRequest, InfoResponse, OpenSession, SessionRequest, Step, Tensor

pytestmark = pytest.mark.slow

ANSWERS = {  # what a refusal may be; UNKNOWN or INTERNAL would be a bug
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

dims = st.one_of(st.integers(0, 70), st.sampled_from([2**31 - 1, 2**31, 2**63, 2**64 - 1]))
tensors = st.builds(
    Tensor,
    dtype=st.integers(0, 6),
    shape=st.lists(dims, max_size=6),
    data=st.one_of(st.binary(max_size=2048), st.integers(0, 64).map(lambda n: bytes(4 * 64 * n))),
)
layers = st.integers(0, 2**32 - 1) | st.integers(0, 6)
MODEL = [""]  # the served model's id, once the server is up: hostile requests must reach past the model check
models = st.sampled_from(["", "x", None])  # None: the served one


def _model(choice: str | None) -> str:
    return MODEL[0] if choice is None else choice


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path]) -> Iterator[tuple[ServerProcess, grpc.Channel]]:
    process = start_server_process(tiny_models["mixtral"], (0, 4))
    channels = Channels(DEFAULT_MAX_MESSAGE_BYTES, 10.0)
    try:
        channel = channels.get(process.pinned)
        MODEL[0] = InfoResponse.FromString(channel.unary_unary("/moemesh.v1.Shard/Info")(b"", timeout=10)).model_id
        yield process, channel
    finally:
        channels.close()
        process.stop()


def _unary(channel: grpc.Channel, method: str, raw: bytes) -> None:
    call = channel.unary_unary(f"/moemesh.v1.Shard/{method}")
    try:
        call(raw, timeout=10)
    except grpc.RpcError as e:
        assert e.code() in ANSWERS, (e.code(), e.details())
        assert "Traceback" not in (e.details() or "")


def _alive(channel: grpc.Channel) -> None:
    channel.unary_unary("/moemesh.v1.Shard/Info")(b"", timeout=10)


@FUZZ
@given(raw=st.binary(max_size=4096))
def test_garbage_bytes_to_every_method(server: tuple[ServerProcess, grpc.Channel], raw: bytes) -> None:
    _, channel = server
    for method in ("Forward", "Info"):
        _unary(channel, method, raw)
    call = channel.stream_stream("/moemesh.v1.Shard/InferenceSession")
    try:
        list(call(iter([raw, raw]), timeout=10))
    except grpc.RpcError as e:
        assert e.code() in ANSWERS, (e.code(), e.details())
    _alive(channel)


@FUZZ
@given(model=models, start=layers, end=layers, tensor=tensors, last=st.booleans())
def test_hostile_forwards(
    server: tuple[ServerProcess, grpc.Channel], model: str, start: int, end: int, tensor: Tensor, last: bool
) -> None:
    _, channel = server
    request = ForwardRequest(model_id=_model(model), start=start, end=end, input=tensor, last_only=last)
    _unary(channel, "Forward", request.SerializeToString())
    _alive(channel)


requests = st.one_of(
    st.builds(
        lambda s, e, m: SessionRequest(open=OpenSession(start=s, end=e, max_length=m)),
        layers,
        layers,
        st.integers(0, 2**32 - 1),
    ),
    st.builds(
        lambda p, t, lo: SessionRequest(step=Step(position=p, input=t, last_only=lo)),
        st.integers(0, 2**32 - 1) | st.integers(0, 8),
        tensors,
        st.booleans(),
    ),
    st.just(SessionRequest(close=CloseSession())),
    st.just(SessionRequest()),
)


@FUZZ
@given(sequence=st.lists(requests, min_size=1, max_size=6))
def test_hostile_sessions(server: tuple[ServerProcess, grpc.Channel], sequence: list[SessionRequest]) -> None:
    _, channel = server
    call = channel.stream_stream("/moemesh.v1.Shard/InferenceSession")
    try:
        list(call(iter([r.SerializeToString() for r in sequence]), timeout=10))
    except grpc.RpcError as e:
        assert e.code() in ANSWERS, (e.code(), e.details())
        assert "Traceback" not in (e.details() or "")
    _alive(channel)
