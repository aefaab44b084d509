"""Model weights over libp2p streams (`/moemesh/weights/1.0.0`), trio side.

    fetching peer                                   providing peer
    WeightsSession.manifest(model id)  ==stream==>  WeightsServer: the canonical manifest + groups held
    WeightsSession.chunk(name, offset, length) ==>  those bytes of a tensor (or tokenizer file) it holds

A stream carries any number of request/response pairs (`protocol/weights.proto`, each a
length-prefixed frame). Every request is bounded (its size, a chunk's length, the range inside
the tensor), and a request the server will not answer gets an error response, never a crash;
a malformed frame resets the stream. Streams ride whatever connection the host has (direct,
relayed, hole-punched), so a provider behind NAT serves weights as it serves the gRPC tunnel.
What the server holds is read per request from `holding()`: it grows while the daemon fetches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from node.errors import BadWeights, FrameError, KeyRefused, PeerRefused, PeerTimeout, PeerUnavailable
from node.mesh.frames import read_frame, write_frame
from node.mesh.keyed import guard, open_keyed
from protocol.weights_pb2 import ChunkRequest, ManifestRequest, WeightsRequest, WeightsResponse
from shards.manifest import Manifest

__all__ = ["WEIGHTS_PROTOCOL", "Holding", "WeightsConfig", "WeightsServer", "WeightsSession", "install", "open_session"]

log = logging.getLogger(__name__)
WEIGHTS_PROTOCOL = TProtocol("/moemesh/weights/1.0.0")
MAX_CHUNK_BYTES = 4 << 20
MAX_REQUEST_BYTES = 4096
MAX_MANIFEST_BYTES = 256 << 20


@dataclass(frozen=True)
class WeightsConfig:
    max_streams: int = 32  # concurrent weight streams served
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    idle_timeout_s: float = 30.0  # a stream with no request for this long is closed
    request_timeout_s: float = 60.0  # client side: one answer
    corrupt: bool = False  # tests only: flip a byte of every tensor chunk served
    delay_s: float = 0.0  # tests only: wait this long before each chunk served (a slow provider)


@dataclass(frozen=True)
class Holding:
    """What this peer can serve now: one model's manifest and the verified tensors it has on disk."""

    manifest: Manifest
    tensors: Mapping[str, tuple[Path, int, int]]  # name -> (file, absolute offset, length)
    files: Mapping[str, Path] = field(default_factory=dict)  # tokenizer files by manifest name
    groups: tuple[str, ...] = ()  # groups held whole (what we announce)
    canonical: bytes = b""

    @property
    def model_id(self) -> str:
        return self.manifest.model_id


HoldingSource = Callable[[], Holding | None]


