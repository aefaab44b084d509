"""Latency through NAT: per-token decode and 128-token prefill over a direct, a hole-punched and a
relayed path, as ratios to the direct one (all measured in one run, on one machine).

Builds the namespace lab of node/netlab.py (needs root, iproute2, iptables): a public
bootstrap+relay daemon and a public server D, a server N behind NAT 1, and a client behind
NAT 2 (drops unsolicited inbound). D and N serve the same model, all layers. The client
measures D over direct gRPC, then N through the tunnel while its libp2p connection is
relayed, then N again once DCUtR has punched a direct connection.

    sudo .venv/bin/python bench/nat.py [--decode-steps 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from pipeline import SMALL, build  # noqa: E402

from node.testing.launch import DaemonProcess, start_daemon  # noqa: E402
from node.testing.netlab import Host, NatLab, unavailable_reason  # noqa: E402

CLIENT = r"""
import json, statistics, sys, time
from node.client import Client, InferenceSession
from node.plan.routing import Hop

boot, direct_peer, natted_peer, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = Client(bootstrap=[boot])
swarm = client._swarm()
model_id, snapshot = swarm.model(None)
layers = snapshot.records[direct_peer].shards[0].num_layers
tunnel = swarm.tunnel(snapshot.records[natted_peer])
client._tunnelled[tunnel] = natted_peer


def measure(address, peer):
    with InferenceSession(client, [Hop(address, 0, layers, peer)], model_id, 3 * 128 + steps + 8) as s:
        path = client._channel_paths.get(address, "direct")
        prefill = []
        for k in range(3):
            started = time.perf_counter()
            logits = s.step([(7 * i + k) % 200 for i in range(128)])
            prefill.append(time.perf_counter() - started)
        decode = []
        token = int(logits.argmax())
        for _ in range(steps):
            started = time.perf_counter()
            token = int(s.step([token]).argmax())
            decode.append(time.perf_counter() - started)
    return {"path": path, "prefill_s": statistics.median(prefill), "decode_s": statistics.median(decode)}


out = {"relayed": measure(tunnel, natted_peer)}  # at once: the hole punch takes seconds
out["direct"] = measure(snapshot.records[direct_peer].grpc_addresses[0], direct_peer)
deadline = time.monotonic() + 60
while client.paths()[natted_peer] != "hole-punched" and time.monotonic() < deadline:
    time.sleep(0.5)
out["hole-punched"] = measure(tunnel, natted_peer)  # a new channel, on the direct connection
client.close()
print(json.dumps(out))
"""


# Small enough that the path, not the compute, shows in the ratios.
SHAPE = dict(SMALL, num_hidden_layers=4, num_local_experts=8, vocab_size=256)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"bench/nat.py: cannot build the NAT lab: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, NatLab() as lab:
        model = str(build(Path(tmp) / "model", SHAPE, torch.float32))
        daemons: list[DaemonProcess] = []
        try:

            def start(name: str, where: Host, extra: list[str]) -> DaemonProcess:
                common = ["--host", where.ip, "--identity", f"{tmp}/{name}.key", "--autonat-confirmations", "2"]
                daemons.append(start_daemon([*common, *extra], wrap=where.argv, verbose=False))
                return daemons[-1]

            boot = start("boot", lab.public, ["--relay"]).multiaddr
            direct = start("direct", lab.public, ["--model", model, "--layers", ":", "--bootstrap", boot])
            natted = start("natted", lab.a, ["--model", model, "--layers", ":", "--bootstrap", boot])
            deadline = time.monotonic() + 90
            while not any("reachable through relays at: /ip4/" in line for line in natted.log):
                if time.monotonic() > deadline:
                    raise SystemExit("the NAT'd server got no relay reservation:\n" + "\n".join(natted.log[-20:]))
                time.sleep(0.5)
            cmd = [sys.executable, "-c", CLIENT, boot, direct.peer_id, natted.peer_id, str(args.decode_steps)]
            result = subprocess.run(lab.c.argv(cmd), cwd=ROOT, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            out = json.loads(result.stdout.strip().splitlines()[-1])
        finally:
            for d in daemons:
                d.terminate()
            for d in daemons:
                d.stop()
    base = out["direct"]
    print(f"{'path':<14}{'decode ms/token':>17}{'x direct':>10}{'prefill 128 ms':>16}{'x direct':>10}")
    for name in ("direct", "hole-punched", "relayed"):
        r = out[name]
        label = name if r["path"] in (name, "direct") else f"{name} (was {r['path']})"
        print(
            f"{label:<14}{r['decode_s'] * 1e3:>17.2f}{r['decode_s'] / base['decode_s']:>10.2f}"
            f"{r['prefill_s'] * 1e3:>16.2f}{r['prefill_s'] / base['prefill_s']:>10.2f}"
        )
    print(f"(medians; model hidden 256, 4 layers, 8 experts top-2; {args.decode_steps} decode steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
