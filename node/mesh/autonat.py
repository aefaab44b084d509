"""AutoNAT v1: are we reachable from the outside? (`/libp2p/autonat/1.0.0`)

We ask several directly connected peers to dial us back and call ourselves public or
private once `confirmations` of them agree. Our server side dials back on a fresh
connection and proves the peer id with a Noise handshake: py-libp2p's own reuses the
connection the request came on, so every requester would look reachable.

A small swarm has fewer peers than `confirmations`: after `small_swarm_rounds` checks
without a verdict, every peer that answered is enough, as long as they all agree
(`decide`). Until there is a verdict, `why` says what is missing, and the log says it once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from node.mesh.bridge import unwrap
from node.mesh.internals import DialBackAutoNAT, observed_addresses, secure_dial
from protocol.mesh_pb2 import Reachability

__all__ = ["AUTONAT_PROTOCOL", "AutoNAT", "AutoNATConfig", "decide", "direct_peers", "install", "without_p2p"]

log = logging.getLogger(__name__)
AUTONAT_PROTOCOL = AUTONAT_PROTOCOL_ID


@dataclass(frozen=True)
class AutoNATConfig:
    check: bool = True  # find out our reachability (daemons); a client does not need to
    serve: bool = True  # dial others back when they ask
    confirmations: int = 3  # answers that must agree before the verdict changes
    check_interval_s: float = 60.0  # re-check once decided
    retry_interval_s: float = 3.0  # while undecided
    dial_back_timeout_s: float = 5.0
    query_timeout_s: float = 10.0
    max_servers_asked: int = 6
    small_swarm_rounds: int = 3  # undecided after this many checks: all the peers that answered suffice, if unanimous


def decide(current: Reachability, yes: int, no: int, config: AutoNATConfig, rounds: int) -> tuple[Reachability, str]:
    """The verdict from `yes` peers that dialed us back and `no` that could not, after `rounds`
    checks, and why (pure). A verdict changes only when `config.confirmations` peers agree and
    outnumber the others; in a swarm too small for that, once `small_swarm_rounds` checks left
    it undecided, every answering peer counts, if they are unanimous."""
    need = config.confirmations
    small = current == Reachability.REACHABILITY_UNKNOWN and rounds >= config.small_swarm_rounds
    if small and (yes == 0) != (no == 0):  # unanimous, and someone answered
        need = min(need, yes + no)
    if yes >= need and yes > no:
        return Reachability.REACHABILITY_PUBLIC, f"{yes} of {yes + no} peers dialed us back"
    if no >= need and no > yes:
        return Reachability.REACHABILITY_PRIVATE, f"{no} of {yes + no} peers could not dial us back"
    if current != Reachability.REACHABILITY_UNKNOWN:
        return current, f"kept: {yes} of {yes + no} peers dialed us back, {need} must agree to change it"
    if not yes + no:
        return current, "undecided: no peer has answered a dial-back request yet"
    if yes and no:
        return current, f"undecided: {yes} peers dialed us back and {no} could not"
    return current, f"undecided: {yes + no} of the {need} agreeing answers needed (--autonat-confirmations)"


def without_p2p(addr: Multiaddr) -> Multiaddr:
    """`addr` without its trailing `/p2p/<id>` (what a transport dials)."""
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:  # multiaddr raises ProtocolLookupError when absent
        return addr
    return addr.decapsulate(Multiaddr(f"/p2p/{value}")) if value else addr


def direct_peers(host: IHost) -> list[ID]:
    """Connected peers with at least one connection that is not relayed."""
    network = host.get_network()
    return [
        peer
        for peer in host.get_connected_peers()
        if any(c.get_connection_type() != ConnectionType.RELAYED for c in network.get_connections(peer))
    ]


class AutoNAT:
    """Our reachability verdict; `run` re-checks it, `on_change` callbacks hear of each change."""

    def __init__(self, host: IHost, config: AutoNATConfig) -> None:
        self.host = host
        self.config = config
        self.reachability: Reachability = Reachability.REACHABILITY_UNKNOWN
        self.version = 0  # bumped on each change of the verdict
        self.on_change: list[Callable[[Reachability], Awaitable[None]]] = []
        self.service = DialBackAutoNAT(host, self._dial_back, serve=config.serve)
        self._votes: dict[ID, bool] = {}
        self._changed = trio.Event()
        self.rounds = 0  # checks done
        self.why = "undecided: not checked yet"  # the reason of the verdict, or of its absence
        self._said = ""  # the last undecided reason logged

    async def _dial_back(self, peer: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs:
            addr = without_p2p(Multiaddr(raw))
            with trio.move_on_after(self.config.dial_back_timeout_s):
                try:
                    if await secure_dial(self.host, addr, peer):
                        return raw
                except Exception as e:  # unreachable: the answer is E_DIAL_ERROR
                    log.debug("AutoNAT dial-back to %s at %s: %r", peer, addr, e)
        return None

    async def wait_change(self, timeout_s: float) -> None:
        """Until the verdict changes, or `timeout_s` passes."""
        with trio.move_on_after(timeout_s):
            await self._changed.wait()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.config.check:
            await trio.sleep_forever()
        while True:
            await self.check()
            decided = self.reachability != Reachability.REACHABILITY_UNKNOWN
            await trio.sleep(self.config.check_interval_s if decided else self.config.retry_interval_s)

    def _our_addresses(self) -> list[bytes]:
        """Our listen addresses, plus each as an observer sees it (its IP, our listen port)."""
        listen = [without_p2p(a) for a in self.host.get_addrs() if "/p2p-circuit" not in str(a)]
        found = {str(a): a for a in listen}
        for seen in observed_addresses(self.host):
            try:
                ip = seen.value_for_protocol("ip4")
            except Exception:  # not an IPv4 address
                continue
            for addr in listen:
                guess = Multiaddr(f"/ip4/{ip}/tcp/{addr.value_for_protocol('tcp')}")
                found.setdefault(str(guess), guess)
        return [a.to_bytes() for a in found.values()]

    async def check(self) -> None:
        """Ask up to `max_servers_asked` direct peers to dial us back; update the verdict."""
        peers = direct_peers(self.host)
        random.shuffle(peers)
        addrs = self._our_addresses()

        async def ask(peer: ID) -> None:
            try:
                status, _ = await self.service.query_server(peer, addrs=addrs, timeout=self.config.query_timeout_s)
            except Exception as e:  # not an AutoNAT server (a client), or gone: no vote
                log.debug("AutoNAT: %s did not answer: %r", peer, unwrap(e))
                return
            if status == Message.OK:
                self._votes[peer] = True
            elif status in (Message.E_DIAL_ERROR, Message.E_DIAL_REFUSED):
                self._votes[peer] = False

        async with trio.open_nursery() as nursery:
            for peer in peers[: self.config.max_servers_asked]:
                nursery.start_soon(ask, peer)
        yes = sum(self._votes.values())
        no = len(self._votes) - yes
        self.rounds += 1
        verdict, self.why = decide(self.reachability, yes, no, self.config, self.rounds)
        if verdict == self.reachability:
            if verdict == Reachability.REACHABILITY_UNKNOWN and self.rounds >= self.config.small_swarm_rounds:
                if self.why != self._said:  # once per reason: it is re-checked every few seconds
                    log.warning("AutoNAT: no verdict after %d checks (%s)", self.rounds, self.why)
                    self._said = self.why
            return
        self.reachability = verdict
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()
        for callback in self.on_change:
            await callback(verdict)
        shown = ", ".join(str(Multiaddr(a)) for a in addrs)
        if verdict == Reachability.REACHABILITY_PUBLIC:
            log.info("AutoNAT: publicly reachable (%s at %s)", self.why, shown)
        else:
            log.warning(
                "AutoNAT: behind NAT or a firewall (%s at %s); others reach us through relays only", self.why, shown
            )


def install(host: IHost, config: AutoNATConfig) -> AutoNAT:
    """Serve AutoNAT on `host` (with `config.serve`) and return the verdict keeper (run it)."""
    return AutoNAT(host, config)
