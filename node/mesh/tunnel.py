"""gRPC over a libp2p stream, for peers that cannot be dialed directly (behind NAT).

    client process                                         serving daemon
    gRPC channel -> 127.0.0.1:L -> TunnelClient ==stream==> TunnelServer -> its own gRPC port

Each TCP connection accepted on the local listener becomes one libp2p stream on
`TUNNEL_PROTOCOL` (Noise-encrypted, yamux-multiplexed, relayed or hole-punched: whatever
connection the host has to the peer); the serving side pipes it to its own gRPC port.
The bytes are gRPC's own, so the RPC code does not know which path it took.

Resources are bounded on both sides (concurrent tunnelled connections, connect time,
64 KiB in flight per direction). A side that finishes sending half-closes (TCP FIN <->
stream close_write), so the other side reads to its end; an error on either leg resets
the stream and closes the socket. Everything here runs on trio (the host's thread).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from node.mesh.bridge import unwrap
from node.mesh.internals import close_write
from node.mesh.keyed import guard, open_keyed

__all__ = ["TUNNEL_PROTOCOL", "Target", "TunnelClient", "TunnelConfig", "TunnelServer", "install_server", "splice"]

log = logging.getLogger(__name__)
TUNNEL_PROTOCOL = TProtocol("/moemesh/grpc-tunnel/1.0.0")
CHUNK = 64 * 1024


@dataclass(frozen=True)
class TunnelConfig:
    max_connections: int = 32  # concurrent tunnelled TCP connections, per side (per peer on the client)
    connect_timeout_s: float = 15.0  # to open the stream (dial included) or the local gRPC port


async def _stream_to_tcp(stream: INetStream, tcp: trio.SocketStream) -> None:
    while True:
        try:
            data = await stream.read(CHUNK)
        except StreamEOF:
            break
        if not data:
            break
        await tcp.send_all(data)
    await tcp.send_eof()


async def _tcp_to_stream(tcp: trio.SocketStream, stream: INetStream) -> None:
    while True:
        data = await tcp.receive_some(CHUNK)
        if not data:
            break
        await stream.write(data)
    await close_write(stream)


async def splice(stream: INetStream, tcp: trio.SocketStream, what: str) -> None:
    """Pipe both ways until both sides have finished; on any error reset the stream."""
    ok = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stream_to_tcp, stream, tcp)
            nursery.start_soon(_tcp_to_stream, tcp, stream)
        ok = True
    except Exception as e:  # the peer or the local side broke the connection
        log.debug("tunnel %s broke: %r", what, unwrap(e))
    finally:
        with trio.CancelScope(shield=True):
            if ok:
                await stream.close()
            else:
                await stream.reset()
            await tcp.aclose()


Target = Callable[[], tuple[str, int] | None]  # where our gRPC server listens now (None: not serving)


class TunnelServer:
    """Serving side: each tunnel stream is piped to our own gRPC port, as `target` names it
    when the stream arrives (a daemon's server may start late, or move to another port)."""

    def __init__(self, host: IHost, target: Target, config: TunnelConfig | None = None) -> None:
        self.host = host
        self.target = target
        self.config = config or TunnelConfig()
        self.active = 0

    async def handle(self, stream: INetStream) -> None:
        """The handler of one tunnel stream: piped to `target()` as it is now."""
        peer = stream.muxed_conn.peer_id
        target = self.target()
        if target is None:
            log.warning("refusing a tunnel from %s: we serve no gRPC port (yet)", peer)
            await stream.reset()
            return
        if self.active >= self.config.max_connections:
            log.warning("refusing a tunnel from %s: %d tunnels open already", peer, self.active)
            await stream.reset()
            return
        self.active += 1
        try:
            try:
                with trio.fail_after(self.config.connect_timeout_s):
                    tcp = await trio.open_tcp_stream(*target)
            except (OSError, trio.TooSlowError) as e:
                log.warning("tunnel from %s: our gRPC port %s:%d does not answer: %r", peer, *target, e)
                await stream.reset()
                return
            await splice(stream, tcp, f"from {peer}")
        finally:
            self.active -= 1

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


def install_server(host: IHost, config: TunnelConfig, target: Target) -> TunnelServer:
    """Serve `TUNNEL_PROTOCOL` on `host`, piping each stream to `target()` read per stream."""
    server = TunnelServer(host, target, config)
    host.set_stream_handler(TUNNEL_PROTOCOL, guard(host, TUNNEL_PROTOCOL, server.handle))
    return server


class TunnelClient:
    """Client side: a loopback listener per remote peer; `connect(peer)` makes sure a libp2p
    connection to it exists (direct, relayed, ...) before each stream is opened."""

    def __init__(
        self, host: IHost, connect: Callable[[ID], Awaitable[None]], config: TunnelConfig | None = None
    ) -> None:
        self.host = host
        self.connect = connect
        self.config = config or TunnelConfig()
        self.active: dict[ID, int] = {}

    async def listen(self, peer_id: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve a loopback listener for `peer_id`; reports its port when started; runs until cancelled."""
        peer = ID.from_base58(peer_id)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        log.info("tunnel to %s listening on 127.0.0.1:%d", peer_id, port)
        task_status.started(port)
        await trio.serve_listeners(partial(self._accept, peer), listeners)

    async def _accept(self, peer: ID, tcp: trio.SocketStream) -> None:
        if self.active.get(peer, 0) >= self.config.max_connections:
            log.warning("refusing a local connection to the tunnel of %s: %d open already", peer, self.active[peer])
            await tcp.aclose()
            return
        self.active[peer] = self.active.get(peer, 0) + 1
        try:
            try:
                with trio.fail_after(self.config.connect_timeout_s):
                    await self.connect(peer)
                    stream = await open_keyed(self.host, peer, TUNNEL_PROTOCOL)
            except Exception as e:  # libp2p raises several types for an unreachable peer
                log.warning("tunnel to %s: cannot open a stream: %r", peer, unwrap(e))
                await tcp.aclose()
                return
            await splice(stream, tcp, f"to {peer}")
        finally:
            self.active[peer] -= 1
