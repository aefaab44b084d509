"""Pushes to a next hop behind NAT, named by its peer id (`p2p:<peer-id>#fingerprint`): the
form is refused by host:port parsing; a server without a libp2p host fails such a link at
once (the client relays it); a daemon's dial hook carries the link (TLS pinned through it,
one tunnel per link, closed when the link idles); the client names tunnelled hops so."""

from __future__ import annotations

import argparse
import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial

import grpc
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from node.cli.values import peers as _peers
from node.client import Client, ClientConfig
from node.errors import ConfigError, MoemeshError, PeerUnavailable
from node.mesh.autonat import AutoNATConfig
from node.mesh.bridge import TrioThread
from node.mesh.host import MeshConfig, MeshNode
from node.mesh.nat import NatConfig
from node.mesh.outbound import PushTunnels
from node.mesh.records import make_record, sign_record
from node.mesh.relay import RelayConfig
from node.mesh.tunnel import TunnelConfig, install_server
from node.plan.routing import Hop
from node.serve.gate import SwarmGate
from node.serve.push import Pusher
from node.swarmkey import SwarmKey
from node.tls import fetch_certificate, make_certificate, p2p_address, p2p_peer, split_pin
from protocol.shard_pb2 import PushedStep, PushSummary, Step

PEER = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
FP = "ab" * 32


def test_the_p2p_form_names_a_peer_id_and_host_port_parsing_refuses_it() -> None:
    address = p2p_address(PEER, FP)
    assert address == f"p2p:{PEER}#{FP}"
    target, pin = split_pin(address)
    assert (p2p_peer(target), pin) == (PEER, FP)
    assert p2p_peer("127.0.0.1:7001") is None
    assert p2p_address(PEER) == f"p2p:{PEER}"
    for bad in ("p2p:", "p2p:short", f"p2p:{PEER}0OIl", "p2p:" + "x" * 500):
        with pytest.raises(ConfigError, match="does not name a libp2p peer id"):
            p2p_peer(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="is not host:port"):
        _peers(address)  # a user cannot give one as a peer
    with pytest.raises(PeerUnavailable, match="no TLS answer"):
        fetch_certificate(target, 1.0)  # nor does a direct dial try one


def _step(i: int) -> PushedStep:
    return PushedStep(session_id="s", token=b"t", step=Step(step_id=i, position=i))


async def _failures(pusher: Pusher, address: str, n: int = 1) -> list[str]:
    """Push `n` steps to `address`; the reasons they failed (waits at most 20 s: a hang fails)."""
    told: list[str] = []
    done = asyncio.Event()

    def failed(why: str) -> None:
        told.append(why)
        if len(told) == n:
            done.set()

    for i in range(n):
        pusher.push(address, _step(i), failed)
    await asyncio.wait_for(done.wait(), 20)
    await pusher.aclose()
    return told


def test_a_server_without_a_libp2p_host_fails_a_p2p_link_at_once() -> None:
    told = asyncio.run(_failures(Pusher(1 << 20), p2p_address(PEER, FP), 2))
    assert len(told) == 2 and all("has no libp2p host to reach a peer behind NAT" in why for why in told), told


def test_a_malformed_p2p_address_fails_its_link_cleanly() -> None:
    opened: list[str] = []

    @asynccontextmanager
    async def dial(peer: str) -> AsyncIterator[str]:
        opened.append(peer)
        yield "127.0.0.1:1"

    (why,) = asyncio.run(_failures(Pusher(1 << 20, dial=dial), f"p2p:{'0' * 50}#{FP}"))
    assert "does not name a libp2p peer id" in why and not opened
    (why,) = asyncio.run(_failures(Pusher(1 << 20, dial=dial), f"p2p:{PEER}#nothex"))
    assert "is not a SHA-256 fingerprint" in why and not opened


