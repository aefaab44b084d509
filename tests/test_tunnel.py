"""The gRPC tunnel's serving side pipes each stream to where our gRPC server listens *now*:
installed at host start, before any server exists, it refuses while there is none and
follows the server when it moves to another port (two hosts on loopback)."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from node.mesh.host import MeshConfig, MeshNode, noise_only_host
from node.mesh.tunnel import TunnelClient, TunnelConfig, TunnelServer, install_server

LISTEN = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


async def _tagged_server(tag: bytes, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A TCP server on loopback that answers every connection with `tag`, then closes it."""

    async def answer(stream: trio.SocketStream) -> None:
        await stream.send_all(tag)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


async def _through(port: int) -> bytes:
    """What one local connection to the tunnel's listener receives before it is closed."""
    data = b""
    with trio.fail_after(20):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        await tcp.send_eof()
        try:
            while chunk := await tcp.receive_some(1024):
                data += chunk
        except trio.BrokenResourceError:  # a refused tunnel may end in a reset
            pass
        await tcp.aclose()
    return data


def test_the_tunnel_reaches_the_port_the_target_names_per_connection(caplog: pytest.LogCaptureFixture) -> None:
    target: list[tuple[str, int] | None] = [None]

    async def main() -> None:
        serving = MeshNode(
            create_new_key_pair(),
            MeshConfig(),
            protocols=[partial(install_server, config=TunnelConfig(), target=lambda: target[0])],
        )
        dialer = noise_only_host(create_new_key_pair(), LISTEN)
        async with trio.open_nursery() as nursery, dialer.run(LISTEN):
            addresses = await nursery.start(serving.serve)
            assert [type(p) for p in serving.installed] == [TunnelServer]
            where = PeerInfo(ID.from_base58(serving.peer_id), [Multiaddr(addresses[0])])

            async def connect(peer: ID) -> None:
                await dialer.connect(where)

            client = TunnelClient(dialer, connect)
            port = await nursery.start(partial(client.listen, serving.peer_id))
            with caplog.at_level(logging.WARNING, logger="node.mesh.tunnel"):
                assert await _through(port) == b""  # no gRPC server yet: refused
            assert "we serve no gRPC port" in caplog.text
            first = await nursery.start(_tagged_server, b"first")
            second = await nursery.start(_tagged_server, b"second")
            target[0] = ("127.0.0.1", first)
            assert await _through(port) == b"first"
            target[0] = ("127.0.0.1", second)  # the server moved (a daemon's --port 0 after a move)
            assert await _through(port) == b"second"
            for listener in list(dialer.get_network().listeners.values()):
                await listener.close()
            nursery.cancel_scope.cancel()

    trio.run(main)
