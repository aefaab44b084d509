"""The daemon's lifecycle: loading never stalls its loop, its tunnel endpoint follows its gRPC
server across moves, and its record never expires while it lives (even with a black-holed peer)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import wait_for

from node.daemon import DaemonConfig
from node.mesh.autonat import AutoNATConfig
from node.mesh.host import MeshConfig
from node.mesh.nat import NatConfig
from node.mesh.reader import SwarmReader
from node.serve.config import ServerConfig
from node.swarm.agent import SwarmConfig
from node.testing.inprocess import DaemonThread
from node.testing.launch import DaemonProcess, start_daemon
from node.tls import pinned_channel
from protocol import grpc_options
from protocol.shard_pb2 import InfoRequest, InfoResponse


def _auto_config(model: Path, tmp: Path, name: str, max_layers: int) -> DaemonConfig:
    return DaemonConfig(
        identity=tmp / f"{name}.key",
        mesh=MeshConfig(),
        server=ServerConfig(model=model, start=0, end=4),
        nat=NatConfig(AutoNATConfig(confirmations=1)),
        cache_dir=tmp / "cache",
        swarm=SwarmConfig(lease_s=6.0, sync_interval_s=0.5),
        auto_layers=True,
        max_layers=max_layers,
    )


def _info(address: str, fingerprint: str | None) -> InfoResponse:
    """Info over TLS pinned to `fingerprint`; None: over plaintext (which a daemon refuses)."""
    if fingerprint is None:
        channel = grpc.insecure_channel(address, options=grpc_options())
    else:
        channel = pinned_channel(address, fingerprint, grpc_options())
    with channel:
        call = channel.unary_unary(
            "/moemesh.v1.Shard/Info",
            request_serializer=InfoRequest.SerializeToString,
            response_deserializer=InfoResponse.FromString,
        )
        return call(InfoRequest(), timeout=10)  # type: ignore[no-any-return]


def test_loading_a_span_does_not_block_the_daemons_loop(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shards import Checkpoint

    loading = threading.Event()
    original = Checkpoint.load_span

    def slow_load(self: Checkpoint, *args: object, **kwargs: object) -> object:
        loading.set()
        time.sleep(3.0)  # a large model, as far as the daemon's loop can tell
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Checkpoint, "load_span", slow_load)
    with DaemonThread(_auto_config(tiny_models["mixtral"], tmp_path, "slow", 4)) as d:
        assert loading.wait(60), "the daemon never started loading"
        worst = 0.0
        while loading.is_set() and d.events.empty():
            started = time.monotonic()
            d.call(_noop(), timeout=30)  # the loop answers, like a lease renewal or a sync answer would
            worst = max(worst, time.monotonic() - started)
            if time.monotonic() - started < 0.05:
                time.sleep(0.05)
            if d.daemon.serving is not None:
                break
        d.ready(timeout=120)
    assert worst < 1.0, f"the daemon's loop stalled {worst:.2f} s while a span loaded"


async def _noop() -> None:
    return None


def test_the_tunnel_endpoint_follows_the_grpc_server_of_an_auto_daemon_across_a_move(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    with DaemonThread(_auto_config(tiny_models["mixtral"], tmp_path, "auto", 2)) as d:
        ready = d.ready(timeout=120)
        assert ready["layers"] == [0, 2]
        fingerprint = ready["tls_fingerprint"]
        with SwarmReader([ready["multiaddrs"][0]], traversal=True) as reader:
            record = reader.everyone().records[ready["peer_id"]]
            assert record.tls_fingerprint == fingerprint  # signed: only this daemon can answer with it
            tunnel = reader.tunnel(record)  # gRPC over a libp2p stream, as a client behind NAT reaches it
            # TLS end to end through the tunnel (the relay would see ciphertext), pinned to the record
            assert (_info(tunnel, fingerprint).start, _info(tunnel, fingerprint).end) == (0, 2)
            for address in (ready["grpc_address"], tunnel):  # plaintext is refused, directly and tunnelled
                with pytest.raises(grpc.RpcError) as refused:
                    _info(address, None)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            d.call(d.daemon.move(2, 4))
            assert d.daemon.serving is not None and d.daemon.serving.shard.start == 2
            info = _info(tunnel, fingerprint)  # a new connection: the new server, with the same certificate
            assert (info.start, info.end) == (2, 4)


@pytest.fixture
def black_hole_swarm(
    tiny_models: dict[str, Path], tmp_path: Path
) -> Iterator[tuple[DaemonProcess, DaemonProcess, DaemonProcess]]:
    started: list[DaemonProcess] = []
    stopped: DaemonProcess | None = None
    try:
        boot = start_daemon(["--identity", str(tmp_path / "boot.key"), "--ttl", "120"])
        started.append(boot)
        hole = start_daemon(["--identity", str(tmp_path / "hole.key"), "--bootstrap", boot.multiaddr])
        started.append(hole)
        serving = start_daemon(
            [
                "--model",
                str(tiny_models["mixtral"]),
                "--layers",
                "0:4",
                "--identity",
                str(tmp_path / "a.key"),
                "--ttl",
                "6",
                "--bootstrap",
                boot.multiaddr,
                hole.multiaddr,
            ]
        )
        started.append(serving)
        os.kill(hole.process.pid, signal.SIGSTOP)  # it accepts connections and never answers
        stopped = hole
        yield boot, hole, serving
    finally:
        if stopped is not None:
            os.kill(stopped.process.pid, signal.SIGCONT)
        for d in started:
            d.terminate()
        for d in started:
            d.stop()


@pytest.mark.slow
def test_a_record_never_expires_while_its_daemon_lives_even_with_a_black_holed_peer(
    black_hole_swarm: tuple[DaemonProcess, DaemonProcess, DaemonProcess],
) -> None:
    boot, _, serving = black_hole_swarm
    with SwarmReader([boot.multiaddr]) as reader:
        wait_for(lambda: serving.peer_id in reader.read([serving.peer_id]).records, 30, "the first record")
        deadline = time.monotonic() + 20  # more than three record lifetimes of 6 s
        while time.monotonic() < deadline:
            snapshot = reader.read([serving.peer_id])
            why = snapshot.ignored.get(serving.peer_id)
            assert serving.peer_id in snapshot.records, f"the live daemon's record was {why}:\n" + "\n".join(
                serving.log[-15:]
            )
            time.sleep(0.5)


def test_each_daemon_without_identity_gets_its_own_and_a_held_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from libp2p.peer.id import ID

    from node.errors import ConfigError
    from node.mesh.identity import claim_identity

    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    first, second = claim_identity(None), claim_identity(None)
    try:
        assert (first.path.name, second.path.name) == ("identity.key", "identity-2.key")
        ids = {ID.from_pubkey(h.key_pair.public_key) for h in (first, second)}
        assert len(ids) == 2
        with pytest.raises(ConfigError, match="in use by another daemon"):
            claim_identity(first.path)
    finally:
        first.release()
        second.release()
    again = claim_identity(first.path)  # free once released: the same peer id as before
    again.release()
    assert ID.from_pubkey(again.key_pair.public_key) == ID.from_pubkey(first.key_pair.public_key)


@pytest.mark.slow
def test_two_daemons_on_one_machine_without_identity_form_a_swarm(tmp_path: Path) -> None:
    env = {"MOEMESH_HOME": str(tmp_path)}
    first = start_daemon([], env=env)
    try:
        second = start_daemon(["--bootstrap", first.multiaddr], env=env)
        try:
            assert first.peer_id != second.peer_id
            with SwarmReader([first.multiaddr]) as reader:
                wait_for(lambda: second.peer_id in reader.everyone().records, 30, "the second daemon in the DHT")
        finally:
            second.stop()
    finally:
        first.stop()


def test_the_daemon_serves_prometheus_metrics_of_its_state(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import dataclasses
    import urllib.request

    config = dataclasses.replace(_auto_config(tiny_models["mixtral"], tmp_path, "metrics", 2), metrics_port=0)
    with DaemonThread(config) as d:
        ready = d.ready(timeout=120)
        with urllib.request.urlopen(f"http://{ready['metrics_address']}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    assert "moemesh_sessions 0.0" in text
    assert 'moemesh_served_layers{model_id="' in text and 'quantization="none"} 2.0' in text
    assert "moemesh_swarm_members 1.0" in text and 'moemesh_reachability{state="unknown"}' in text
    assert 'moemesh_sync_bytes_total{direction="out"}' in text