def _pread(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


class WeightsServer:
    def __init__(self, host: IHost, config: WeightsConfig, holding: HoldingSource) -> None:
        self.host, self.config, self.holding = host, config, holding
        self.active = 0
        self.served_bytes = 0

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        if self.active >= self.config.max_streams:
            log.warning("refusing a weights stream from %s: %d open already", peer, self.active)
            await stream.reset()
            return
        self.active += 1
        try:
            while True:
                with trio.move_on_after(self.config.idle_timeout_s):
                    frame = await read_frame(stream, MAX_REQUEST_BYTES)
                    if frame is None:
                        break
                    await write_frame(stream, (await self.answer(frame)).SerializeToString())
                    continue
                break  # idle too long
            await stream.close()
        except Exception as e:  # the peer broke the stream or its framing: drop it, keep serving others
            log.info("weights stream from %s ended: %r", peer, e)
            with trio.CancelScope(shield=True):
                await stream.reset()
        finally:
            self.active -= 1

    async def answer(self, frame: bytes) -> WeightsResponse:
        """The response to one request frame; a request we will not serve gets `error` set."""
        request = WeightsRequest()
        try:
            request.ParseFromString(frame)
        except DecodeError:
            return WeightsResponse(error="malformed request")
        holding = self.holding()
        kind = request.WhichOneof("what")
        model_id = request.manifest.model_id if kind == "manifest" else request.chunk.model_id
        if holding is None or model_id != holding.model_id:
            return WeightsResponse(error=f"no weights of model {model_id[:64]!r} here")
        if kind == "manifest":
            return WeightsResponse(manifest=holding.canonical, groups=list(holding.groups))
        if kind != "chunk":
            return WeightsResponse(error="unknown request")
        chunk = request.chunk
        if chunk.file:
            where = holding.files.get(chunk.name)
            entry = next((f for f in holding.manifest.files if f.name == chunk.name), None)
            located = (where, 0, entry.size) if where is not None and entry is not None else None
        else:
            located = holding.tensors.get(chunk.name)
        if located is None:
            return WeightsResponse(error=f"{chunk.name[:200]!r} is not held here")
        path, base, length = located
        if not 0 < chunk.length <= self.config.max_chunk_bytes:
            return WeightsResponse(error=f"chunk length {chunk.length} outside 1..{self.config.max_chunk_bytes}")
        if chunk.offset + chunk.length > length:
            return WeightsResponse(
                error=f"bytes {chunk.offset}+{chunk.length} outside {chunk.name[:200]!r} ({length} B)"
            )
        try:
            data = await trio.to_thread.run_sync(_pread, path, base + chunk.offset, chunk.length)
        except OSError as e:
            log.warning("reading %s for a peer: %s", path, e)
            return WeightsResponse(error="cannot read it here")
        if self.config.delay_s:
            await trio.sleep(self.config.delay_s)
        if self.config.corrupt and not chunk.file and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.served_bytes += len(data)
        return WeightsResponse(data=data)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


def install(host: IHost, config: WeightsConfig, holding: HoldingSource) -> WeightsServer:
    """Serve `WEIGHTS_PROTOCOL` on `host` from what `holding()` returns when each request arrives."""
    server = WeightsServer(host, config, holding)
    host.set_stream_handler(WEIGHTS_PROTOCOL, guard(host, WEIGHTS_PROTOCOL, server.handle))  # a private swarm's key
    return server


class WeightsSession:
    """One stream to one provider; requests go one after another on it."""

    def __init__(self, stream: INetStream, peer: str, config: WeightsConfig) -> None:
        self.stream, self.peer, self.config = stream, peer, config

    async def _ask(self, request: WeightsRequest, limit: int) -> WeightsResponse:
        try:
            with trio.fail_after(self.config.request_timeout_s):
                await write_frame(self.stream, request.SerializeToString())
                frame = await read_frame(self.stream, limit)
        except trio.TooSlowError:
            raise PeerTimeout(self.peer, "no weights answer in time") from None
        except FrameError:
            raise
        except Exception as e:  # the stream broke (the provider died, the connection dropped)
            raise PeerUnavailable(self.peer, f"weights stream broke: {e!r}") from None
        if frame is None:
            raise PeerUnavailable(self.peer, "the provider closed the weights stream")
        response = WeightsResponse()
        try:
            response.ParseFromString(frame)
        except DecodeError:
            raise FrameError(f"{self.peer} sent a malformed weights response") from None
        if response.error:
            raise PeerRefused(self.peer, grpc.StatusCode.NOT_FOUND, response.error[:300])
        return response

    async def manifest(self, model_id: str) -> tuple[Manifest, tuple[str, ...]]:
        """The provider's manifest of `model_id` (checked against the id) and the groups it holds."""
        response = await self._ask(WeightsRequest(manifest=ManifestRequest(model_id=model_id)), MAX_MANIFEST_BYTES)
        manifest = Manifest.from_bytes(response.manifest)
        if manifest.model_id != model_id:
            raise BadWeights(f"{self.peer} sent the manifest of {manifest.model_id}, not of {model_id}")
        return manifest, tuple(response.groups)

    async def chunk(self, model_id: str, name: str, offset: int, length: int, file: bool = False) -> bytes:
        request = WeightsRequest(
            chunk=ChunkRequest(model_id=model_id, name=name, offset=offset, length=length, file=file)
        )
        data = (await self._ask(request, length + 64)).data
        if len(data) != length:
            raise BadWeights(f"{self.peer} sent {len(data)} bytes of {name}, not {length}")
        return data

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.stream.close()
            except Exception as e:  # already broken: nothing left to close
                log.debug("closing the weights stream to %s: %r", self.peer, e)


async def open_session(host: IHost, peer_id: str, config: WeightsConfig) -> WeightsSession:
    """A weights stream to `peer_id` over whatever connection the host has or can dial."""
    try:
        with trio.fail_after(config.request_timeout_s):
            stream = await open_keyed(host, ID.from_base58(peer_id), WEIGHTS_PROTOCOL)
    except trio.TooSlowError:
        raise PeerTimeout(peer_id, "opening a weights stream timed out") from None
    except KeyRefused as e:  # not of our private swarm
        raise PeerUnavailable(peer_id, str(e)) from None
    except Exception as e:  # libp2p raises several types for an unreachable peer
        raise PeerUnavailable(peer_id, f"cannot open a weights stream: {e!r}") from None
    return WeightsSession(stream, peer_id, config)
