"""The mesh: daemons on loopback advertise signed records in the DHT; a client that knows only
the bootstrap address finds a route; stopped and killed daemons leave the view."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import moemesh_status, reference_tokens, wait_for

from node.client import Client, ClientConfig
from node.errors import RouteError
from node.testing.launch import DaemonProcess, start_daemon
from node.tls import pinned_channel
from protocol.shard_pb2 import InfoRequest, InfoResponse

pytestmark = pytest.mark.slow  # processes on loopback: minutes (`make test-quick` skips)

SHORT_TTL = 5.0  # the daemon we SIGKILL: its record must vanish by itself
LONG_TTL = 120.0  # everyone else: a disappearance within seconds means a withdrawal, not expiry


@pytest.fixture(scope="module")
def swarm(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DaemonProcess]]:
    keys = tmp_path_factory.mktemp("keys")
    model = str(tiny_models["mixtral"])
    daemons: dict[str, DaemonProcess] = {}
    try:
        daemons["boot"] = start_daemon(["--identity", str(keys / "boot.key"), "--ttl", str(LONG_TTL)])
        boot = daemons["boot"].multiaddr
        plan = {"a": ("0:2", LONG_TTL), "b": ("2:4", LONG_TTL), "c": ("2:4", SHORT_TTL), "d": ("0:3", LONG_TTL)}
        for name, (layers, ttl) in plan.items():
            daemons[name] = start_daemon(
                [
                    "--model",
                    model,
                    "--layers",
                    layers,
                    "--bootstrap",
                    boot,
                    "--identity",
                    str(keys / f"{name}.key"),
                    "--ttl",
                    str(ttl),
                ]
            )
        yield daemons
    finally:
        for d in daemons.values():
            d.terminate()
        for d in daemons.values():
            d.stop()


def test_identity_persists_across_restarts(tmp_path: Path) -> None:
    key = tmp_path / "id.key"
    first = start_daemon(["--identity", str(key)])
    first.stop()
    second = start_daemon(["--identity", str(key)])
    second.stop()
    assert first.peer_id == second.peer_id and key.stat().st_mode & 0o777 == 0o600
    assert any("new swarm: others join with --bootstrap /ip4/127.0.0.1/tcp/" in line for line in first.log)


def test_client_with_only_the_bootstrap_address_matches_transformers(
    swarm: dict[str, DaemonProcess], tiny_models: dict[str, Path]
) -> None:
    prompt = [5, 17, 99, 3, 250, 42]
    expected = reference_tokens(tiny_models["mixtral"], prompt, 12)
    with Client(bootstrap=[swarm["boot"].multiaddr]) as client:
        _, hops = client.route()
        assert hops[0].start == 0 and hops[-1].end == 4
        by_id = {d.peer_id: d for d in swarm.values()}
        assert [h.address for h in hops] == [by_id[h.peer].pinned for h in hops]  # pinned by the signed records
        assert all(len(by_id[h.peer].fingerprint) == 64 for h in hops)
        assert list(client.generate(prompt, 12, stop_at_eos=False)) == expected


def test_a_daemons_grpc_port_refuses_plaintext(swarm: dict[str, DaemonProcess]) -> None:
    a = swarm["a"]
    with grpc.insecure_channel(a.grpc_address) as channel:
        info = channel.unary_unary(
            "/moemesh.v1.Shard/Info",
            request_serializer=InfoRequest.SerializeToString,
            response_deserializer=InfoResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            info(InfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pinned_channel(a.grpc_address, a.fingerprint) as channel:
        assert channel.unary_unary("/moemesh.v1.Shard/Info")(InfoRequest().SerializeToString(), timeout=10)


def test_status_json_describes_the_live_swarm(swarm: dict[str, DaemonProcess]) -> None:
    view = moemesh_status(swarm["boot"].multiaddr)
    (model,) = view["models"].values()
    assert model["num_layers"] == 4 and model["full_route"] and model["missing"] == []
    assert model["coverage"] == [2, 2, 3, 2]  # blocks 0-1: a, d; block 2: b, c, d; block 3: b, c
    serving = {p["peer_id"]: p for p in model["peers"]}
    assert set(serving) == {swarm[n].peer_id for n in "abcd"}
    a = serving[swarm["a"].peer_id]
    assert (a["start"], a["end"]) == (0, 2) and a["grpc_addresses"] == [swarm["a"].grpc_address]
    assert a["tls_fingerprint"] == swarm["a"].fingerprint
    assert a["throughput"] > 0 and a["protocol_version"] == 1 and 0 <= a["record_age_s"] < LONG_TTL
    assert view["bootstrap_only_peers"] == [swarm["boot"].peer_id]


def test_killed_and_stopped_daemons_leave_the_view(
    swarm: dict[str, DaemonProcess], tiny_models: dict[str, Path]
) -> None:
    boot = swarm["boot"].multiaddr
    prompt = [9, 8, 7, 6]
    expected = reference_tokens(tiny_models["mixtral"], prompt, 8)

    def serving() -> set[str]:
        return {p["peer_id"] for m in moemesh_status(boot)["models"].values() for p in m["peers"]}

    swarm["c"].kill()  # SIGKILL: no goodbye; the client must route around it at once
    with Client(bootstrap=[boot]) as client:
        _, hops = client.route()
        assert swarm["c"].peer_id not in {h.peer for h in hops}
        assert list(client.generate(prompt, 8, stop_at_eos=False)) == expected
    wait_for(
        lambda: swarm["c"].peer_id not in serving(), SHORT_TTL + 10, "the killed daemon's record expiring", every=0.5
    )

    swarm["b"].terminate()  # SIGTERM: the record is withdrawn before the process exits
    swarm["b"].process.wait(30)
    assert swarm["b"].peer_id not in serving(), "\n".join(swarm["b"].log[-30:])
    swarm["d"].terminate()
    swarm["d"].process.wait(30)
    with Client(bootstrap=[boot]) as client, pytest.raises(RouteError, match="layers 2:4 of 4"):
        client.route()


def test_a_plaintext_daemon_is_used_only_by_a_lan_client(
    swarm: dict[str, DaemonProcess], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from shards import Checkpoint

    folder = tiny_models["qwen3_moe"]  # another model: the other tests' routes are not touched
    boot = swarm["boot"].multiaddr
    lan = start_daemon(
        ["--model", str(folder), "--layers", "0:4", "--bootstrap", boot, "--identity", str(tmp_path / "lan.key")]
        + ["--insecure-lan"]
    )
    try:
        assert lan.fingerprint == "" and any("PLAINTEXT" in line for line in lan.log)
        model_id = Checkpoint(folder).model_id()
        prompt = [4, 8, 15, 16]
        with Client(bootstrap=[boot], model_id=model_id, config=ClientConfig(insecure_lan=True)) as client:
            assert list(client.generate(prompt, 5, stop_at_eos=False)) == reference_tokens(folder, prompt, 5)
        with Client(bootstrap=[boot], model_id=model_id) as client, pytest.raises(RouteError):
            client.route()  # the same record, found: it names no certificate, so this client will not dial it
    finally:
        lan.terminate()
        lan.stop()
