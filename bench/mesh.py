"""Benchmark: how fast the mesh comes together, with 5 and with 20 daemons on loopback.

For each swarm size N it starts a bootstrap daemon and N serving daemons (separate
processes, one after another, each joining through the bootstrap), and prints

  - daemon start -> "advertised" (process start, model load, throughput probe, libp2p
    start, joining the DHT, publishing the signed record and the block provider keys),
  - client start -> route found -> first token, for a client that knows only the
    bootstrap address (joins the DHT as a client, reads the records of every block,
    measures RTTs, opens a session on each hop, prefills, samples).

    python bench/mesh.py [--sizes 5 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from pipeline import build  # noqa: E402

from node.client import Client  # noqa: E402
from node.testing.launch import DaemonProcess, start_daemon  # noqa: E402

TINY = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)
SPANS = ["0:2", "2:4", "0:4", "1:3"]


def run(size: int, model: Path, keys: Path) -> dict[str, float]:
    daemons: list[DaemonProcess] = []
    try:
        boot = start_daemon(["--identity", str(keys / f"boot-{size}.key")], verbose=False)
        daemons.append(boot)
        for i in range(size):
            args = [
                "--model",
                str(model),
                "--layers",
                SPANS[i % len(SPANS)],
                "--bootstrap",
                boot.multiaddr,
                "--identity",
                str(keys / f"{size}-{i}.key"),
                "--threads",
                "1",
            ]
            daemons.append(start_daemon(args, verbose=False))
        advertised = [d.advertised_after_s for d in daemons[1:]]
        started = time.perf_counter()
        with Client(bootstrap=[boot.multiaddr]) as client:
            _, hops = client.route()
        routed = time.perf_counter()
        with Client(bootstrap=[boot.multiaddr]) as client:
            next(iter(client.generate([1, 2, 3, 4], 4, stop_at_eos=False)))
        first = time.perf_counter()
        return {
            "advertised_median_s": statistics.median(advertised),
            "advertised_max_s": max(advertised),
            "route_s": routed - started,
            "first_token_s": first - routed,  # a fresh client: discovery, route, sessions, prefill
            "hops": len(hops),
        }
    finally:
        for d in daemons:  # SIGTERM all first: each withdraws its record concurrently
            d.terminate()
        for d in daemons:
            d.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moemesh-mesh-bench-"))
    model = build(work / "tiny", TINY, torch.float32)
    results = {n: run(n, model, work) for n in args.sizes}
    print(
        f"\n{'daemons':>8} {'start->advertised median s':>26} {'max s':>7} {'client->route s':>16}"
        f" {'client->first token s':>22} {'hops':>5}"
    )
    for n, r in results.items():
        print(
            f"{n:8d} {r['advertised_median_s']:26.2f} {r['advertised_max_s']:7.2f} {r['route_s']:16.2f}"
            f" {r['first_token_s']:22.2f} {r['hops']:5.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
