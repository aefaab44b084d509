"""A hostile peer against real daemons: a throwaway key, no record, any sync frame it likes.

Two honest daemons (processes on loopback) share the swarm state. A stranger in this process
(its own libp2p host, its own key, no record, a raw pycrdt document) reads the state as any
peer can, then tries every attack of issue 11 on it over `/moemesh/sync/1.0.0`: overwrite,
delete, a fake member, poison values, an epoch takeover and document growth. No honest
member's view changes, `status` keeps working and a new `--layers auto` daemon places itself.
The same attacks in-process, one by one: tests/test_swarm_state_attacks.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import moemesh_status, wait_for
from pycrdt import Doc, Map

from crdt import Load, Member, Replica, decode_frame, encode_frame, sign_entry
from node.mesh.bridge import TrioThread
from node.mesh.host import MeshConfig, MeshNode
from node.mesh.identity import Libp2pSigner, Libp2pVerifier, ephemeral_identity
from node.mesh.sync import SyncWire, fetch_state
from node.testing.launch import DaemonProcess, start_daemon
from protocol.swarm_pb2 import SyncFrame

pytestmark = pytest.mark.slow

MAX_EPOCH = (1 << 64) - 1


class Stranger:
    """A libp2p host with a throwaway key and no record, speaking raw sync frames."""

    def __init__(self, bootstrap: str) -> None:
        key = ephemeral_identity()
        self.signer = Libp2pSigner(key)
        self.node = MeshNode(key, MeshConfig(bootstrap=(bootstrap,), server=False))
        self.thread = TrioThread("moemesh-stranger")
        self.doc = Doc()
        self.maps = {name: self.doc.get(name, type=Map) for name in ("members", "load", "rtt")}
        self.epoch: tuple[int, str] = (0, "")

    def __enter__(self) -> Stranger:
        self.thread.start()
        self.thread.call_sync(self.thread.start_service, self.node.serve)
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.stop()

    def learn(self, victim: DaemonProcess) -> None:
        """Read the victim's whole document (any peer may) so that our writes supersede it."""
        pull = encode_frame(Replica(Libp2pVerifier()).pull())
        data = self.thread.call_sync(fetch_state, self.node.host, victim.peer_id, [victim.multiaddr], pull)
        assert data is not None, "the victim did not answer a pull"
        frame = decode_frame(data)
        self.epoch = (frame.epoch, frame.epoch_owner)
        self.doc = Doc()
        self.maps = {name: self.doc.get(name, type=Map) for name in ("members", "load", "rtt")}
        self.doc.apply_update(frame.update)

    def push(self, victim: DaemonProcess, *, epoch: tuple[int, str] | None = None, full: bool = False) -> None:
        epoch = epoch or self.epoch
        frame = SyncFrame(
            kind=SyncFrame.PUSH, epoch=epoch[0], epoch_owner=epoch[1], update=self.doc.get_update(), full=full
        )

        async def answer(sender: str, frame: bytes) -> bytes | None:
            return None

        wire = SyncWire(self.node.host, answer)
        self.thread.call_sync(wire.exchange, victim.peer_id, [victim.multiaddr], encode_frame(frame))

    def signed(self, kind: str, lease_until: float, value: Any, seq: int = 1) -> bytes:
        return sign_entry(self.signer, kind, seq, lease_until, value)


def _view(daemon: DaemonProcess) -> dict[str, tuple[Any, ...]]:
    """The members as `status` shows them through `daemon`: what placement and routing read."""
    crdt = moemesh_status(daemon.multiaddr)["crdt"]
    assert crdt is not None
    fields = ("model_id", "start", "end", "throughput", "state", "grpc_addresses", "max_layers")
    return {m["peer_id"]: tuple(str(m[f]) for f in fields) for m in crdt["members"]}


