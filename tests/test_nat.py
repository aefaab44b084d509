"""NAT traversal behind real NAT: network namespaces with iptables MASQUERADE routers.

    public namespace: bootstrap + relay daemon, daemon B (layers 2:4)
    behind NAT 1:     daemon A (layers 0:2)
    behind NAT 2 (drops unsolicited inbound packets): the client

The client, knowing only the bootstrap address, generates through A (tunnelled over a
relayed or hole-punched libp2p connection) and B (direct gRPC), and must produce exactly
the single-process tokens. Skipped, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import reference_tokens

from node.testing.launch import DaemonProcess, start_daemon
from node.testing.netlab import NatLab, unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
REASON = unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no NAT lab: {REASON}"), pytest.mark.slow]

CLIENT = """
import json, sys
from node.client import Client, ClientConfig
prompt = [int(i) for i in sys.argv[2].split(",")]
with Client(bootstrap=[sys.argv[1]], config=ClientConfig(hole_punch_wait_s=float(sys.argv[4]))) as client:
    route = client.route()
    tokens = list(client.generate(prompt, int(sys.argv[3]), stop_at_eos=False, route=route))
    print(json.dumps({"tokens": tokens, "paths": client.paths(), "hops": [h.peer for h in route[1]]}))
"""


def _wait_log(daemon: DaemonProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in daemon.log):
        if time.monotonic() > deadline or daemon.process.poll() is not None:
            raise AssertionError(f"no {text!r} in the log:\n" + "\n".join(daemon.log[-30:]))
        time.sleep(0.3)


@pytest.fixture(scope="module")
def nat_swarm(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    keys = tmp_path_factory.mktemp("natkeys")
    model = str(tiny_models["mixtral"])
    daemons: dict[str, DaemonProcess] = {}
    with NatLab(drop_unsolicited=(False, True)) as lab:
        try:

            def start(name: str, where: Any, args: list[str]) -> DaemonProcess:
                common = ["--host", where.ip, "--identity", str(keys / f"{name}.key"), "--autonat-confirmations", "2"]
                daemons[name] = start_daemon([*common, *args], wrap=where.argv)
                return daemons[name]

            boot = start("boot", lab.public, ["--relay"]).multiaddr
            start("b", lab.public, ["--model", model, "--layers", "2:4", "--bootstrap", boot])
            start("a", lab.a, ["--model", model, "--layers", "0:2", "--bootstrap", boot])
            _wait_log(daemons["a"], "moemesh: reachable through relays at: /ip4/", 60)
            yield {"lab": lab, "daemons": daemons, "boot": boot}
        finally:
            for d in daemons.values():
                d.terminate()
            for d in daemons.values():
                d.stop()


def _in(lab_host: Any, args: list[str], timeout: float) -> str:
    result = subprocess.run(lab_host.argv(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_autonat_finds_the_natted_daemon_private_and_the_public_ones_public(nat_swarm: dict[str, Any]) -> None:
    daemons = nat_swarm["daemons"]
    _wait_log(daemons["a"], "moemesh: reachability: private", 5)
    _wait_log(daemons["b"], "moemesh: reachability: public", 30)
    _wait_log(daemons["boot"], "moemesh: reachability: public, relaying", 30)
    assert any("AutoNAT: behind NAT" in line for line in daemons["a"].log)
    lab = nat_swarm["lab"]
    status = [sys.executable, "-m", "node", "status", "--json", "--bootstrap", nat_swarm["boot"]]
    view = json.loads(_in(lab.c, status, 90))
    reach = view["reachability"]
    a, b, boot = (reach[daemons[n].peer_id] for n in ("a", "b", "boot"))
    assert (a["reachability"], b["reachability"], boot["reachability"]) == ("private", "public", "public")
    assert boot["relay"] and not a["relay"] and not b["relay"]
    assert a["circuit_addresses"] and a["path"] in ("relayed", "hole-punched")
    assert b["path"] == "direct" and boot["path"] == "direct"


def test_client_behind_nat_generates_the_reference_tokens_through_a_natted_server(
    nat_swarm: dict[str, Any], tiny_models: dict[str, Path]
) -> None:
    prompt, n = [5, 17, 99, 3, 250, 42], 10
    expected = reference_tokens(tiny_models["mixtral"], prompt, n, stop_at_eos=True)
    args = [sys.executable, "-c", CLIENT, nat_swarm["boot"], ",".join(map(str, prompt)), str(n), "25"]
    answer = json.loads(_in(nat_swarm["lab"].c, args, 120).strip().splitlines()[-1])
    a = nat_swarm["daemons"]["a"].peer_id
    assert a in answer["hops"], answer
    assert answer["tokens"] == expected
    path = answer["paths"][a]
    assert path in ("relayed", "hole-punched")
    print(f"\nclient -> NAT'd server path: {path}")


def test_lab_namespaces_are_removed_also_on_failure() -> None:
    lab = NatLab(prefix=f"mmt{time.monotonic_ns() % 100000}")
    with pytest.raises(RuntimeError, match="boom"), lab:
        made = lab.namespaces()
        assert len(made) == 5
        raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in made)


def test_without_a_relay_autonat_decides_with_the_defaults_and_the_client_names_the_nat(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A swarm of three, so fewer peers than the default 3 confirmations: the NAT'd daemon still
    finds itself private, and with no relay a client's error says the NAT is why."""
    model = str(tiny_models["mixtral"])
    daemons: list[DaemonProcess] = []
    with NatLab(prefix=f"mmr{time.monotonic_ns() % 100000}") as lab:
        try:

            def start(name: str, where: Any, args: list[str]) -> DaemonProcess:
                common = ["--host", where.ip, "--identity", str(tmp_path / f"{name}.key")]  # default confirmations
                daemons.append(start_daemon([*common, *args], wrap=where.argv))
                return daemons[-1]

            boot = start("boot", lab.public, []).multiaddr  # no --relay: nobody relays
            start("b", lab.public, ["--model", model, "--layers", "2:4", "--bootstrap", boot])
            a = start("a", lab.a, ["--model", model, "--layers", "0:2", "--bootstrap", boot])
            _wait_log(a, "moemesh: reachability: private", 90)
            generate = [sys.executable, "-m", "node", "generate", "--bootstrap", boot, "--ids", "1,2"]
            result = subprocess.run(lab.c.argv(generate), cwd=ROOT, capture_output=True, text=True, timeout=180)
            assert result.returncode == 2, result.stderr[-3000:]
            assert "layers 0:2 are served only by peers behind NAT and no relay is available" in result.stderr
        finally:
            for d in daemons:
                d.terminate()
            for d in daemons:
                d.stop()
