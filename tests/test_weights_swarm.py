"""Daemons that start with nothing but a model id fetch their spans from peers, verified, and serve.

Real `moemesh daemon` processes on loopback: A holds the whole checkpoint, E too but serves
corrupted bytes (a test flag); B and C hold only the model id. Then a swarm of two slow
providers, one killed while a third daemon fetches from both.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import reference_tokens

from node.client import Client
from node.testing.launch import DaemonProcess, event_of, start_daemon
from shards import Checkpoint
from shards.manifest import load_manifest, local_tensors

pytestmark = pytest.mark.slow


def _event(daemon: DaemonProcess, kind: str) -> dict[str, Any]:
    found = [e for line in daemon.log if (e := event_of(line, kind)) is not None]
    assert found, f"no {kind} event in:\n" + "\n".join(daemon.log[-30:])
    return found[-1]


@pytest.fixture(scope="module")
def fetched(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("weights")
    folder = tiny_models["mixtral"]
    model_id = Checkpoint(folder).model_id()
    started: dict[str, DaemonProcess] = {}

    def daemon(name: str, *args: str) -> DaemonProcess:
        started[name] = d = start_daemon(
            [*args, "--identity", str(tmp / f"{name}.key"), "--cache-dir", str(tmp / f"cache-{name}")]
        )
        return d

    try:
        a = daemon("a", "--model", str(folder), "--layers", "0:4")
        e = daemon("e", "--model", str(folder), "--layers", "0:4", "--bootstrap", a.multiaddr, "--test-corrupt-weights")
        b = daemon("b", "--model", model_id, "--layers", "0:3", "--bootstrap", a.multiaddr)
        daemon("c", "--model", model_id, "--layers", "2:4", "--bootstrap", e.multiaddr, b.multiaddr)
        yield {"folder": folder, "model_id": model_id, "tmp": tmp, **started}
    finally:
        for d in started.values():
            d.terminate()
        for d in started.values():
            d.stop()


def test_daemons_with_only_the_model_id_serve_thereference_tokens(fetched: dict[str, Any]) -> None:
    b, c = fetched["b"], fetched["c"]
    assert _event(b, "ready")["model_id"] == _event(c, "ready")["model_id"] == fetched["model_id"]
    prompt = [5, 17, 99, 3, 250, 42]
    with Client([b.pinned, c.pinned]) as client:  # B serves 0:3, C 2:4: only fetched weights on the route
        _, hops = client.route()
        assert {h.address for h in hops} == {b.pinned, c.pinned}
        assert list(client.generate(prompt, 10, stop_at_eos=False)) == reference_tokens(fetched["folder"], prompt, 10)


def test_a_cache_holds_exactly_its_spans_tensors(fetched: dict[str, Any]) -> None:
    manifest = load_manifest(fetched["folder"])
    cache = fetched["tmp"] / "cache-b" / "weights" / fetched["model_id"]
    held = local_tensors(cache)
    wanted = manifest.tensors_of(manifest.groups_for_span(0, 3))
    assert set(held) == {t.name for t in wanted}
    data_bytes = sum(length for _, _, length in held.values())
    assert data_bytes == sum(t.length for t in wanted) < manifest.total_bytes
    done = _event(fetched["b"], "fetched")
    wasted = sum(done["by_provider"].get(p, 0) for p in done["banned"])  # E's corrupted tensors, fetched again
    assert done["bytes"] - wasted == data_bytes  # every other byte fetched once
    on_disk = sum(p.stat().st_size for p in cache.glob("*.safetensors"))
    assert data_bytes < on_disk < data_bytes + 4096 * len(list(cache.glob("*.safetensors")))  # headers only


def test_c_fetched_from_b_too_and_banned_the_corrupting_provider(fetched: dict[str, Any]) -> None:
    a, b, c, e = (fetched[n] for n in "abce")
    done = _event(c, "fetched")
    assert b.peer_id in done["by_provider"]  # layer 2 came (partly) from B, which fetched it itself
    assert e.peer_id in done["banned"]  # E's bytes did not verify: banned, and C came up anyway
    assert set(done["by_provider"]) <= {a.peer_id, b.peer_id, e.peer_id}


def test_a_provider_killed_mid_transfer_is_replaced_by_another(fetched: dict[str, Any]) -> None:
    folder, tmp, model_id = fetched["folder"], fetched["tmp"], fetched["model_id"]
    slow = ["--test-weights-delay", "0.1"]  # 0.1 s per chunk served: the transfer takes seconds
    started: list[DaemonProcess] = []
    try:  # a swarm of its own, so that only these two provide
        k1 = start_daemon(["--model", str(folder), "--layers", "0:4", "--identity", str(tmp / "k1.key"), *slow])
        started.append(k1)
        k2 = start_daemon(
            ["--model", str(folder), "--layers", "0:4", "--identity", str(tmp / "k2.key"), "--bootstrap", k1.multiaddr]
            + slow
        )
        started.append(k2)

        def kill_k1_once_fetching(line: str, _: DaemonProcess) -> None:
            if event_of(line, "fetching") is not None:
                threading.Timer(1.0, k1.kill).start()  # a few tensors in

        g = start_daemon(
            ["--model", model_id, "--layers", "0:4", "--identity", str(tmp / "g.key"), "--cache-dir", str(tmp / "g")]
            + ["--bootstrap", k1.multiaddr],
            on_line=kill_k1_once_fetching,
        )
        started.append(g)
        done = _event(g, "fetched")
        assert k1.peer_id in done["dropped"] and done["by_provider"].get(k1.peer_id, 0) > 0
        assert done["by_provider"][k2.peer_id] > 0
        manifest = load_manifest(folder)
        assert done["bytes"] >= manifest.total_bytes  # everything arrived, verified, despite the kill

        # The fetching daemon itself killed mid-transfer: started again, it fetches only what it lacked.
        g.stop()  # (G would serve it everything at once: only the slow K2 is left)

        def kill_self_once_fetching(line: str, itself: DaemonProcess) -> None:
            if event_of(line, "fetching") is not None:
                threading.Timer(1.5, itself.kill).start()

        crashing = ["--model", model_id, "--layers", "0:4", "--identity", str(tmp / "h.key")]
        crashing += ["--cache-dir", str(tmp / "h"), "--bootstrap", k2.multiaddr]
        with pytest.raises(RuntimeError, match="exited"):
            start_daemon(crashing, on_line=kill_self_once_fetching)
        partial = list((tmp / "h" / "weights" / model_id).glob("*.journal"))
        assert partial, "killed before any group was partly fetched"
        again = start_daemon(crashing)
        started.append(again)
        resumed = _event(again, "fetched")
        assert 0 < resumed["bytes"] < manifest.total_bytes  # only what the crash left out
        assert set(local_tensors(tmp / "h" / "weights" / model_id)) == {t.name for t in manifest.tensors}
        again.stop()

        # Ctrl-C while fetching: the daemon stops at once (not after the transfer), keeping what arrived.
        def interrupt_once_fetching(line: str, itself: DaemonProcess) -> None:
            if event_of(line, "fetching") is not None:
                threading.Timer(1.0, itself.process.send_signal, (signal.SIGINT,)).start()

        interrupted = ["--model", model_id, "--layers", "0:4", "--identity", str(tmp / "i.key")]
        interrupted += ["--cache-dir", str(tmp / "i"), "--bootstrap", k2.multiaddr]
        with pytest.raises(RuntimeError, match="stopped before serving") as stopped:
            start_daemon(interrupted, on_line=interrupt_once_fetching)
        assert "Traceback" not in str(stopped.value)
        assert list((tmp / "i" / "weights" / model_id).glob("*.journal"))
    finally:
        for d in started:
            d.kill()
        for d in started:
            d.stop()


def test_a_daemon_with_only_the_model_id_fetches_its_new_span_when_it_moves(fetched: dict[str, Any]) -> None:
    from node.daemon import DaemonConfig
    from node.mesh.autonat import AutoNATConfig
    from node.mesh.host import MeshConfig
    from node.mesh.nat import NatConfig
    from node.serve.config import ServerConfig
    from node.swarm.agent import SwarmConfig
    from node.testing.inprocess import DaemonThread
    from node.weights.keeper import WeightsPlan

    tmp, model_id = fetched["tmp"], fetched["model_id"]
    cache = tmp / "cache-m"
    config = DaemonConfig(
        identity=tmp / "m.key",
        mesh=MeshConfig(bootstrap=(fetched["a"].multiaddr,)),
        server=ServerConfig(model=cache, start=0, end=0),  # the model is known once its manifest is fetched
        nat=NatConfig(AutoNATConfig(confirmations=1)),
        cache_dir=cache,
        swarm=SwarmConfig(lease_s=6.0, sync_interval_s=0.5, rebalance=False),
        auto_layers=True,
        max_layers=2,
        weights=WeightsPlan(model_id, cache_dir=cache),
    )
    with DaemonThread(config) as d:
        first = tuple(d.ready(timeout=120)["layers"])
        target = (2, 4) if first[0] == 0 else (0, 2)
        d.call(d.daemon.move(*target))
        assert d.daemon.serving is not None and (d.daemon.serving.shard.start, d.daemon.serving.shard.end) == target
        assert d.daemon.serving.shard.model_id == model_id
    manifest = load_manifest(fetched["folder"])
    held = set(local_tensors(cache / "weights" / model_id))
    for span in (first, target):  # both spans' tensors: the new one fetched the same way
        assert {t.name for t in manifest.tensors_of(manifest.groups_for_span(*span))} <= held
