"""Signed peer records: forged, tampered or misattributed records are not believed;
a Noise-only host refuses a peer that dials with plaintext."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from node.errors import InvalidRecord
from node.mesh.host import noise_only_host
from node.mesh.reader import SwarmReader
from node.mesh.records import (
    RecordValidator,
    is_live,
    make_record,
    peer_key,
    sign_record,
    verify_record,
)
from protocol.mesh_pb2 import PeerRecord, ShardAd, SignedPeerRecord

LISTEN = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


def _record(key_pair, seq: int = 1, ttl: float = 60.0, withdrawn: bool = False) -> PeerRecord:  # type: ignore[no-untyped-def]
    ad = ShardAd(model_id="m", model_name="tiny", start=0, end=2, num_layers=4, throughput=100.0)
    return make_record(
        key_pair, grpc_addresses=["127.0.0.1:1"], p2p_addresses=[], shards=[ad], ttl_s=ttl, seq=seq, withdrawn=withdrawn
    )


def test_a_genuine_record_verifies() -> None:
    kp = create_new_key_pair()
    pid = ID.from_pubkey(kp.public_key).to_base58()
    record = verify_record(sign_record(_record(kp), kp), peer_id=pid)
    assert record.shards[0].end == 2 and is_live(record)
    RecordValidator().validate(peer_key(pid), sign_record(_record(kp), kp))


def test_the_tls_fingerprint_is_signed_with_the_record() -> None:
    kp = create_new_key_pair()
    ad = ShardAd(model_id="m", model_name="tiny", start=0, end=2, num_layers=4)
    fingerprint = "ab" * 32
    record = make_record(
        kp, grpc_addresses=["127.0.0.1:1"], p2p_addresses=[], shards=[ad], ttl_s=60, seq=1, tls_fingerprint=fingerprint
    )
    signed = SignedPeerRecord.FromString(sign_record(record, kp))
    assert verify_record(signed.SerializeToString()).tls_fingerprint == fingerprint
    body = PeerRecord.FromString(signed.record)
    body.tls_fingerprint = "cd" * 32  # someone on the way swaps in their own certificate
    swapped = SignedPeerRecord(record=body.SerializeToString(), signature=signed.signature)
    with pytest.raises(InvalidRecord, match="bad signature"):
        verify_record(swapped.SerializeToString())


def test_a_tampered_record_or_signature_is_rejected() -> None:
    kp = create_new_key_pair()
    signed = SignedPeerRecord.FromString(sign_record(_record(kp), kp))
    body = PeerRecord.FromString(signed.record)
    body.shards[0].end = 4  # claim more layers after signing
    forged = SignedPeerRecord(record=body.SerializeToString(), signature=signed.signature)
    with pytest.raises(InvalidRecord, match="bad signature"):
        verify_record(forged.SerializeToString())
    flipped = SignedPeerRecord(record=signed.record, signature=bytes(64))
    with pytest.raises(InvalidRecord, match="bad signature"):
        verify_record(flipped.SerializeToString())
    with pytest.raises(InvalidRecord, match="not a signed peer record"):
        verify_record(b"\xff\x00garbage")


def test_a_record_signed_by_a_key_that_is_not_its_peer_id_is_rejected() -> None:
    victim, attacker = create_new_key_pair(), create_new_key_pair()
    body = _record(attacker)
    body.peer_id = ID.from_pubkey(victim.public_key).to_bytes()  # pretend to be the victim
    with pytest.raises(InvalidRecord, match="does not belong to its peer id"):
        verify_record(sign_record(body, attacker))
    # A genuine record of the attacker, published under the victim's key:
    victim_id = ID.from_pubkey(victim.public_key).to_base58()
    with pytest.raises(InvalidRecord, match="published under"):
        RecordValidator().validate(peer_key(victim_id), sign_record(_record(attacker), attacker))


def test_validator_prefers_the_newest_verified_record() -> None:
    kp, other = create_new_key_pair(), create_new_key_pair()
    old, new = sign_record(_record(kp, seq=5), kp), sign_record(_record(kp, seq=9, withdrawn=True), kp)
    forged = SignedPeerRecord(
        record=PeerRecord.FromString(
            SignedPeerRecord.FromString(sign_record(_record(kp, seq=99), kp)).record
        ).SerializeToString(),
        signature=bytes(64),
    ).SerializeToString()
    assert RecordValidator().select("k", [old, forged, new]) == 2
    assert not is_live(verify_record(new))
    assert not is_live(verify_record(sign_record(_record(other, ttl=-1), other)))


def test_plaintext_dialer_is_refused_by_a_noise_only_host() -> None:
    async def main() -> None:
        server_kp, plain_kp, noise_kp = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
        server = noise_only_host(server_kp, LISTEN)
        from libp2p import new_host

        plain = new_host(
            key_pair=plain_kp,
            sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(plain_kp)},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=LISTEN,
        )
        good = noise_only_host(noise_kp, LISTEN)
        async with server.run(LISTEN), plain.run(LISTEN), good.run(LISTEN):
            target = info_from_p2p_addr(server.get_addrs()[0])
            with pytest.raises(Exception) as refused:
                with trio.fail_after(20):
                    await plain.connect(target)
            assert "TooSlow" not in type(refused.value).__name__
            assert server.get_id() not in plain.get_connected_peers()
            with trio.fail_after(20):
                await good.connect(target)
            assert server.get_id() in good.get_connected_peers()
            for host in (server, plain, good):
                for listener in list(host.get_network().listeners.values()):
                    await listener.close()

    trio.run(main)


def test_swarm_reader_needs_a_bootstrap_address() -> None:
    from node.errors import ConfigError

    with pytest.raises(ConfigError):
        SwarmReader([])
    with pytest.raises(ConfigError, match="not a multiaddr"):
        SwarmReader(["127.0.0.1:4001"])


def test_a_wildcard_listen_address_is_advertised_as_real_addresses() -> None:
    from node.mesh.addresses import advertised, local_ipv4_addresses

    listening = ["/ip4/0.0.0.0/tcp/4001/p2p/12D3X", "/ip4/10.9.8.7/tcp/4001/p2p/12D3X"]
    assert advertised(listening, None, local=["192.0.2.5", "127.0.0.1"]) == [
        "/ip4/192.0.2.5/tcp/4001/p2p/12D3X",
        "/ip4/127.0.0.1/tcp/4001/p2p/12D3X",
        "/ip4/10.9.8.7/tcp/4001/p2p/12D3X",
    ]
    assert advertised(listening, "peer.example", local=["192.0.2.5"])[0] == "/dns4/peer.example/tcp/4001/p2p/12D3X"
    mine = local_ipv4_addresses()
    assert "127.0.0.1" in mine and mine[-1] == "127.0.0.1" and "0.0.0.0" not in mine
