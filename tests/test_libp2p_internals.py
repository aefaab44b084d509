"""Each private py-libp2p API that `node.mesh.internals` wraps is still there, shaped as we call
it, and does what we rely on: an upgrade that renames or removes one fails here first."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.host.basic_host import BasicHost
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.value_store import ValueStore
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from multiaddr import Multiaddr

from node.mesh import internals
from node.mesh.autonat import without_p2p
from node.mesh.host import MeshConfig, MeshNode, noise_only_host
from node.mesh.records import make_record, peer_key, sign_record

LISTEN = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
ECHO = TProtocol("/moemesh/test-half-close/1.0.0")

# (owner, attribute, the parameters we pass, whether it is a coroutine function)
PRIVATE_METHODS: list[tuple[type, str, list[str], bool]] = [
    (ValueStore, "_store_at_peer", ["self", "peer_id", "key", "value"], True),
    (ValueStore, "_get_from_peer", ["self", "peer_id", "key"], True),
    (BasicHost, "_push_identify_to_all_peers", ["self"], True),
    (AutoNATService, "_try_dial", ["self", "peer_id", "addrs"], True),
    (CircuitV2Protocol, "_handle_hop_stream", ["self", "stream"], True),
    (CircuitV2Transport, "_make_reservation", ["self", "stream", "relay_peer_id"], True),
    (DCUtRProtocol, "_schedule_relay_close", ["self", "peer_id"], False),
    (NetStream, "close_write", ["self"], True),
    (KadDHT, "add_peer", ["self", "peer_id", "skip_server_mode_check"], True),  # ServersOnlyDHT overrides it
]


@pytest.mark.parametrize(
    ("owner", "name", "params", "coroutine"), PRIVATE_METHODS, ids=lambda v: getattr(v, "__name__", v)
)
def test_the_private_method_exists_with_the_parameters_we_pass(
    owner: type, name: str, params: list[str], coroutine: bool
) -> None:
    method = getattr(owner, name, None)
    assert method is not None, f"{owner.__name__}.{name} is gone"
    found = list(inspect.signature(method).parameters)
    assert found[: len(params)] == params, f"{owner.__name__}.{name}{inspect.signature(method)}"
    assert inspect.iscoroutinefunction(method) == coroutine


@pytest.mark.parametrize(
    ("owner", "hook"),
    [(AutoNATService, "self._try_dial("), (DCUtRProtocol, "self._schedule_relay_close(")],
)
def test_the_hooks_we_override_are_still_called(owner: type, hook: str) -> None:
    assert hook in inspect.getsource(owner), f"{owner.__name__} no longer calls {hook}...)"


@pytest.mark.parametrize(
    ("init", "attributes"),
    [
        (BasicHost.__init__, ["self._observed_addr_manager"]),
        (Swarm.__init__, ["self.transport_manager", "self.upgrader"]),
        (DCUtRProtocol.__init__, ["self._hole_punch_attempts"]),
        (CircuitV2Transport.__init__, ["self._reservations"]),
    ],
    ids=lambda v: getattr(v, "__qualname__", "attrs"),
)
def test_the_private_attributes_are_still_set(init: Callable[..., None], attributes: list[str]) -> None:
    source = inspect.getsource(init)
    assert all(a in source for a in attributes), attributes


def test_relay_and_dcutr_state_reads_as_we_expect() -> None:
    host = noise_only_host(create_new_key_pair(), LISTEN)
    stranger = ID.from_pubkey(create_new_key_pair().public_key)
    transport = CircuitV2Transport(host, CircuitV2Protocol(host), RelayConfig(roles=RelayRole.STOP))
    assert internals.reservation_expiry(transport, stranger) is None
    transport._reservations[stranger] = 123.0
    assert internals.reservation_expiry(transport, stranger) == 123.0
    dcutr = internals.KeepRelayDCUtR(host)
    assert internals.hole_punch_attempts(dcutr) == {}
    assert dcutr._schedule_relay_close(stranger) is None
    assert internals.observed_addresses(host) == []  # nothing observed before any connection


def test_the_wrappers_work_between_two_hosts() -> None:
    """One pair of hosts: one-peer DHT put/get, identify push, a secured dial-back, our AutoNAT
    dial-back hook and a half-close."""

    async def echo_after_eof(stream: Any) -> None:
        data = b""
        try:
            while chunk := await stream.read(1024):
                data += chunk
        except StreamEOF:  # the asker's half-close
            pass
        await stream.write(b"got " + data)
        await stream.close()

    async def main() -> None:
        server = MeshNode(create_new_key_pair(), MeshConfig())
        dialed_back: list[ID] = []

        async def dial_back(peer: ID, addrs: list[bytes]) -> bytes | None:
            dialed_back.append(peer)
            return addrs[0]

        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.serve)
            internals.DialBackAutoNAT(server.host, dial_back)  # serves AutoNAT with our dial-back hook
            server.host.set_stream_handler(ECHO, echo_after_eof)
            client_kp = create_new_key_pair()
            client = MeshNode(client_kp, MeshConfig(bootstrap=(addresses[0],)))
            await nursery.start(client.serve)
            server_id = server.host.get_id()
            with trio.fail_after(30):
                # DHT: one PUT_VALUE to one peer, then one GET_VALUE of it
                key = peer_key(client.peer_id).encode()
                signed = sign_record(
                    make_record(client_kp, grpc_addresses=[], p2p_addresses=[], shards=[], ttl_s=60, seq=1), client_kp
                )
                assert await internals.store_at_peer(client.dht.kad, server_id, key, signed)
                assert await internals.get_from_peer(client.dht.kad, server_id, key) == signed
                missing = peer_key(server.peer_id).encode()
                assert await internals.get_from_peer(client.dht.kad, server_id, missing) is None
                await internals.push_identify(client.host)
                # a fresh, Noise-secured connection proves the peer id, and only that one
                target = without_p2p(Multiaddr(addresses[0]))
                assert await internals.secure_dial(client.host, target, server_id)
                with pytest.raises(Exception):  # noqa: B017  # the handshake fails: a different peer
                    await internals.secure_dial(client.host, target, ID.from_pubkey(create_new_key_pair().public_key))
                # our AutoNAT hook answers the request
                asker = AutoNATService(client.host, serve=False)  # type: ignore[arg-type]
                status, _ = await asker.query_server(server_id, addrs=[target.to_bytes()], timeout=10)
                assert status == Message.OK and dialed_back == [client.host.get_id()]
                # half-close: the peer reads to the end, then still answers
                stream = await client.host.new_stream(server_id, [ECHO])
                await stream.write(b"ping")
                await internals.close_write(stream)
                assert await stream.read(1024) == b"got ping"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_missing_private_attribute_fails_the_wrapper() -> None:
    """The wrappers call the private names directly (no getattr fallback that hides a removal)."""

    class Bare:
        pass

    with pytest.raises(AttributeError):
        trio.run(partial(internals.push_identify, Bare()))  # type: ignore[arg-type]
