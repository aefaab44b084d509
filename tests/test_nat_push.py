"""Server-to-server push to a next hop behind NAT, behind real NAT (network namespaces, as
tests/test_nat.py builds them):

    public namespace: bootstrap + relay daemon, daemon B (layers 0:2)
    behind NAT 1:     daemon A (layers 2:4)
    behind NAT 2 (drops unsolicited inbound packets): the client

The client reaches A through a libp2p tunnel of its own and names it to B by its peer id;
B pushes every step to A through a tunnel of B's own host (relayed or hole-punched), TLS
pinned to A's fingerprint. A's pushed-steps counter shows every step came from B, and the
tokens equal the client-relayed run's and transformers', in a private swarm (swarm key
proved on B's tunnel streams and Push calls: the open swarm takes the same path without the
proof, and tests/test_push_tunnel.py covers both on loopback). Skipped, saying why, where
namespaces cannot be made.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import reference_tokens
from test_nat import REASON, _in, _wait_log

from node.swarmkey import generate_key_file
from node.testing.launch import DaemonProcess, start_daemon
from node.testing.netlab import NatLab

pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no NAT lab: {REASON}"), pytest.mark.slow]

CLIENT = """
import json, sys
import numpy as np
from node.client import Client, ClientConfig
from node.client.stream import ask_info
from node.swarmkey import SwarmKey
prompt, n = [int(i) for i in sys.argv[2].split(",")], int(sys.argv[3])
key = SwarmKey.load(sys.argv[5]) if len(sys.argv) > 5 else None
config = ClientConfig(hole_punch_wait_s=float(sys.argv[4]), swarm_key=key)
with Client(bootstrap=[sys.argv[1]], config=config) as client:
    route = client.route()
    hops = route[1]
    def pushed():
        return [ask_info(client.channel(h.address), h.address, 10.0).capacity.pushed_steps for h in hops]
    def run(push):
        before, tokens, steps = pushed(), [], 0
        with client.session(len(prompt) + n + 1, route=route, push=push) as session:
            logits = session.step(prompt)
            steps += 1
            while len(tokens) < n:
                tokens.append(int(np.argmax(logits)))
                if len(tokens) < n:
                    logits = session.step([tokens[-1]])
                    steps += 1
            recoveries = list(session.recoveries)
        return {"tokens": tokens, "steps": steps, "recoveries": recoveries,
                "pushed": [b - a for a, b in zip(before, pushed())]}
    answer = {"pushed": run(True), "relayed": run(False)}
    answer.update(hops=[h.peer for h in hops], push_addresses=[client.push_address(h) for h in hops],
                  paths=client.paths())
    print(json.dumps(answer))
"""


@pytest.fixture(scope="module", params=["private"])  # "open" too: the same path, 43 s more
def swarm(
    request: pytest.FixtureRequest, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The swarm above; "private": every daemon and the client hold a swarm key, so B's tunnel
    streams and its Push calls to A prove it (libp2p streams and gRPC alike)."""
    keys = tmp_path_factory.mktemp("natpushkeys")
    model = str(tiny_models["mixtral"])
    daemons: dict[str, DaemonProcess] = {}
    private: list[str] = []
    if request.param == "private":
        generate_key_file(keys / "swarm.key")
        private = [str(keys / "swarm.key")]
    with NatLab(drop_unsolicited=(False, True)) as lab:
        try:

            def start(name: str, where: Any, args: list[str]) -> DaemonProcess:
                common = ["--host", where.ip, "--identity", str(keys / f"{name}.key"), "--autonat-confirmations", "2"]
                secret = ["--swarm-key", *private] if private else []
                daemons[name] = start_daemon([*common, *secret, *args], wrap=where.argv)
                return daemons[name]

            boot = start("boot", lab.public, ["--relay"]).multiaddr
            start("b", lab.public, ["--model", model, "--layers", "0:2", "--bootstrap", boot])
            start("a", lab.a, ["--model", model, "--layers", "2:4", "--bootstrap", boot])
            _wait_log(daemons["a"], "moemesh: reachable through relays at: /ip4/", 60)
            yield {"lab": lab, "daemons": daemons, "boot": boot, "key": private}
        finally:
            for d in daemons.values():
                d.terminate()
            for d in daemons.values():
                d.stop()


def test_a_hop_pushes_to_a_next_hop_behind_nat_through_its_own_tunnel(
    swarm: dict[str, Any], tiny_models: dict[str, Path]
) -> None:
    prompt, n = [5, 17, 99, 3, 250, 42], 10
    expected = reference_tokens(tiny_models["mixtral"], prompt, n, stop_at_eos=True)
    args = [sys.executable, "-c", CLIENT, swarm["boot"], ",".join(map(str, prompt)), str(n), "25", *swarm["key"]]
    answer = json.loads(_in(swarm["lab"].c, args, 240).strip().splitlines()[-1])
    a, b = (swarm["daemons"][name] for name in ("a", "b"))
    assert answer["hops"] == [b.peer_id, a.peer_id], answer
    assert answer["push_addresses"][1] == f"p2p:{a.peer_id}#{a.fingerprint}"  # named by its peer id
    pushed, relayed = answer["pushed"], answer["relayed"]
    assert pushed["tokens"] == relayed["tokens"] == expected
    assert not pushed["recoveries"] and not relayed["recoveries"]
    # every step reached A from B (pushed through B's tunnel), none from the client
    assert pushed["pushed"] == [0, pushed["steps"]], answer
    assert relayed["pushed"] == [0, 0], answer
    opened = [line for line in b.log if f"push tunnel to {a.peer_id} open" in line]
    assert opened, "\n".join(b.log[-30:])  # B's own tunnel, not the client's
    print(f"\nclient -> A: {answer['paths'][a.peer_id]}; B -> A: {opened[0].rsplit('(', 1)[-1].rstrip(')')}")
