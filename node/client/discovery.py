"""Finding the peers of a model: from the addresses a client was given, or from the swarm's
signed DHT records, each confirmed by the peer's own Info (what it serves, its protocol
version, its measured pace) before a route may use it.

A record names the peer's TLS fingerprint, and every channel to it is pinned to that (only the
record's signer can answer there); a record without one is used only with insecure_lan. A peer
behind NAT is reached through a local tunnel of the client's `SwarmReader` (relayed, or
hole-punched later: `wait_for_hole_punch`), which stays open while the client is.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from node.client.config import ClientConfig
from node.client.known import KnownPeers, NatBlocked
from node.errors import ConfigError, MoemeshError, PeerError, PeerUntrusted, RouteError
from node.plan.peers import PeerInfo, PeerView, check_version, compatible, peers_from_record
from node.plan.routing import Hop
from node.tls import normalize_fingerprint
from protocol import VersionMismatchError

if TYPE_CHECKING:
    from node.mesh.reader import SwarmReader
    from protocol.mesh_pb2 import PeerRecord

__all__ = ["PeerFinder"]

log = logging.getLogger(__name__)


class PeerFinder:
    """The peers of `model_id` (None: the one the given peers serve) at `peers`, or in the swarm
    reached through `bootstrap`; `info(address)` asks one peer its Info."""

    def __init__(
        self,
        peers: Sequence[str],
        bootstrap: Sequence[str],
        model_id: str | None,
        config: ClientConfig,
        info: Callable[[str], PeerInfo],
        pool: concurrent.futures.Executor,
    ) -> None:
        self.peers, self.bootstrap, self.model_id, self.config = list(peers), list(bootstrap), model_id, config
        self._info, self._pool = info, pool
        self._lock = threading.Lock()
        self._reader: SwarmReader | None = None  # kept open: it carries the tunnels to peers behind NAT
        self._tunnelled: dict[str, str] = {}  # loopback address of a tunnel -> peer id
        self._failures: dict[str, PeerError] = {}  # address -> why it last did not answer Info

    def find(self) -> KnownPeers:
        """The model and every peer able to run some of its layers, asked now."""
        return self._from_swarm() if self.bootstrap else self._from_peers()

    def tunnelled_peer(self, address: str) -> str | None:
        """The peer id behind `address` when it is a local tunnel of ours to a peer behind NAT."""
        return self._tunnelled.get(address)

    def path(self, address: str) -> str | None:
        """How a tunnelled `address` reaches its peer now (relayed or hole-punched); None for a peer
        dialed directly."""
        reader, pid = self._reader, self._tunnelled.get(address)
        return reader.path(pid) if reader is not None and pid is not None else None

    def close(self) -> None:
        with self._lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.__exit__(None, None, None)

    def measure(self, addresses: Sequence[str]) -> dict[str, PeerInfo]:
        """Info of each reachable address, with the round trip it took, asked concurrently."""

        def one(address: str) -> PeerInfo:
            started = time.perf_counter()
            info = self._info(address)
            return replace(info, rtt_s=time.perf_counter() - started)

        futures = {address: self._pool.submit(one, address) for address in dict.fromkeys(addresses)}
        answers: dict[str, PeerInfo] = {}
        for address, future in futures.items():
            try:
                answers[address] = future.result()
            except PeerUntrusted as e:
                log.warning("refusing peer: %s", e)
                self._failures[address] = e
            except PeerError as e:
                log.info("peer unavailable: %s", e)
                self._failures[address] = e
        return answers

    def paths(self) -> dict[str, str]:
        """How this client reaches each peer behind NAT that it tunnels to: relayed or hole-punched.
        (Other peers are dialed directly over gRPC.)"""
        reader = self._reader
        if reader is None:
            return {}
        return {pid: reader.path(pid) for pid in set(self._tunnelled.values())}

    def _swarm(self) -> SwarmReader:
        with self._lock:
            if self._reader is None:
                from node.mesh.reader import SwarmReader

                # A DHT lookup of a NAT'd peer's record takes ~20 s in py-libp2p 0.8.1 (it cannot be
                # asked directly): allow for it.
                timeout_s = max(self.config.info_timeout_s, 30.0)
                reader = SwarmReader(self.bootstrap, timeout_s, traversal=True, swarm_key=self.config.swarm_key)
                self._reader = reader.__enter__()
            return self._reader

    def _address_of(self, pid: str, record: PeerRecord) -> str | None:
        """The peer's direct gRPC address, or a local tunnel to it when it is behind NAT, pinned to
        the fingerprint its signed record names ("host:port#fingerprint"): only the signer can
        answer there. A record without one is used only with insecure_lan."""
        from protocol.mesh_pb2 import Reachability

        pin = record.tls_fingerprint
        if pin:
            try:
                pin = normalize_fingerprint(pin)
            except ConfigError:
                log.info("ignoring %s: its record's TLS fingerprint is malformed", pid)
                return None
        elif not self.config.insecure_lan:
            log.info("ignoring %s: it serves plaintext gRPC (pass insecure_lan on a trusted LAN)", pid)
            return None
        if record.reachability != Reachability.REACHABILITY_PRIVATE:
            if not record.grpc_addresses:
                return None
            return f"{record.grpc_addresses[0]}#{pin}" if pin else str(record.grpc_addresses[0])
        if not record.circuit_addresses:
            log.info("ignoring %s: it is behind NAT and has no relay", pid)
            return None
        try:
            address = self._swarm().tunnel(record)  # TLS goes through it end to end
        except MoemeshError as e:
            log.info("ignoring %s: %s", pid, e)
            return None
        address = f"{address}#{pin}" if pin else address
        self._tunnelled[address] = pid
        return address

    def wait_for_hole_punch(self, hops: Sequence[Hop]) -> None:
        from node.mesh.nat import RELAYED

        deadline = time.monotonic() + self.config.hole_punch_wait_s
        tunnelled = {h.peer for h in hops if h.address in self._tunnelled}
        while tunnelled and time.monotonic() < deadline:
            if all(path != RELAYED for pid, path in self.paths().items() if pid in tunnelled):
                return
            time.sleep(0.5)

    def _from_swarm(self) -> KnownPeers:
        """The peers of the swarm's records, each confirmed by its own Info (span and version)."""
        model_id, snapshot = self._swarm().model(self.model_id)
        from protocol.mesh_pb2 import Reachability

        offers: list[PeerView] = []
        refused: list[VersionMismatchError] = []
        behind_nat: list[NatBlocked] = []
        nat_layers = 0  # the model's layers, as the records of peers behind NAT say
        for pid, record in snapshot.records.items():
            views = peers_from_record(pid, record, model_id)
            if not views:
                continue
            try:
                check_version(views[0])  # before dialing it: we could not talk to it anyway
            except VersionMismatchError as e:
                log.info("ignoring %s: %s", pid, e)
                refused.append(e)
                continue
            address = self._address_of(pid, record)
            if address is not None:
                offers.extend(replace(v, address=address) for v in views)
            elif record.reachability == Reachability.REACHABILITY_PRIVATE:  # errors then name the NAT
                relays = bool(record.circuit_addresses)
                behind_nat.extend(NatBlocked(pid, v.start, v.end, relays) for v in views)
                nat_layers = max(nat_layers, views[0].num_layers)
        answers = self.measure([v.address for v in offers])
        peers = []
        for view in offers:
            info = answers.get(view.address)
            if info is None:
                continue
            try:
                check_version(replace(view, protocol_version=info.protocol_version))  # it may have changed since
            except VersionMismatchError as e:
                log.info("ignoring %s: %s", view.peer_id, e)
                refused.append(e)
                continue
            if (info.model_id, info.start, info.end) != (model_id, view.start, view.end):
                log.info("ignoring %s: it now serves %s %d:%d", view.address, info.model_id, info.start, info.end)
                continue
            throughput = info.live_throughput or view.throughput  # the one it measures from real steps, when it has
            peers.append(replace(view, rtt_s=info.rtt_s, quantization=info.quantization, throughput=throughput))
        num_layers = max((v.num_layers for v in offers), default=0)
        if not num_layers and refused:
            raise refused[0]
        if not num_layers and behind_nat:
            nat = KnownPeers(model_id, nat_layers, [], behind_nat=tuple(behind_nat))
            raise nat.explain(RouteError(f"no reachable peer serves model {model_id}", ((0, nat_layers),)))
        if not num_layers:
            raise RouteError(f"no live peer serves model {model_id}")
        return KnownPeers(model_id, num_layers, peers, refused=tuple(refused), behind_nat=tuple(behind_nat))

    def _from_peers(self) -> KnownPeers:
        """The peers at the given addresses, as their Info answers tell them."""
        answers = self.measure(self.peers)
        infos, refused = compatible(list(answers.values()))
        for e in refused:
            log.info("ignoring %s", e)
        models = {i.model_id for i in infos}
        model_id = self.model_id
        if model_id is None:
            if len(models) > 1:
                raise ConfigError(f"the peers serve different models ({', '.join(sorted(models))}): pass model_id")
            model_id = next(iter(models), "")
        failures = [address for address in self.peers if address not in answers]
        if not answers:
            why = [str(self._failures[a]) if a in self._failures else a for a in failures]
            raise RouteError("no peer answered" + (f" ({'; '.join(why)})" if why else ""))
        peers = [i for i in infos if i.model_id == model_id]
        answered = {p.address for p in peers} | {e.peer for e in refused}
        unreachable = tuple(a for a in self.peers if a not in answered)
        num_layers = max(i.num_layers for i in answers.values())
        return KnownPeers(model_id, num_layers, list(peers), unreachable, tuple(refused))
