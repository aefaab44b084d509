"""Private swarms (`--swarm-key`, node.swarmkey): without the key a peer or client is refused
at every door (each libp2p protocol of ours, the DHT's records, gRPC); with it all works."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from node.client import Client, ClientConfig
from node.client.stream import ask_info
from node.errors import ConfigError, PeerRefused, PeerTimeout, PeerUnavailable, RouteError
from node.mesh.dht import KAD_PROTOCOL
from node.mesh.host import MeshConfig, MeshNode, noise_only_host
from node.mesh.internals import get_from_peer
from node.mesh.keyed import attach, gate_kademlia
from node.mesh.record import RecordConfig, RecordProtocol
from node.mesh.sync import SyncConfig, fetch_state
from node.mesh.sync import install as install_sync
from node.mesh.tunnel import TunnelClient, TunnelConfig, install_server
from node.mesh.weights import WeightsConfig
from node.mesh.weights import install as install_weights
from node.mesh.weights import open_session as open_weights
from node.serve.gate import SwarmGate
from node.swarmkey import GRPC_METADATA, SwarmKey, generate_key_file
from node.testing.launch import DaemonProcess, start_daemon

ROOT = Path(__file__).resolve().parent.parent
LISTEN = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
KEY = SwarmKey(b"k" * 32)
OTHER = SwarmKey(b"o" * 32)


def _moemesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    made = _moemesh("keygen", str(path))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = SwarmKey.load(path)
    assert key.id in made.stdout and key.secret.hex() not in made.stdout
    again = _moemesh("keygen", str(path))
    assert again.returncode == 2 and "not overwriting" in again.stderr
    assert SwarmKey.load(path) == key
    with pytest.raises(ConfigError):
        generate_key_file(path)
    (tmp_path / "bad.key").write_text("hello")
    bad = _moemesh("info", "127.0.0.1:1", "--swarm-key", str(tmp_path / "bad.key"))
    assert bad.returncode == 2 and "is not a swarm key" in bad.stderr


def test_grpc_proofs_are_bound_to_the_server_fresh_and_single_use() -> None:
    fingerprint = "ab" * 32
    gate = SwarmGate(KEY, fingerprint)
    proof = KEY.grpc_proof(fingerprint)
    assert gate._why_not([(GRPC_METADATA, proof)]) is None
    assert "used before" in (gate._why_not([(GRPC_METADATA, proof)]) or "")
    assert "no proof" in (gate._why_not([]) or "")
    for bad in (OTHER.grpc_proof(fingerprint), KEY.grpc_proof("cd" * 32), KEY.grpc_proof(fingerprint, at=0.0), "v1.x"):
        assert "not valid here" in (gate._why_not([(GRPC_METADATA, bad)]) or "")


def test_sealed_values_need_the_key_and_their_dht_key() -> None:
    sealed = KEY.seal("/moemesh/peer/A", b"record")
    assert KEY.unseal("/moemesh/peer/A", sealed) == b"record"
    assert KEY.unseal("/moemesh/peer/B", sealed) is None  # moved under another key
    assert OTHER.unseal("/moemesh/peer/A", sealed) is None
    assert KEY.provider_key("moemesh:peers") != OTHER.provider_key("moemesh:peers")


async def _through(port: int) -> bytes:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    await tcp.send_all(b"hello")
    await tcp.send_eof()
    data = b""
    with trio.fail_after(10):
        try:
            while chunk := await tcp.receive_some(1024):
                data += chunk
        except trio.BrokenResourceError:  # refused: closed with our bytes unread (a reset)
            pass
    await tcp.aclose()
    return data


async def _echo(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def answer(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(1024)
        await stream.send_all(b"echo:" + data)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


@pytest.mark.parametrize("dialer_key", [None, OTHER, KEY], ids=["no key", "another key", "the key"])
def test_every_libp2p_door_needs_the_key(dialer_key: SwarmKey | None, caplog: pytest.LogCaptureFixture) -> None:
    """Sync, record, tunnel, weights and Kademlia streams of a keyed host: refused without the key or with another."""
    answers: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            grpc_port = await nursery.start(_echo)
            serving = MeshNode(
                create_new_key_pair(),
                MeshConfig(swarm_key=KEY),
                protocols=[
                    partial(install_server, config=TunnelConfig(), target=lambda: ("127.0.0.1", grpc_port)),
                    partial(install_weights, config=WeightsConfig(request_timeout_s=5), holding=lambda: None),
                ],
            )
            addresses = await nursery.start(serving.serve)
            serving.record_protocol.signed = b"our record"
            serving.dht.store_locally("/moemesh/peer/x", b"a value")

            async def respond(sender: str, frame: bytes) -> bytes | None:
                return b"state for " + frame

            install_sync(serving.host, SyncConfig(), respond)
            dialer = noise_only_host(create_new_key_pair(), LISTEN)
            attach(dialer, dialer_key)
            kad = KadDHT(dialer, DHTMode.CLIENT)
            gate_kademlia(dialer, KAD_PROTOCOL, None)  # what our Dht does: py-libp2p's own streams prove the key
            async with dialer.run(LISTEN):
                where = PeerInfo(ID.from_base58(serving.peer_id), [Multiaddr(addresses[0])])
                await dialer.connect(where)
                answers["sync"] = await fetch_state(dialer, serving.peer_id, addresses, b"pull", timeout_s=5)
                answers["record"] = await RecordProtocol(dialer, RecordConfig()).ask(serving.peer_id)
                try:  # holding nothing, it answers every request with an error: that it answers is the point
                    weights = await open_weights(dialer, serving.peer_id, WeightsConfig(request_timeout_s=5))
                    await weights.manifest("0" * 24)
                except PeerRefused:
                    answers["weights"] = "answered"
                except (PeerUnavailable, PeerTimeout):  # closed on, or never answered
                    answers["weights"] = None
                try:
                    answers["kad"] = await get_from_peer(kad, where.peer_id, b"/moemesh/peer/x")
                except Exception:  # refused: the stream was reset
                    answers["kad"] = None

                async def connect(peer: ID) -> None:
                    await dialer.connect(where)

                port = await nursery.start(partial(TunnelClient(dialer, connect).listen, serving.peer_id))
                answers["tunnel"] = await _through(port)
                for listener in list(dialer.get_network().listeners.values()):
                    await listener.close()
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="node.mesh.keyed"):
        trio.run(main)
    if dialer_key is KEY:
        want = {
            "sync": b"state for pull",
            "record": b"our record",
            "tunnel": b"echo:hello",
            "kad": b"a value",
            "weights": "answered",
        }
        assert answers == want
    else:
        assert answers == {"sync": None, "record": None, "tunnel": b"", "kad": None, "weights": None}
        assert caplog.text.count("refused a /moemesh/") >= 2  # the doors say why (record's asker may hang up first)


# -- real daemons ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("private")
    key_file, other_file = root / "swarm.key", root / "other.key"
    generate_key_file(key_file)
    generate_key_file(other_file)
    common = ["--model", str(tiny_models["mixtral"]), "--ttl", "30", "--grace", "0"]
    common += ["--sync-interval", "0.5", "--lease", "10"]
    daemons: dict[str, DaemonProcess] = {}
    try:
        daemons["a"] = start_daemon(
            [*common, "--layers", "0:2", "--identity", str(root / "a.key"), "--swarm-key", str(key_file)]
        )
        boot = daemons["a"].multiaddr
        join = ["--bootstrap", boot, "--swarm-key", str(key_file)]
        daemons["b"] = start_daemon([*common, "--layers", "2:4", *join, "--identity", str(root / "b.key")])
        yield {"daemons": daemons, "key": key_file, "other": other_file, "boot": boot, "common": common, "root": root}
    finally:
        for d in daemons.values():
            d.terminate()
        for d in daemons.values():
            d.stop()


def _status(boot: str, *key: str) -> dict[str, Any]:
    import json

    result = _moemesh("status", "--bootstrap", boot, "--json", *key)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_clients_need_the_key(private: dict[str, Any]) -> None:
    daemons: dict[str, DaemonProcess] = private["daemons"]
    boot = private["boot"]
    key = SwarmKey.load(private["key"])
    with Client(bootstrap=[boot], config=ClientConfig(swarm_key=key)) as client:
        model_id, hops = client.route()
        assert {h.address for h in hops} == {daemons["a"].pinned, daemons["b"].pinned}
        second = daemons["b"].pinned
        before = ask_info(client.channel(second), second, 10.0).capacity.pushed_steps
        tokens = list(client.generate([3, 1, 4], 4, stop_at_eos=False, route=(model_id, hops)))
        assert len(tokens) == 4
        if hops[1].address == second:  # the first hop proved the key to the second: its steps were pushed
            assert ask_info(client.channel(second), second, 10.0).capacity.pushed_steps > before
    with Client(bootstrap=[boot]) as stranger, pytest.raises(RouteError):
        stranger.route()  # it reads no record
    for config in (ClientConfig(), ClientConfig(swarm_key=SwarmKey.load(private["other"]))):
        with Client([daemons["b"].pinned], config=config) as client:
            with pytest.raises(PeerRefused) as refused:
                client.info(daemons["b"].pinned)  # gRPC: no session, not even Info
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    inside = _status(boot, "--swarm-key", str(private["key"]))
    assert set(inside["peer_ids"]) == {daemons["a"].peer_id, daemons["b"].peer_id}
    for outside in (_status(boot), _status(boot, "--swarm-key", str(private["other"]))):
        assert outside["crdt"] is None and not outside["peer_ids"]  # no state, no record


@pytest.mark.slow
def test_daemons_without_the_key_cannot_join(private: dict[str, Any]) -> None:
    from conftest import wait_for

    daemons: dict[str, DaemonProcess] = private["daemons"]
    boot, root, common = private["boot"], private["root"], private["common"]
    members = {daemons["a"].peer_id, daemons["b"].peer_id}
    join = [*common, "--layers", "2:4", "--bootstrap", boot]
    daemons["stranger"] = start_daemon([*join, "--identity", str(root / "s.key")])
    daemons["outsider"] = start_daemon([*join, "--identity", str(root / "o.key"), "--swarm-key", str(private["other"])])
    views: list[dict[str, Any]] = []

    def settled() -> bool:
        views.append(_status(boot, "--swarm-key", str(private["key"])))
        return {m["peer_id"] for m in views[-1]["crdt"]["members"]} == members

    time.sleep(3)  # several sync rounds of the strangers
    try:
        wait_for(settled, 30, "only the members in the state")
    except AssertionError:
        raise AssertionError(f"last view: {views[-1]}") from None
    assert set(views[-1]["peer_ids"]) <= members  # no stranger's record is believed
    # the strangers see nothing of the swarm either
    for name, key in (("stranger", ()), ("outsider", ("--swarm-key", str(private["other"])))):
        view = _status(daemons[name].multiaddr, *key)
        assert {m["peer_id"] for m in view["crdt"]["members"]} == {daemons[name].peer_id}
