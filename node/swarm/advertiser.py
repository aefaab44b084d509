"""The daemon's signed record in the DHT: issued every ttl/3, pushed at once, announced beside it.

A record's expiry counts from its issue time, so the next one is issued ttl/3 after the last
was issued (and at once when our reachability or relays change), whatever the DHT does:
the push to the DHT servers we know is bounded to a few seconds, and the full Kademlia put
and provider announcements run in a task of their own, one at a time (with a black-holed
peer they take tens of seconds). So a record never expires while its daemon lives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from node.mesh.bridge import TrioThread
from node.mesh.host import MeshNode
from node.mesh.nat import NatState, reachability_name
from node.mesh.records import ALL_PEERS_KEY, block_key, make_record, sign_record
from protocol.mesh_pb2 import Reachability, ShardAd

__all__ = ["Advert", "Advertiser", "Offer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Offer:
    """What the record offers now (empty while the daemon serves nothing)."""

    grpc_addresses: Sequence[str]
    shards: Sequence[ShardAd]
    tls_fingerprint: str
    weights_keys: Sequence[str] = ()  # provider keys of the weights we hold (node.weights.keeper.weights_key)


@dataclass
class Advert:
    """What the daemon last told the DHT."""

    seq: int = 0
    issued_at: float = 0.0  # monotonic: the record's expiry counts from here
    nat: NatState = field(default_factory=lambda: NatState(0, Reachability.REACHABILITY_UNKNOWN, (), False))


class Advertiser:
    def __init__(
        self,
        bridge: TrioThread,
        node: MeshNode,
        key_pair: Any,
        ttl_s: float,
        addresses: Sequence[str],
        offer: Callable[[], Offer],
        say: Callable[[str], None],
    ) -> None:
        self._bridge = bridge
        self._node = node
        self._key_pair = key_pair
        self.ttl_s = ttl_s
        self.addresses = list(addresses)
        self.offer = offer
        self.say = say
        self.advert = Advert()
        self._announcing: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Stop announcing (a DHT put can hang for tens of seconds on peers that died)."""
        if self._announcing is not None:
            self._announcing.cancel()

    def provider_keys(self) -> list[str]:
        offer = self.offer()
        blocks = [block_key(ad.model_id, b) for ad in offer.shards for b in range(ad.start, ad.end)]
        return [ALL_PEERS_KEY, *blocks, *offer.weights_keys]

    async def publish(self, tasks: asyncio.TaskGroup | None, withdrawn: bool = False) -> None:
        """Issue a new signed record and push it to the DHT servers we know (bounded: a few seconds).

        The full Kademlia put and provider announcements follow in a task of their own, one at
        a time: with a black-holed peer they take tens of seconds, and the next record must
        not wait for them (its expiry counts from its issue time)."""
        node, advert = self._node, self.advert
        advert.seq = max(advert.seq + 1, time.time_ns())
        fresh = await self._bridge.call(node.nat_state)
        if (fresh.reachability, fresh.relay) != (advert.nat.reachability, advert.nat.relay):
            relaying = ", relaying" if fresh.relay else ""
            self.say(f"reachability: {reachability_name(fresh.reachability)}{relaying}")
        if fresh.circuit_addresses != advert.nat.circuit_addresses:
            self.say(f"reachable through relays at: {', '.join(fresh.circuit_addresses) or 'none'}")
        advert.nat = fresh
        offer = self.offer()
        record = make_record(
            self._key_pair,
            grpc_addresses=offer.grpc_addresses,
            p2p_addresses=self.addresses,
            shards=offer.shards,
            ttl_s=self.ttl_s,
            seq=advert.seq,
            withdrawn=withdrawn,
            reachability=fresh.reachability,
            circuit_addresses=fresh.circuit_addresses,
            relay=fresh.relay,
            tls_fingerprint=offer.tls_fingerprint,
        )
        advert.issued_at = time.monotonic()
        signed, keys = sign_record(record, self._key_pair), self.provider_keys()
        started = time.monotonic()
        await self._bridge.call(node.publish, signed, keys, False)
        log.info("pushed %s record in %.2f s", "a withdrawn" if withdrawn else "our", time.monotonic() - started)
        if not withdrawn and tasks is not None and (self._announcing is None or self._announcing.done()):
            self._announcing = tasks.create_task(self._announce(signed, keys), name="moemesh-announce")

    async def _announce(self, signed: bytes, keys: list[str]) -> None:
        started = time.monotonic()
        try:
            await self._bridge.call(self._node.publish, signed, keys, True)
        except ValueError:  # the DHT refuses an older record: a newer one was issued meanwhile, announced next
            log.info("a newer record was issued while announcing this one: it is announced next")
            return
        except (OSError, RuntimeError) as e:  # the next record's announcement retries
            log.warning("announcing our record in the DHT failed: %s", e)
            return
        log.info("announced our record in the DHT in %.2f s", time.monotonic() - started)

    async def run(self, tasks: asyncio.TaskGroup) -> None:
        """A new record every ttl/3 after the last one was issued, and at once when our
        reachability or relays change, so a record never expires while its daemon lives."""
        node = self._node
        while True:
            due = self.advert.issued_at + self.ttl_s / 3
            await asyncio.sleep(max(0.0, min(1.0, due - time.monotonic())))
            fresh = await self._bridge.call(node.nat_state)
            if fresh.version == self.advert.nat.version and time.monotonic() < due:
                continue
            try:
                await self.publish(tasks)
            except (OSError, RuntimeError) as e:  # keep serving; the next round retries
                log.warning("republishing the record failed: %s", e)
