"""Hostile messages for every handler of a live daemon, and a probe that sends them (tests, bench/fuzz.py).

Handlers: the Shard service's gRPC methods (Forward, Info, InferenceSession, Tokenizer, Push) and our libp2p
protocols (sync, record, the gRPC tunnel), Kademlia's own stream and its PUT_VALUE (DHT
values). `messages(handler, rng)` makes one message: garbage, or a well-formed message
with hostile contents (huge or empty dimensions, every dtype, layers and positions at the
edges, frames over the limit, other peers' keys). `MeshProbe` is a libp2p host of its own
on a trio thread; `grpc_send` sends to a gRPC method. Each send returns an `Outcome`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import Enum

import grpc
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from node.mesh.bridge import TrioThread
from node.mesh.host import MeshConfig, MeshNode
from node.mesh.identity import ephemeral_identity
from node.mesh.internals import close_write, store_at_peer
from node.mesh.record import RECORD_PROTOCOL
from node.mesh.records import make_record, peer_key, sign_record
from node.mesh.sync import SYNC_PROTOCOL
from node.mesh.tunnel import TUNNEL_PROTOCOL
from protocol.shard_pb2 import (
    CloseSession,
    ForwardRequest,
    OpenSession,
    PushedStep,
    SessionRequest,
    Step,
    Tensor,
    TokenizerRequest,
)
from protocol.swarm_pb2 import SyncFrame

__all__ = ["GRPC_HANDLERS", "HANG_S", "MESH_HANDLERS", "MeshProbe", "Outcome", "grpc_send", "messages"]

HANG_S = 10.0  # no answer and no end within this long: the handler hangs
KAD_PROTOCOL = TProtocol("/ipfs/kad/1.0.0")
GRPC_HANDLERS = ("Forward", "Info", "InferenceSession", "Tokenizer", "Push")
MESH_HANDLERS = ("sync", "record", "tunnel", "kad", "dht-put")
_PROTOCOLS = {"sync": SYNC_PROTOCOL, "record": RECORD_PROTOCOL, "tunnel": TUNNEL_PROTOCOL, "kad": KAD_PROTOCOL}
_BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}


class Outcome(Enum):
    ANSWERED = "answered"  # a status, an answer or an orderly end
    HANG = "hang"  # nothing within HANG_S
    ERROR = "error"  # a non-status error: UNKNOWN, INTERNAL (a bug), or our side could not send
    DOWN = "down"  # the peer could not be reached at all


# -- messages ----------------------------------------------------------------------------------

_DIMS = [0, 1, 2, 3, 63, 64, 65, 255, 256, 2**31 - 1, 2**31, 2**32, 2**63, 2**64 - 1]


def _dim(rng: random.Random) -> int:
    return rng.choice(_DIMS) if rng.random() < 0.5 else rng.randrange(0, 80)


def _tensor(rng: random.Random) -> Tensor:
    shape = [_dim(rng) for _ in range(rng.randrange(0, 6))]
    n = 1
    for d in shape:
        n = n * d if n * d < 1 << 20 else 1 << 20
    size = rng.choice([0, rng.randrange(0, 64), min(n, 4096) * rng.choice([1, 2, 4, 8])])
    return Tensor(dtype=rng.randrange(0, 7), shape=shape, data=rng.randbytes(size))  # type: ignore[arg-type]


def _layer(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 4, 5, 2**31, 2**32 - 1]) if rng.random() < 0.7 else rng.randrange(0, 2**32)


def _garbage(rng: random.Random, limit: int = 4096) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 4, 16, rng.randrange(0, limit)]))


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """A few bytes of a valid message flipped, cut or repeated."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        if not b:
            break
        op, i = rng.randrange(3), rng.randrange(len(b))
        if op == 0:
            b[i] = rng.randrange(256)
        elif op == 1:
            del b[i:]
        else:
            b[i:i] = b[i : i + rng.randrange(1, 16)]
    return bytes(b)


