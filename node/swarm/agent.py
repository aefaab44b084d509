"""The daemon's replica of the swarm state, kept in sync over the mesh; the asyncio side.

`SwarmAgent` owns a `crdt.Replica` (on the asyncio thread, as DESIGN.md says) and a
`SyncWire` on the trio thread; frames cross the bridge as bytes. It

- writes our member record (renewing its lease every lease/3), our load and our measured
  RTTs, and pushes each local change at once to the peers of the member map (up to `fanout`);
- every `sync_interval` runs one push-pull anti-entropy exchange with a random peer (which
  also measures the RTT to it), reaps expired leases, and compacts the document when it
  grows past `compact_bytes`;
- with `rebalance`, asks `node.placement` whether this daemon should serve another span,
  and calls `on_move` when the answer stays yes for `rebalance_checks` intervals (more for
  a peer ranked lower among the would-be movers: it sees the first mover's new span first).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from crdt import BadUpdateError, Load, Member, Replica, decode_frame, encode_frame
from node.mesh.bridge import TrioThread
from node.mesh.identity import Libp2pSigner, Libp2pVerifier
from node.mesh.sync import SyncWire
from node.plan.peers import PeerView, peers_from_members
from node.plan.placement import DEFAULT_FACTOR, choose_span, mover_rank, propose_move

__all__ = ["SwarmAgent", "SwarmConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmConfig:
    lease_s: float = 30.0
    sync_interval_s: float = 2.0
    fanout: int = 8  # peers each local change is pushed to
    compact_bytes: int = 1 << 20
    rebalance: bool = False
    rebalance_factor: float = DEFAULT_FACTOR
    rebalance_checks: int = 3  # consecutive intervals an imbalance must last before the first mover moves


class SwarmAgent:
    def __init__(
        self,
        bridge: TrioThread,
        host: object,
        member: Member,
        config: SwarmConfig,
        *,
        bootstrap: Sequence[tuple[str, str]] = (),  # (peer id, multiaddr)
        load: Callable[[], Load] | None = None,
        on_move: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> None:
        self.bridge = bridge
        self.config = config
        self.replica = Replica(Libp2pVerifier(), Libp2pSigner.of_host(host))  # signs as the host's peer id
        self.member = member
        self.bootstrap = list(bootstrap)
        self._load_fn = load
        self._on_move = on_move
        self._rtts: dict[str, float] = {}  # peer -> ms, smoothed
        self._rtts_written: dict[str, float] = {}
        self._renewed_at = 0.0
        self._tasks: asyncio.TaskGroup | None = None  # the daemon's: pushes and moves run in it
        self.sync_bytes_in = 0  # sync frames received (metrics)
        self.sync_bytes_out = 0  # sync frames we opened conversations with (metrics)
        self._imbalanced_for = 0
        self._cooldown = 0
        self._moving = False
        self.wire: SyncWire | None = None
        self._host = host
        self.changed = asyncio.Event()  # set on every change of the view (for waiters)

    @property
    def peer_id(self) -> str:
        return self.member.peer_id

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Install the sync protocol and exchange with the bootstrap peers; then `run()` the rounds.
        Pushes of local changes and moves run as tasks of `tasks` (the daemon's root group)."""
        self._tasks = tasks
        loop = asyncio.get_running_loop()

        async def respond(sender: str, data: bytes) -> bytes | None:
            return await TrioThread.to_asyncio(loop, self._on_frame, sender, data)

        self.wire = SyncWire(self._host, respond)  # type: ignore[arg-type]
        await self.bridge.call(self.wire.install)
        self._write_member()
        await asyncio.gather(*(self._exchange(pid, [addr]) for pid, addr in self.bootstrap))

    async def stop(self, leave: bool = True) -> None:
        """After the rounds were cancelled: with `leave`, remove our records and tell the peers (a clean exit)."""
        self._tasks = None  # no more background pushes: the group is winding down
        if leave:
            self.replica.leave()
            await self._flush()

    # -- our records -------------------------------------------------------------------------

    def update_member(self, **fields: object) -> None:
        """Change fields of our record (span, state, ...) and push the change now."""
        self.member = replace(self.member, **fields)  # type: ignore[arg-type]
        self._write_member()
        self._schedule_flush()

    def _write_member(self) -> None:
        now = time.time()
        self.member = replace(self.member, lease_until=now + self.config.lease_s)
        self.replica.set_member(self.member)
        self._renewed_at = now

    def _write_load(self) -> None:
        if self._load_fn is None:
            return
        load = self._load_fn()
        if self.replica.state.loads().get(self.peer_id) != load:
            self.replica.set_load(load)

    def _write_rtts(self) -> None:
        rounded = {p: round(ms, 2) for p, ms in self._rtts.items() if p in self.replica.state.members()}
        if rounded != self._rtts_written:
            self.replica.set_rtts(rounded)
            self._rtts_written = rounded

    # -- the view ----------------------------------------------------------------------------

    def members(self) -> dict[str, Member]:
        return self.replica.state.members()

    def servers(self, model_id: str | None = None) -> list[PeerView]:
        return peers_from_members(self.members(), model_id or self.member.model_id, time.time())

    def choose_span(self, model_id: str, num_layers: int, length: int) -> tuple[int, int]:
        """The weakest window of the swarm's current view (the blocks nobody serves first)."""
        from node.plan.placement import block_capacity

        capacity = block_capacity((s for s in self.servers(model_id) if s.peer_id != self.peer_id), num_layers)
        return choose_span(capacity, length)

    # -- sync --------------------------------------------------------------------------------

    async def _on_frame(self, sender: str, data: bytes) -> bytes | None:
        self.sync_bytes_in += len(data)
        try:
            answer = self.replica.receive(decode_frame(data), sender)  # per-peer limits by its authenticated id
        except BadUpdateError as e:
            log.info("refusing a sync frame: %s", e)
            return None
        self.changed.set()
        self._schedule_flush()  # adopting an epoch rewrites our records: tell the others
        return encode_frame(answer) if answer is not None else None

    def _targets(self, count: int) -> list[tuple[str, list[str]]]:
        peers = {pid: list(m.p2p_addresses) for pid, m in self.members().items() if pid != self.peer_id}
        for pid, addr in self.bootstrap:
            peers.setdefault(pid, [addr])
        chosen = random.sample(sorted(peers), min(count, len(peers)))
        return [(pid, peers[pid]) for pid in chosen]

    async def _exchange(self, peer_id: str, addrs: list[str], frame: bytes | None = None) -> None:
        assert self.wire is not None
        first = frame if frame is not None else encode_frame(self.replica.pull())
        self.sync_bytes_out += len(first)
        rtt = await self.bridge.call(self.wire.exchange, peer_id, addrs, first)
        if rtt is not None and frame is None:
            ms = rtt * 1000
            old = self._rtts.get(peer_id)
            self._rtts[peer_id] = ms if old is None else min(ms, 0.5 * old + 0.5 * ms)

    def _schedule_flush(self) -> None:
        """Push local changes soon, in a task of the daemon's group (before start or while stopping,
        the next round or the leaving flush carries them)."""
        if self._tasks is not None:
            self._tasks.create_task(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (OSError, RuntimeError) as e:  # a task of the root group must not take the daemon down
            log.warning("pushing our swarm-state changes failed: %r", e)

    async def _flush(self) -> None:
        """Push our local changes (merged) to up to `fanout` peers."""
        update = self.replica.take_outbox()
        if update is None:
            return
        frame = encode_frame(self.replica.push(update))
        await asyncio.gather(*(self._exchange(pid, addrs, frame) for pid, addrs in self._targets(self.config.fanout)))

    async def run(self) -> None:
        """The rounds, every `sync_interval` (jittered), until cancelled."""
        interval = self.config.sync_interval_s
        while True:
            await asyncio.sleep(interval * random.uniform(0.75, 1.25))  # no lockstep between daemons
            try:
                await self.tick()
            except Exception:  # keep syncing whatever one round did
                log.exception("swarm-state round failed")

    async def tick(self) -> None:
        """One round: renew, write load, reap, one anti-entropy exchange, compact, maybe rebalance."""
        now = time.time()
        if now - self._renewed_at >= self.config.lease_s / 3:
            self._write_member()
            self._write_rtts()
        self._write_load()
        reaped = self.replica.reap(now)
        if reaped:
            log.info("reaped the expired leases of %s", ", ".join(reaped))
        targets = self._targets(1)
        if targets:
            await self._exchange(*targets[0])
        self.replica.maybe_compact(self.config.compact_bytes)
        await self._flush()
        self.changed.set()
        if self.config.rebalance and not self._moving:
            await self._consider_moving()

    # -- rebalancing -------------------------------------------------------------------------

    async def _consider_moving(self) -> None:
        if self._cooldown > 0:
            self._cooldown -= 1
            return
        m = self.member
        if m.state != "serving" or not m.num_layers:
            return
        servers = self.servers()
        rank = mover_rank(servers, self.peer_id, m.num_layers, self.config.rebalance_factor)
        if rank is None:
            self._imbalanced_for = 0
            return
        self._imbalanced_for += 1
        if self._imbalanced_for < self.config.rebalance_checks * (1 + rank):
            return
        move = propose_move(servers, self.peer_id, m.num_layers, self.config.rebalance_factor)
        if move is None or self._on_move is None:
            return
        log.info(
            "moving from layers %d:%d to %d:%d: the swarm's weakest block goes from %.2f to %.2f tokens/s",
            m.start,
            m.end,
            move.start,
            move.end,
            move.bottleneck_before,
            move.bottleneck_after,
        )
        if self._tasks is None:
            return
        self._moving = True  # the move runs beside the rounds: leases must be renewed while it drains
        self._tasks.create_task(self._move(move.start, move.end), name="moemesh-move")

    async def _move(self, start: int, end: int) -> None:
        assert self._on_move is not None
        try:
            await self._on_move(start, end)
        except Exception:  # the daemon reports how; we keep syncing
            log.exception("moving to layers %d:%d failed", start, end)
        finally:
            self._moving = False
            self._imbalanced_for = 0
            self._cooldown = 4 * self.config.rebalance_checks
