"""Tunnels a daemon opens itself to peers behind NAT, for its server-to-server pushes.

    hop k's Pusher (asyncio) -> 127.0.0.1:L -> TunnelClient ==libp2p==> hop k+1's TunnelServer

A push target behind NAT is `p2p:<peer-id>#fingerprint` (`node.serve.push`): only a libp2p
host reaches it. `PushTunnels.open(peer_id)` is the Pusher's `dial`: it makes sure our host
is connected to the peer (kept if it is, else dialed at the addresses of its signed record:
through its relays, upgraded by hole punching when the NATs allow), then serves a loopback
listener whose connections become tunnel streams to it, until the push link ends. The gRPC
bytes inside are the link's own: TLS pinned to the fingerprint end to end, as a client's
tunnel is (`node.mesh.reader.SwarmReader.tunnel`). Everything but `open` runs on trio.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
from libp2p.peer.id import ID

from node.errors import MoemeshError
from node.mesh.bridge import TrioThread, unwrap
from node.mesh.host import MeshNode
from node.mesh.reader import addresses_to_dial
from node.mesh.records import is_live, now_ms, verify_record
from node.mesh.tunnel import TunnelClient, TunnelConfig

__all__ = ["PushTunnels"]

log = logging.getLogger(__name__)


class PushTunnels:
    """Loopback tunnels of one daemon's host to peers behind NAT, one per open push link."""

    def __init__(
        self,
        bridge: TrioThread,
        node: MeshNode,
        config: TunnelConfig | None = None,
        reach_timeout_s: float = 45.0,
        max_tunnels: int = 64,
    ) -> None:
        self._bridge = bridge
        self._node = node
        self.config = config or TunnelConfig()
        self.reach_timeout_s = reach_timeout_s  # the record's lookup (~20 s for a NAT'd peer) and the dial
        self._client = TunnelClient(node.host, self._connect, self.config)
        self._scopes: dict[int, trio.CancelScope] = {}  # open listeners, cancelled when their link ends
        self._ids = itertools.count()
        self._reached: set[ID] = set()  # peers dialed at their record's addresses (the Nat keeps them)
        self.max_tunnels = max_tunnels  # open at once (being opened included)
        self.active = 0  # open now, or being opened (counted on the asyncio side)
        self.opened = 0  # statistics: tunnels opened for pushes

    @asynccontextmanager
    async def open(self, peer_id: str) -> AsyncIterator[str]:
        """(On asyncio) "127.0.0.1:port" reaching `peer_id`'s gRPC port while the context is open.
        MoemeshError when the peer cannot be reached."""
        if self.active >= self.max_tunnels:  # each costs a lookup and a dial: hostile routes must not pile them up
            raise MoemeshError(f"no tunnel to {peer_id[:64]}: {self.active} push tunnels are open already")
        key = next(self._ids)
        self.active += 1
        try:
            try:
                port = await self._bridge.call(self._start, key, peer_id)
            except MoemeshError:
                raise
            except Exception as e:  # libp2p and trio raise several types for an unreachable peer
                raise MoemeshError(f"no tunnel to {peer_id}: {unwrap(e)!r}") from None
            yield f"127.0.0.1:{port}"
        finally:  # never awaits: also when the link is cancelled (or its start was)
            self.active -= 1
            try:
                self._bridge.token.run_sync_soon(self._stop, key)
            except RuntimeError:  # the host is gone (trio.RunFinishedError too), and its listeners with it
                pass

    async def _start(self, key: int, peer_id: str) -> int:
        try:
            peer = ID.from_base58(peer_id)
        except Exception:  # base58 or multihash: a hostile route may name anything
            raise MoemeshError(f"{peer_id[:64]!r} is not a libp2p peer id") from None
        if peer == self._node.host.get_id():
            raise MoemeshError("a push to ourselves over a tunnel")
        with trio.move_on_after(self.reach_timeout_s) as scope:
            await self._connect(peer)
        if scope.cancelled_caught:
            raise MoemeshError(f"cannot reach peer {peer_id} within {self.reach_timeout_s:g} s")
        port: int = await self._bridge.start_service(partial(self._listen, key, peer_id))
        self.opened += 1
        path = self._node.nat.path(peer) if self._node.nat is not None else "direct"
        log.info("push tunnel to %s open on 127.0.0.1:%d (%s)", peer_id, port, path)
        return port

    def _stop(self, key: int) -> None:
        scope = self._scopes.pop(key, None)
        if scope is not None:
            scope.cancel()

    async def _listen(self, key: int, peer_id: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scopes[key] = scope
            try:
                await self._client.listen(peer_id, task_status=task_status)
            except Exception as e:  # in the root nursery: an error here must not end the host
                log.warning("the push tunnel to %s stopped: %r", peer_id, unwrap(e))
            finally:
                self._scopes.pop(key, None)

    async def _connect(self, peer: ID) -> None:
        """A libp2p connection to `peer`: kept if there is one, else dialed where its signed record
        says (the addresses are kept: a link made again after an idle one skips the lookup)."""
        node = self._node
        if node.host.get_network().get_connections(peer):
            return
        if node.nat is None:
            raise MoemeshError(f"cannot reach peer {peer}: this host does no NAT traversal")
        if peer in self._reached:
            try:
                await node.nat.connect(peer)  # where it was last reached
                return
            except MoemeshError as e:  # its relays may have changed: read its record again
                log.info("%s", e)
        pid = peer.to_base58()
        raw = await node.record(pid)
        if raw is None:
            raise MoemeshError(f"cannot reach peer {pid}: no record of it found")
        record = verify_record(raw, peer_id=pid)  # InvalidRecord is a MoemeshError
        if record.withdrawn or not is_live(record, now_ms()):
            raise MoemeshError(f"cannot reach peer {pid}: its record is withdrawn or expired")
        await node.nat.connect(peer, addresses_to_dial(record))
        self._reached.add(peer)
