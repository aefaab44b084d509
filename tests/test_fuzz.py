"""Property-based fuzzing (hypothesis, bounded) of every handler of a live peer: the Shard
service's gRPC methods (Forward, InferenceSession, Info, Tokenizer, Push) of a `moemesh serve`, whose raw
garbage and well-formed hostile messages get a status with a message (never UNKNOWN, never a
hang) while the server keeps serving; and a daemon's libp2p handlers (sync, record, tunnel,
Kademlia, DHT values), which answer or end every stream and keep their record and service.
`bench/fuzz.py` sends 10,000 messages per handler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.client import Client
from node.client.channels import Channels
from node.testing.fuzz import MESH_HANDLERS, MeshProbe, Outcome, messages
from node.testing.launch import ServerProcess, start_daemon, start_server_process
from protocol import DEFAULT_MAX_MESSAGE_BYTES
from protocol.shard_pb2 import (
    CloseSession,
    ForwardRequest,
    InfoResponse,
    OpenSession,
    PushedStep,
    SessionRequest,
    Step,
    Tensor,
)

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
    for method in ("Forward", "Info", "Tokenizer"):
        _unary(channel, method, raw)
    call = channel.stream_stream("/moemesh.v1.Shard/InferenceSession")
    try:
        list(call(iter([raw, raw]), timeout=10))
    except grpc.RpcError as e:
        assert e.code() in ANSWERS, (e.code(), e.details())
    _push(channel, [raw, raw])
    _alive(channel)


def _push(channel: grpc.Channel, raw: list[bytes]) -> None:
    """Steps pushed as another server would (client-streaming `Push`)."""
    try:
        channel.stream_unary("/moemesh.v1.Shard/Push")(iter(raw), timeout=10)
    except grpc.RpcError as e:
        assert e.code() in ANSWERS, (e.code(), e.details())
        assert "Traceback" not in (e.details() or "")


@FUZZ
@given(model=models, start=layers, end=layers, tensor=tensors, last=st.booleans())
def test_hostile_forwards(
    server: tuple[ServerProcess, grpc.Channel], model: str, start: int, end: int, tensor: Tensor, last: bool
) -> None:
    _, channel = server
    request = ForwardRequest(model_id=_model(model), start=start, end=end, input=tensor, last_only=last)
    _unary(channel, "Forward", request.SerializeToString())
    _alive(channel)


pushed = st.builds(
    lambda sid, token, p, t, lo: PushedStep(
        session_id=sid, token=token, step=Step(position=p, input=t, last_only=lo)
    ).SerializeToString(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(0, 2**32 - 1) | st.integers(0, 8),
    tensors,
    st.booleans(),
)


@FUZZ
@given(steps=st.lists(pushed | st.binary(max_size=512), min_size=1, max_size=6))
def test_hostile_pushes(server: tuple[ServerProcess, grpc.Channel], steps: list[bytes]) -> None:
    _, channel = server
    _push(channel, steps)
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


# -- the libp2p handlers of a live daemon ---------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, MeshProbe]]:
    keys = tmp_path_factory.mktemp("fuzz-keys")
    process = start_daemon(["--model", str(tiny_models["mixtral"]), "--layers", "0:4", "--identity", str(keys / "d")])
    try:
        with MeshProbe(process.multiaddr) as probe:
            yield process, probe
    finally:
        process.terminate()
        process.stop()


def _mesh_messages(handler: str) -> st.SearchStrategy[tuple[bytes, ...]]:
    structured = st.randoms(use_true_random=False).map(
        lambda r: messages(handler, r, model_id=MODEL[0], target=TARGET[0])
    )
    if handler == "dht-put":
        return st.one_of(structured, st.tuples(st.binary(max_size=80), st.binary(max_size=2048)))
    return st.one_of(structured, st.binary(max_size=4096).map(lambda b: (b,)))


TARGET = [""]


@pytest.mark.parametrize("handler", MESH_HANDLERS)
def test_hostile_streams_to_every_libp2p_handler(daemon: tuple[Any, MeshProbe], handler: str) -> None:
    """sync, record, tunnel, Kademlia's stream and DHT PUT_VALUE: every message gets an answer or an
    orderly end within the hang bound, the daemon lives, its record is still its own."""
    process, probe = daemon
    TARGET[0] = process.peer_id
    since = len(process.log)

    @FUZZ
    @given(message=_mesh_messages(handler))
    def one(message: tuple[bytes, ...]) -> None:
        assert probe.send(handler, [message]) == [Outcome.ANSWERED]

    one()
    assert process.process.poll() is None
    assert probe.send("record", [(b"",)]) == [Outcome.ANSWERED]
    with Client(bootstrap=[process.multiaddr]) as client:  # its record still reads as its own, and it serves
        assert [h.address for h in client.route()[1]] == [process.pinned]
    assert not [line for line in process.log[since:] if "Traceback" in line or " ERROR " in line]