@pytest.fixture(scope="module")
def swarm(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    keys = tmp_path_factory.mktemp("hostile")
    common = ["--model", str(tiny_models["mixtral"]), "--ttl", "30", "--grace", "0"]
    common += ["--sync-interval", "0.5", "--lease", "10"]
    daemons: dict[str, DaemonProcess] = {}
    try:
        daemons["a"] = start_daemon([*common, "--layers", "0:2", "--identity", str(keys / "a")])
        join = ["--bootstrap", daemons["a"].multiaddr]
        daemons["b"] = start_daemon([*common, "--layers", "2:4", *join, "--identity", str(keys / "b")])
        yield {"daemons": daemons, "common": common, "keys": keys}
    finally:
        for d in daemons.values():
            d.terminate()
        for d in daemons.values():
            d.stop()


def test_every_attack_leaves_honest_views_and_status_and_auto_placement_working(swarm: dict[str, Any]) -> None:
    daemons: dict[str, DaemonProcess] = swarm["daemons"]
    a, b = daemons["a"], daemons["b"]
    wait_for(lambda: len(_view(a)) == len(_view(b)) == 2, 30, "both daemons in both views")
    before = _view(a)
    assert _view(b) == before
    with Stranger(a.multiaddr) as s:
        pid = s.signer.peer_id
        # the channel works: a well-signed entry of its own, with a short lease, is a member like any
        # (strangers can join), so the attacks below do reach the daemons
        s.learn(b)
        member = Member(pid, ("127.0.0.1:9",), "m", 0, 4, 1 << 30, 5.0, "v", time.time() + 6, (), 4, 4, "serving")
        s.maps["members"][pid] = s.signed("member", time.time() + 6, member)
        s.push(b)
        wait_for(lambda: pid in _view(a), 10, "the stranger's own entry, through b, at a")
        # overwrite: a's entry claimed by our key, a load in a's name, a's member blob in the wrong map
        s.learn(b)
        old_blob = bytes(s.maps["members"][a.peer_id])
        s.maps["members"][a.peer_id] = msgpack.packb(
            [s.signer.public_key, msgpack.packb({"kind": "member", "peer_id": a.peer_id}), b"x" * 64]
        )
        s.maps["load"][a.peer_id] = s.signed("load", 1e12, Load(999, 0, 999))
        s.maps["rtt"][a.peer_id] = old_blob
        s.push(b)
        # delete every entry
        s.learn(b)
        with s.doc.transaction():
            for m in s.maps.values():
                for key in list(m.keys()):
                    del m[key]
        s.push(b)
        # a fake member: a lease that never ends and 333,333,349 tokens/s
        s.learn(b)
        fake = Member(pid, ("127.0.0.1:9",), "m", 0, 4, 1 << 30, 333_333_349.0, "v", 1e12, (), 4, 4, "serving")
        s.maps["members"][pid] = s.signed("member", 1e12, fake, seq=2)
        s.push(b)
        # poison: the 76-byte member without peer_id, and junk in every map
        s.learn(b)
        for name, key in (("members", "poison"), ("members", a.peer_id), ("load", "poison"), ("rtt", b.peer_id)):
            s.maps[name][key] = {"lease_until": 1e12}
        s.push(b)
        # epoch takeover: an empty document as the whole state, under epoch 2^64-1 and under a plausible one
        empty = Stranger.__new__(Stranger)
        empty.__dict__.update(s.__dict__, doc=Doc())
        empty.push(b, epoch=(MAX_EPOCH, pid), full=True)
        empty.push(a, epoch=(s.epoch[0] + 60, pid), full=True)
        # growth: 100 fakes of 30 kB each, leases that never end
        s.learn(b)
        with s.doc.transaction():
            for i in range(100):
                s.maps["members"][f"fake-{i}"] = {
                    "peer_id": f"fake{i}",
                    "lease_until": 1e12,
                    "addresses": ["x" * 30_000],
                }
        s.push(b)
        s.push(a)
    for daemon in (a, b):
        assert daemon.process.poll() is None
    wait_for(
        lambda: _view(a) == _view(b) == before, 30, "honest views as before (the stranger's lease ended)"
    )  # status works, views unchanged
    status = moemesh_status(a.multiaddr)
    assert set(status["peer_ids"]) == {a.peer_id, b.peer_id}
    # a new daemon places itself from that state
    auto = start_daemon(
        [*swarm["common"], "--layers", "auto", "--max-layers", "2", "--bootstrap", a.multiaddr]
        + ["--identity", str(swarm["keys"] / "auto")]
    )
    daemons["auto"] = auto
    wait_for(lambda: auto.peer_id in _view(a), 30, "the auto daemon in the state")
    start, end = int(_view(a)[auto.peer_id][1]), int(_view(a)[auto.peer_id][2])
    assert end - start == 2