def _session_request(rng: random.Random, model_id: str) -> SessionRequest:
    kind = rng.randrange(4)
    if kind == 0:
        model = rng.choice(["", "x", model_id])
        return SessionRequest(
            open=OpenSession(model_id=model, start=_layer(rng), end=_layer(rng), max_length=_layer(rng))
        )
    if kind == 1:
        step = Step(
            step_id=rng.randrange(2**63), position=_layer(rng), input=_tensor(rng), last_only=rng.random() < 0.5
        )
        return SessionRequest(step=step)
    return SessionRequest(close=CloseSession()) if kind == 2 else SessionRequest()


def _frame(rng: random.Random) -> bytes:
    frame = SyncFrame(
        kind=rng.randrange(0, 5),  # type: ignore[arg-type]
        epoch=rng.choice([0, 1, 2, 2**32, 2**64 - 1, rng.randrange(2**64)]),
        epoch_owner=rng.choice(["", "12D3KooWxyz", "x" * rng.randrange(0, 300)]),
        update=_garbage(rng, 2048),
        state_vector=_garbage(rng, 256),
        full=rng.random() < 0.3,
    ).SerializeToString()
    framed = len(frame).to_bytes(4, "big") + frame
    choice = rng.randrange(5)
    if choice == 0:
        return _garbage(rng)
    if choice == 1:
        return rng.choice([2**32 - 1, 2**31, 64 << 20]).to_bytes(4, "big") + _garbage(rng, 64)  # over the limit
    if choice == 2:
        return _mutate(framed, rng)
    return framed * rng.randrange(1, 8)  # one frame, or more than a conversation holds


