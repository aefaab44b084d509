"""gRPC is TLS pinned to the fingerprint a peer announces: plaintext is refused, a wrong pin is
refused (and routes go around it), and a signed record naming someone else's address is
useless to its signer. Real `moemesh serve` processes on loopback."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from node.client import Client, ClientConfig
from node.errors import ConfigError, PeerUnavailable, PeerUntrusted, RouteError
from node.mesh.reader import SwarmSnapshot
from node.mesh.records import make_record, now_ms, peer_id_of
from node.testing.launch import ServerProcess, local_swarm, start_server_process
from node.tls import fetch_certificate, fingerprint_of, normalize_fingerprint, pinned_channel, split_pin
from protocol import grpc_options
from protocol.mesh_pb2 import PeerRecord, Reachability, ShardAd
from protocol.shard_pb2 import InfoRequest, InfoResponse

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def pair(tiny_models: dict[str, Path]) -> Iterator[list[ServerProcess]]:
    """Two TLS servers of the whole model, each with its own certificate."""
    with local_swarm(tiny_models["mixtral"], [(0, 4), (0, 4)]) as servers:
        yield servers


def _info(channel: grpc.Channel) -> InfoResponse:
    call = channel.unary_unary(
        "/moemesh.v1.Shard/Info",
        request_serializer=InfoRequest.SerializeToString,
        response_deserializer=InfoResponse.FromString,
    )
    return call(InfoRequest(), timeout=10)  # type: ignore[no-any-return]


def _tokens(client: Client) -> list[int]:
    return list(client.generate(PROMPT, 6))


def test_fingerprints_parse_and_servers_announce_theirs(pair: list[ServerProcess]) -> None:
    a, b = pair
    assert len(a.fingerprint) == 64 and a.fingerprint != b.fingerprint  # a fresh certificate per server
    assert fingerprint_of(fetch_certificate(a.address)) == a.fingerprint
    assert any(f"TLS fingerprint {a.fingerprint}" in line for line in a.log)  # printed for a human too
    spaced = ":".join(a.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(f"sha256:{spaced}") == a.fingerprint
    assert split_pin(a.pinned) == (a.address, a.fingerprint) and split_pin(a.address) == (a.address, "")
    with pytest.raises(ConfigError, match="not a SHA-256 fingerprint"):
        Client([f"{a.address}#abc"])


def test_plaintext_to_a_tls_server_is_refused(pair: list[ServerProcess]) -> None:
    a = pair[0]
    with grpc.insecure_channel(a.address, options=grpc_options()) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            _info(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pinned_channel(a.address, a.fingerprint, grpc_options()) as channel:
        assert _info(channel).num_layers == 4  # the same server answers TLS with its pinned certificate


def test_a_wrong_pin_refuses_the_peer_and_routes_go_around_it(pair: list[ServerProcess]) -> None:
    a, b = pair
    impostor = f"{a.address}#{b.fingerprint}"  # a's address, but the certificate we expect is b's
    with Client([impostor]) as client:
        with pytest.raises(PeerUntrusted, match="is not the pinned"):
            client.info(impostor)
        with pytest.raises(RouteError, match="no peer answered.*is not the pinned"):
            client.route()
    with Client([b.pinned]) as client:
        honest = _tokens(client)
    with Client([impostor, b.pinned]) as client:
        model_id, hops = client.route()
        assert [h.address for h in hops] == [b.pinned]
        assert _tokens(client) == honest
    # A session whose hop turns out untrusted when it dials fails over to the other peer.
    with Client([impostor, b.pinned]) as client:
        model_id, _ = client.route()
        route = (model_id, [_hop(impostor)])
        assert list(client.generate(PROMPT, 6, route=route)) == honest
        assert client.recoveries and "is not the pinned" in client.recoveries[0]


def _hop(address: str):  # type: ignore[no-untyped-def]
    from node.client import Hop

    return Hop(address, 0, 4, address)


def test_trust_on_first_use_warns_and_then_holds_the_certificate(
    pair: list[ServerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    a = pair[0]
    with caplog.at_level(logging.WARNING, logger="node.tls"), Client([a.address]) as client:
        tokens = _tokens(client)
    assert any("trusting" in r.message and a.fingerprint in r.message for r in caplog.records)
    with Client([a.pinned]) as client:
        assert _tokens(client) == tokens


def test_the_cli_takes_a_fingerprint_and_refuses_a_wrong_one(pair: list[ServerProcess]) -> None:
    a, b = pair

    def moemesh(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "node", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)

    good = moemesh("info", a.address, "--fingerprint", a.fingerprint)
    assert good.returncode == 0 and "layers 0:4 of 4" in good.stdout, good.stderr
    bad = moemesh("info", a.address, "--fingerprint", b.fingerprint)
    assert bad.returncode == 2 and "is not the pinned" in bad.stderr and "Traceback" not in bad.stderr
    ids = ",".join(map(str, PROMPT))
    peers = f"{a.address}#{b.fingerprint},{b.pinned}"
    gen = moemesh("generate", "--peers", peers, "--ids", ids, "--max-new-tokens", "3")
    assert gen.returncode == 0 and len(gen.stdout.split()) == 3, gen.stderr  # around the untrusted one


def _forged_and_honest(a: ServerProcess, b: ServerProcess, model_id: str) -> dict[str, PeerRecord]:
    """A record of a throwaway key naming b's gRPC address (with a's fingerprint: the signer holds
    a real server, only at another address), and an honest record of b."""
    shard = ShardAd(model_id=model_id, model_name="tiny", start=0, end=4, num_layers=4, throughput=1e9)

    def record(address: str, fingerprint: str) -> PeerRecord:
        return make_record(
            create_new_key_pair(),
            grpc_addresses=[address],
            p2p_addresses=[],
            shards=[shard],
            ttl_s=60,
            seq=1,
            reachability=Reachability.REACHABILITY_PUBLIC,
            tls_fingerprint=fingerprint,
        )

    forged, honest = record(b.address, a.fingerprint), record(b.address, b.fingerprint)
    return {peer_id_of(forged): forged, peer_id_of(honest): honest}


class _Records:
    """Stands in for the DHT reader: the client gets exactly these (already verified) records."""

    def __init__(self, model_id: str, records: dict[str, PeerRecord]) -> None:
        self.snapshot = SwarmSnapshot(records, {}, now_ms())
        self.model_id = model_id

    def model(self, model_id: str | None) -> tuple[str, SwarmSnapshot]:
        return self.model_id, self.snapshot


def test_a_record_naming_another_peers_address_is_useless_to_its_signer(
    pair: list[ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    with Client([b.pinned]) as direct:
        model_id = direct.info(b.pinned).model_id
        honest = _tokens(direct)
    records = _forged_and_honest(a, b, model_id)
    forged_id, honest_id = list(records)
    with Client(bootstrap=["/ip4/127.0.0.1/tcp/9"]) as client:
        monkeypatch.setattr(client.finder, "_swarm", lambda: _Records(model_id, {forged_id: records[forged_id]}))
        with pytest.raises(RouteError):  # b's address answers with b's certificate, not the signer's
            client.route()
        monkeypatch.setattr(client.finder, "_swarm", lambda: _Records(model_id, records))
        _, hops = client.route()
        assert [h.peer for h in hops] == [honest_id]  # the forged record's 1e9 tokens/s bought nothing
        assert _tokens(client) == honest


def test_plaintext_only_on_a_trusted_lan(tiny_models: dict[str, Path], pair: list[ServerProcess]) -> None:
    lan = start_server_process(tiny_models["mixtral"], (0, 4), extra_args=["--insecure-lan"])
    try:
        assert lan.fingerprint == "" and any("PLAINTEXT" in line for line in lan.log)
        with Client([lan.address]) as client:  # a default client insists on TLS
            with pytest.raises(PeerUnavailable, match="no TLS answer"):
                client.info(lan.address)
        with Client([lan.address], config=ClientConfig(insecure_lan=True)) as client:
            plain = _tokens(client)
        with Client([pair[0].pinned], config=ClientConfig(insecure_lan=True)) as client:
            assert _tokens(client) == plain  # a pinned peer is still dialed over TLS
        # A record without a fingerprint (a daemon with --insecure-lan) is used only by a LAN client.
        with Client([lan.address], config=ClientConfig(insecure_lan=True)) as client:
            model_id = client.info(lan.address).model_id
        shard = ShardAd(model_id=model_id, model_name="tiny", start=0, end=4, num_layers=4)
        record = make_record(
            create_new_key_pair(),
            grpc_addresses=[lan.address],
            p2p_addresses=[],
            shards=[shard],
            ttl_s=60,
            seq=1,
            reachability=Reachability.REACHABILITY_PUBLIC,
        )
        records = _Records(model_id, {peer_id_of(record): record})
        for config, usable in ((ClientConfig(), False), (ClientConfig(insecure_lan=True), True)):
            with Client(bootstrap=["/ip4/127.0.0.1/tcp/9"], config=config) as client:
                client.finder._swarm = lambda: records  # type: ignore[method-assign]
                if usable:
                    assert _tokens(client) == plain
                else:
                    with pytest.raises(RouteError):
                        client.route()
    finally:
        lan.stop()