class _PushSink:
    """A gRPC server on loopback (TLS; gated by `key` when given) taking Push calls; what it received."""

    def __init__(self, key: SwarmKey | None = None) -> None:
        self.steps: list[int] = []
        self.calls = 0
        self.certificate = make_certificate()
        self.key = key

    async def push(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        async for raw in requests:
            self.steps.append(PushedStep.FromString(raw).step.step_id)
        return PushSummary(accepted=len(self.steps)).SerializeToString()

    async def start(self) -> tuple[grpc.aio.Server, int]:
        gates = [] if self.key is None else [SwarmGate(self.key, self.certificate.fingerprint)]
        server = grpc.aio.server(interceptors=gates)
        handler = {"Push": grpc.stream_unary_rpc_method_handler(self.push)}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("moemesh.v1.Shard", handler)])
        port = server.add_secure_port("127.0.0.1:0", self.certificate.server_credentials())
        await server.start()
        return server, port


def test_a_p2p_link_runs_through_the_dial_hook_pinned_and_closes_its_tunnel_when_idle() -> None:
    sink = _PushSink()
    events: list[str] = []

    async def main() -> list[str]:
        server, port = await sink.start()

        @asynccontextmanager
        async def dial(peer: str) -> AsyncIterator[str]:
            events.append(f"open {peer}")
            try:
                yield f"127.0.0.1:{port}"  # a stand-in for the daemon's loopback tunnel
            finally:
                events.append("closed")

        try:
            pusher = Pusher(1 << 20, idle_s=0.5, dial=dial)
            told: list[str] = []
            address = p2p_address(PEER, sink.certificate.fingerprint)
            for i in range(3):
                pusher.push(address, _step(i), told.append)
            for _ in range(200):  # the link ends 0.5 s after its last push
                if "closed" in events:
                    break
                await asyncio.sleep(0.05)
            wrong = await _failures(Pusher(1 << 20, dial=dial), p2p_address(PEER, FP))  # another certificate
            await pusher.aclose()
            return told + wrong
        finally:
            await server.stop(None)

    told = asyncio.run(main())
    assert sink.steps == [0, 1, 2] and sink.calls == 1  # one link, one tunnel, every step through it
    assert events[:2] == [f"open {PEER}", "closed"]
    assert len(told) == 1 and "is not the pinned" in told[0], told  # pinned through the tunnel
    assert events[2:] == [f"open {PEER}", "closed"]  # a failed link closes its tunnel too


def test_the_client_names_a_hop_it_tunnels_to_by_its_peer_id() -> None:
    tunnel = f"127.0.0.1:40001#{FP}"
    with Client([f"127.0.0.1:40002#{FP}"]) as client:
        client.finder._tunnelled[tunnel] = PEER
        assert client.push_address(Hop(tunnel, 0, 2, PEER)) == f"p2p:{PEER}#{FP}"
        assert client.push_address(Hop(f"127.0.0.1:40002#{FP}", 2, 4)) == f"127.0.0.1:40002#{FP}"
        client.finder._tunnelled["127.0.0.1:40003"] = PEER
        assert client.push_address(Hop("127.0.0.1:40003", 0, 2, PEER)) is None  # no pin, no insecure LAN
    with Client(["127.0.0.1:40002"], config=ClientConfig(insecure_lan=True)) as client:
        client.finder._tunnelled["127.0.0.1:40003"] = PEER
        assert client.push_address(Hop("127.0.0.1:40003", 0, 2, PEER)) == f"p2p:{PEER}"


def test_push_tunnels_refuse_bad_peer_ids_unreachable_peers_and_too_many_with_clear_errors() -> None:
    bridge = TrioThread("test-push-tunnels")
    bridge.start()
    try:
        node = MeshNode(create_new_key_pair(), MeshConfig())  # not joined: no NAT traversal

        async def main() -> list[str]:
            tunnels = PushTunnels(bridge, node)
            errors = []
            for peer in ("not-a-peer-id", PEER, node.peer_id):
                with pytest.raises(MoemeshError) as caught:
                    async with tunnels.open(peer):
                        pass
                errors.append(str(caught.value))
            assert tunnels.opened == tunnels.active == 0
            with pytest.raises(MoemeshError) as caught:
                async with PushTunnels(bridge, node, max_tunnels=0).open(PEER):
                    pass
            errors.append(str(caught.value))
            return errors

        bad, unreachable, ourselves, full = asyncio.run(main())
    finally:
        bridge.stop()
    assert "is not a libp2p peer id" in bad
    assert f"cannot reach peer {PEER}: this host does no NAT traversal" in unreachable
    assert "to ourselves" in ourselves
    assert "0 push tunnels are open already" in full