def messages(handler: str, rng: random.Random, *, model_id: str = "", target: str = "") -> tuple[bytes, ...]:
    """One hostile message for `handler` (InferenceSession: the requests of one stream;
    dht-put: key and value). `target` is the daemon's peer id; `model_id` what it serves."""
    if handler == "Info":
        return (_garbage(rng) if rng.random() < 0.5 else b"",)
    if handler == "Forward":
        if rng.random() < 0.2:
            return (_garbage(rng),)
        model = rng.choice(["", "x", model_id, model_id])
        request = ForwardRequest(model_id=model, start=_layer(rng), end=_layer(rng), input=_tensor(rng))
        request.last_only = rng.random() < 0.5
        raw = request.SerializeToString()
        return (_mutate(raw, rng) if rng.random() < 0.2 else raw,)
    if handler == "InferenceSession":
        if rng.random() < 0.15:
            return tuple(_garbage(rng) for _ in range(rng.randrange(1, 4)))
        opened = SessionRequest(open=OpenSession(model_id=model_id, start=0, end=rng.choice([1, 2, 4]), max_length=64))
        requests = [_session_request(rng, model_id) for _ in range(rng.randrange(1, 7))]
        return tuple(r.SerializeToString() for r in ([opened] if rng.random() < 0.6 else []) + requests)
    if handler == "Tokenizer":
        if rng.random() < 0.5:
            return (_garbage(rng),)
        return (TokenizerRequest(model_id=rng.choice(["", "x" * rng.randrange(300), model_id])).SerializeToString(),)
    if handler == "Push":  # steps for sessions it does not have, or bytes that are no step
        return tuple(
            _garbage(rng, 512)
            if rng.random() < 0.3
            else PushedStep(
                session_id=rng.choice(["", "s", rng.randbytes(8).hex()]),
                token=rng.randbytes(rng.randrange(0, 40)),
                step=Step(position=_layer(rng), input=_tensor(rng), last_only=rng.random() < 0.5),
            ).SerializeToString()
            for _ in range(rng.randrange(1, 6))
        )
    if handler == "sync":
        return (_frame(rng),)
    if handler in ("record", "tunnel", "kad"):
        if handler == "tunnel" and rng.random() < 0.5:  # an HTTP/2 or TLS start, then garbage
            start = rng.choice([b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"])
            return (start + _garbage(rng),)
        if handler == "kad" and rng.random() < 0.5:  # a varint length, then garbage
            body = _garbage(rng, 512)
            return (bytes([min(len(body), 127)]) + body,)
        return (_garbage(rng),)
    if handler == "dht-put":
        pick = rng.randrange(5)
        if pick == 0:  # a stranger's value under the target's key
            return (peer_key(target).encode(), _garbage(rng, 2048))
        if pick == 1:  # a validly signed record of a throwaway key, under the target's key
            kp = ephemeral_identity()
            record = make_record(kp, grpc_addresses=[], p2p_addresses=[], shards=[], ttl_s=60, seq=rng.randrange(2**63))
            signed = sign_record(record, kp)
            return (peer_key(target).encode(), rng.choice([signed, _mutate(signed, rng)]))
        if pick == 2:  # keys outside our namespace
            return (
                rng.choice([b"/other/", b"", b"/moemesh/", b"/ipns/"]) + rng.randbytes(rng.randrange(0, 64)),
                _garbage(rng),
            )
        return (peer_key(ID(rng.randbytes(34)).to_base58()).encode(), _garbage(rng, 4096))
    raise ValueError(f"unknown handler {handler!r}")


# -- sending -----------------------------------------------------------------------------------


def grpc_send(channel: grpc.Channel, handler: str, message: Sequence[bytes]) -> Outcome:
    """Send `message` to the gRPC method `handler`; what came of it."""
    try:
        if handler == "InferenceSession":
            call = channel.stream_stream(f"/moemesh.v1.Shard/{handler}")
            for _ in call(iter(message), timeout=HANG_S):
                pass
        elif handler == "Push":
            channel.stream_unary(f"/moemesh.v1.Shard/{handler}")(iter(message), timeout=HANG_S)
        else:
            channel.unary_unary(f"/moemesh.v1.Shard/{handler}")(message[0], timeout=HANG_S)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Outcome.HANG
        if e.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (e.details() or "").lower():
            return Outcome.DOWN
        return Outcome.ERROR if e.code() in _BAD_CODES else Outcome.ANSWERED
    return Outcome.ANSWERED


class MeshProbe:
    """A libp2p host of its own (a throwaway key, no record) connected to the daemon at `multiaddr`."""

    def __init__(self, multiaddr: str, concurrency: int = 8) -> None:
        self.target = info_from_p2p_addr(Multiaddr(multiaddr))
        self.peer_id = self.target.peer_id.to_base58()
        self._node = MeshNode(ephemeral_identity(), MeshConfig(bootstrap=(multiaddr,), server=False))
        self._thread = TrioThread("moemesh-fuzz")
        self._limit = concurrency

    def __enter__(self) -> MeshProbe:
        self._thread.start()
        try:
            self._thread.call_sync(self._thread.start_service, self._node.serve)
        except BaseException:
            self._thread.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop()

    async def _one(self, handler: str, message: tuple[bytes, ...]) -> Outcome:
        host = self._node.host
        try:
            with trio.fail_after(HANG_S):
                if not host.get_network().get_connections(self.target.peer_id):
                    await host.connect(self.target)
                if handler == "dht-put":
                    await store_at_peer(self._node.dht.kad, self.target.peer_id, message[0], message[1])
                    return Outcome.ANSWERED
                try:
                    stream = await host.new_stream(self.target.peer_id, [_PROTOCOLS[handler]])
                except Exception:  # not even a stream: the message was not sent
                    return Outcome.DOWN
                try:
                    await stream.write(message[0])
                    await close_write(stream)
                    read = 0
                    while read < 1 << 20:
                        chunk = await stream.read(65536)
                        if not chunk:
                            break
                        read += len(chunk)
                finally:
                    with trio.move_on_after(1):
                        await stream.reset()
        except trio.TooSlowError:
            return Outcome.HANG
        except Exception:  # a reset or EOF: the handler refused, which is an answer
            return Outcome.ANSWERED
        return Outcome.ANSWERED

    def send(self, handler: str, batch: Sequence[tuple[bytes, ...]]) -> list[Outcome]:
        """Send every message of `batch` to `handler`, `concurrency` at a time, in order of results."""

        async def all_of_them() -> list[Outcome]:
            outcomes: list[Outcome] = []
            limit = trio.Semaphore(self._limit)

            async def one(message: tuple[bytes, ...]) -> None:
                async with limit:
                    outcomes.append(await self._one(handler, message))

            async with trio.open_nursery() as nursery:
                for message in batch:
                    await limit.acquire()
                    limit.release()
                    nursery.start_soon(one, message)
            return outcomes

        return self._thread.call_sync(all_of_them)
