"""Hole punching (DCUtR, `/libp2p/dcutr`) and how we are connected to each peer.

DCUtR runs on every node: py-libp2p's service drives it on every relayed connection.
Relayed connections are kept after an upgrade, because tunnel streams opened on them must
not be cut; new streams prefer the direct connection. `path(peer)` says whether we reach a
peer directly, through a punched hole or through a relay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL
from libp2p.tools.anyio_service import background_trio_service

from node.mesh.internals import KeepRelayDCUtR, hole_punch_attempts

__all__ = [
    "DCUTR_PROTOCOL",
    "DIRECT",
    "HOLE_PUNCHED",
    "NOT_CONNECTED",
    "RELAYED",
    "HolePunch",
    "HolePunchConfig",
    "install",
]

log = logging.getLogger(__name__)

DIRECT = "direct"
HOLE_PUNCHED = "hole-punched"
RELAYED = "relayed"
NOT_CONNECTED = "not connected"


@dataclass(frozen=True)
class HolePunchConfig:
    report_interval_s: float = 3.0  # how often failed hole punches are looked for (and logged once)


class HolePunch:
    """The DCUtR service and the record of which peers we first reached through a relay."""

    def __init__(self, host: IHost, config: HolePunchConfig) -> None:
        self.host = host
        self.config = config
        self.dcutr = KeepRelayDCUtR(host)
        self._relayed_peers: set[ID] = set()  # peers we have had a relayed connection with
        self._reported: set[ID] = set()

    def relayed(self, peer: ID) -> None:
        """Note that we reached `peer` through a relay (so a direct connection later is a punched hole)."""
        self._relayed_peers.add(peer)

    def path(self, peer: ID) -> str:
        kinds = {c.get_connection_type() for c in self.host.get_network().get_connections(peer)}
        if ConnectionType.RELAYED in kinds:
            self._relayed_peers.add(peer)
        if kinds - {ConnectionType.RELAYED}:
            return HOLE_PUNCHED if peer in self._relayed_peers else DIRECT
        return RELAYED if kinds else NOT_CONNECTED

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dcutr):
            task_status.started()
            while True:
                await trio.sleep(self.config.report_interval_s)
                self._report_failures()

    def _report_failures(self) -> None:
        network = self.host.get_network()
        for peer, attempts in hole_punch_attempts(self.dcutr).items():
            if peer in self._reported or attempts < MAX_HOLE_PUNCH_ATTEMPTS:
                continue
            if network.get_connections(peer) and self.path(peer) == RELAYED:
                self._reported.add(peer)
                log.warning(
                    "hole punching to %s failed %d times: staying relayed (a NAT that changes ports between"
                    " destinations, or one that refuses simultaneous opens, cannot be punched)",
                    peer,
                    attempts,
                )


def install(host: IHost, config: HolePunchConfig) -> HolePunch:
    """Register DCUtR on `host` (when run) and return the path keeper."""
    return HolePunch(host, config)