def test_a_p2p_link_proves_the_swarm_key_to_the_next_hop_behind_the_tunnel() -> None:
    key = SwarmKey(secrets.token_bytes(32))
    sink = _PushSink(key)

    async def main() -> tuple[list[str], list[str]]:
        server, port = await sink.start()

        @asynccontextmanager
        async def dial(peer: str) -> AsyncIterator[str]:
            yield f"127.0.0.1:{port}"

        try:
            address = p2p_address(PEER, sink.certificate.fingerprint)
            pusher = Pusher(1 << 20, idle_s=0.3, swarm_key=key, dial=dial)
            told: list[str] = []
            pusher.push(address, _step(7), told.append)
            for _ in range(200):
                if sink.steps:
                    break
                await asyncio.sleep(0.05)
            await pusher.aclose()
            other = SwarmKey(secrets.token_bytes(32))
            refused = await _failures(Pusher(1 << 20, swarm_key=other, dial=dial), address)
            return told, refused
        finally:
            await server.stop(None)

    told, refused = asyncio.run(main())
    assert sink.steps == [7] and not told
    assert len(refused) == 1 and "UNAUTHENTICATED" in refused[0], refused


def test_push_tunnels_dial_a_peer_they_are_not_connected_to_at_its_records_addresses() -> None:
    """Three libp2p hosts on loopback: the next hop (with a tunnel server in front of a pinned
    Push sink) published its record to the bootstrap peer; the pushing host, never connected
    to it, finds the record, dials it there and carries the link through its own tunnel."""
    sink = _PushSink()
    bridge = TrioThread("test-push-tunnels-dial")
    bridge.start()

    async def main() -> tuple[list[int], list[str], bool, int]:
        server, port = await sink.start()
        try:
            boot = MeshNode(create_new_key_pair(), MeshConfig())
            boot_addr = (await bridge.call(bridge.start_service, boot.serve))[0]
            joined = MeshConfig(bootstrap=(boot_addr,))
            key = create_new_key_pair()
            tunnel = partial(install_server, config=TunnelConfig(), target=lambda: ("127.0.0.1", port))
            hop = MeshNode(key, joined, protocols=[tunnel])
            addresses = await bridge.call(bridge.start_service, hop.serve)
            record = make_record(key, grpc_addresses=[], p2p_addresses=addresses, shards=[], ttl_s=60, seq=1)
            await bridge.call(hop.publish, sign_record(record, key), [], False)
            nat = NatConfig(AutoNATConfig(check=False, serve=False), RelayConfig(reserve=False))
            pushing = MeshNode(create_new_key_pair(), replace(joined, server=False), nat)  # no table refresh
            await bridge.call(bridge.start_service, pushing.serve)
            peer = ID.from_base58(hop.peer_id)

            async def connected() -> bool:
                return bool(pushing.host.get_network().get_connections(peer))

            before = await bridge.call(connected)
            tunnels = PushTunnels(bridge, pushing)
            pusher = Pusher(1 << 20, dial=tunnels.open)
            told: list[str] = []
            pusher.push(p2p_address(hop.peer_id, sink.certificate.fingerprint), _step(3), told.append)
            for _ in range(600):
                if sink.steps or told:
                    break
                await asyncio.sleep(0.05)
            await pusher.aclose()
            return sink.steps, told, before, tunnels.opened
        finally:
            await server.stop(None)

    try:
        steps, told, before, opened = asyncio.run(main())
    finally:
        bridge.stop()
    assert not before  # it had to be found and dialed
    assert steps == [3] and not told and opened == 1, told
