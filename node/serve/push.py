"""Server-to-server push: a hop sends its output straight to the next hop's session.

A client that opens a session along a whole chain (`OpenSession.push`) puts the rest of the
chain in each step (`Step.route`: each next hop's address, session and push token). A hop
that has run a step pushes its output to `route[0]` as that session's step, with `route[1:]`
as its route, and answers its own client as always: that answer is the client's copy of the
next hop's input, which is what failover replays. So a token costs one network leg per hop
plus one back to the client, where a client relaying every hop's output pays two per hop.

`Pusher` holds one link per next-hop address: a client-streaming `Push` call over a channel
TLS pinned to the fingerprint in the address (as a client's: `node.tls`), dialed on first
use, ended after `idle_s` without pushes. Sending never waits on the next hop: each link
writes from its own queue, so a next hop that hangs holds up nothing but its own link. When
a link fails, every step it had not delivered is reported back to the session it came from
(`StepResult.push_error`), and the client relays that step itself.

A next hop behind NAT is named by its peer id, `p2p:<peer-id>#fingerprint` (`node.tls`):
only a libp2p host can reach it, over a tunnel of its own (a daemon's: `node.mesh.outbound`),
given to the Pusher as `dial`. The link then runs through that tunnel, opened when the link
starts and closed when it ends, with TLS pinned to the fingerprint end to end and the swarm
key proved to it as on a direct link. A server without a libp2p host (`moemesh serve`) fails
such a link at once, so the client relays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import grpc

from node.errors import MoemeshError
from node.swarmkey import GRPC_METADATA, SwarmKey
from node.tls import TLS_NAME, channel_credentials, p2p_peer, split_pin
from protocol import grpc_options
from protocol.shard_pb2 import PushedStep, PushSummary

__all__ = ["Dial", "PushFailed", "Pusher"]

log = logging.getLogger(__name__)
PUSH_METHOD = "/moemesh.v1.Shard/Push"
PushFailed = Callable[[str], None]  # told why, when a step could not be delivered
Dial = Callable[[str], AbstractAsyncContextManager[str]]  # peer id -> a local host:port reaching it, while open


@dataclass
class _Link:
    """One Push call to one next-hop address, fed from a queue by `Pusher.push`."""

    address: str
    queue: asyncio.Queue[tuple[PushedStep, PushFailed] | None] = field(default_factory=asyncio.Queue)
    closed: bool = False  # its call ended (idle, or failed): a new push makes a new link
    unsent: list[PushFailed] = field(default_factory=list)  # taken off the queue, delivery not known


class Pusher:
    """Outgoing pushes of one server, one link per next-hop address (on the serving loop)."""

    def __init__(
        self,
        max_message_bytes: int,
        insecure_lan: bool = False,
        *,
        idle_s: float = 60.0,
        swarm_key: SwarmKey | None = None,
        dial: Dial | None = None,
    ) -> None:
        self._options = grpc_options(max_message_bytes)
        self._insecure_lan = insecure_lan
        self._swarm_key = swarm_key  # a private swarm: each link proves it, as clients' calls do
        self._idle_s = idle_s
        self._dial = dial  # tunnels to peers behind NAT (a daemon's libp2p host); None: we have none
        self._links: dict[str, _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def push(self, address: str, message: PushedStep, failed: PushFailed) -> None:
        """Send `message` to the server at `address` ("host:port#fingerprint", or
        "p2p:<peer-id>#fingerprint" behind NAT); `failed` is called with the reason if it cannot
        be delivered. Never waits."""
        link = self._links.get(address)
        if link is None or link.closed:
            link = self._links[address] = _Link(address)
            task = asyncio.get_running_loop().create_task(self._run(link), name=f"moemesh-push-{address}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        link.queue.put_nowait((message, failed))

    async def _channel(self, target: str, pin: str) -> grpc.aio.Channel:
        if not pin:
            if not self._insecure_lan:
                raise MoemeshError(f"{target} has no TLS fingerprint to pin (plaintext only on an insecure LAN)")
            return grpc.aio.insecure_channel(target, options=self._options)
        loop = asyncio.get_running_loop()
        credentials, _ = await loop.run_in_executor(None, channel_credentials, target, pin, 10.0)
        options = [*self._options, ("grpc.ssl_target_name_override", TLS_NAME)]
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def _open(self, address: str, stack: contextlib.AsyncExitStack) -> tuple[grpc.aio.Channel, str]:
        """A channel to `address` (closed with `stack`, after it the tunnel it may need), and the pin."""
        target, pin = split_pin(address)
        peer = p2p_peer(target)
        if peer is not None:  # behind NAT: only a libp2p host reaches it
            if self._dial is None:
                raise MoemeshError("this server has no libp2p host to reach a peer behind NAT (a daemon has one)")
            target = await stack.enter_async_context(self._dial(peer))
        channel = await self._channel(target, pin)
        stack.push_async_callback(channel.close)
        return channel, pin

    async def _requests(self, link: _Link) -> AsyncIterator[PushedStep]:
        while True:
            try:
                item = await asyncio.wait_for(link.queue.get(), self._idle_s)
            except TimeoutError:
                item = None
            if item is None:
                link.closed = True
                return
            message, failed = item
            link.unsent = [failed]  # the one before it was written: the next hop has it (or will fail)
            yield message

    async def _run(self, link: _Link) -> None:
        why = ""
        try:
            async with contextlib.AsyncExitStack() as stack:
                channel, pin = await self._open(link.address, stack)
                call = channel.stream_unary(
                    PUSH_METHOD,
                    request_serializer=PushedStep.SerializeToString,
                    response_deserializer=PushSummary.FromString,
                )
                metadata = None
                if self._swarm_key is not None:  # bound to the next hop's fingerprint ("" on an insecure LAN)
                    metadata = [(GRPC_METADATA, self._swarm_key.grpc_proof(pin))]
                summary = await call(self._requests(link), metadata=metadata)
                if summary.dropped:
                    log.info("push link to %s: %d steps dropped there", link.address, summary.dropped)
        except grpc.RpcError as e:
            why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
        except MoemeshError as e:
            why = str(e)
        finally:
            link.closed = True
        if why:  # tell the sessions whose steps may not have arrived: their clients relay them
            log.info("pushing to %s failed: %s", link.address, why)
            failed = link.unsent
            while not link.queue.empty():
                item = link.queue.get_nowait()
                if item is not None:
                    failed.append(item[1])
            for tell in failed:
                tell(f"pushing to {link.address} failed: {why}")

    async def aclose(self) -> None:
        """End every link (their queued pushes are reported as failed)."""
        for link in self._links.values():
            link.queue.put_nowait(None)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
