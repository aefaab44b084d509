"""Benchmark: a victim's generation under a flood of queued prefills from another client.

One server; one client sends 100 stateless 512-token Forwards at once (the server's per-client
queue limit is raised so that all of them queue); meanwhile another client generates a few
tokens. Prints the victim's slowdown ratio (its time under the flood over its time alone,
measured in the same run). The scheduler serves clients round-robin, so the target is <= 3x;
before it, the victim waited for the whole flood.

    python bench/fairness.py            # the bench model of DESIGN.md, random weights, bf16
    python bench/fairness.py --small    # a small model, for a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import BENCH, SMALL, build  # noqa: E402

from node.testing.flood import victim_slowdown  # noqa: E402
from node.testing.launch import local_swarm  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model instead of the bench model")
    parser.add_argument("--requests", type=int, default=100, help="Forwards in the flood (default 100)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per flood Forward (default 512)")
    parser.add_argument("--victim-tokens", type=int, default=2, help="tokens the victim generates (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()

    shape = SMALL if args.small else BENCH
    name = f"{'small' if args.small else 'bench'}-bfloat16"
    print(f"building/reusing {name} model in {args.cache / name} ...", flush=True)
    folder = build(args.cache / name, shape, torch.bfloat16)
    layers = shape["num_hidden_layers"]
    extra = ["--max-queued-per-client", str(args.requests + 1), "--max-length", str(max(2048, args.tokens))]
    ratios = []
    with local_swarm(folder, [(0, layers)], extra_args=extra) as (server,):
        for r in range(args.repeat):
            result = victim_slowdown(
                server.pinned, layers, requests=args.requests, tokens=args.tokens, victim_tokens=args.victim_tokens
            )
            ratios.append(result.ratio)
            print(
                f"round {r + 1}/{args.repeat}: victim alone {result.unloaded_s:.3f} s, under the flood"
                f" {result.loaded_s:.3f} s: {result.ratio:.2f}x ({result.queued_at_start} queued at its start,"
                f" {result.flood_left} flood requests still unanswered at its end)",
                flush=True,
            )
    ratio = statistics.median(ratios)
    print(
        f"\n{name}: {args.requests} Forwards of {args.tokens} tokens from one client;"
        f" another client's {args.victim_tokens}-token generation takes {ratio:.2f}x its unloaded time"
        f" (median of {args.repeat}) -> target <= 3x {'met' if ratio <= 3 else 'NOT met'}"
    )
    print(json.dumps({"victim_slowdown_x": ratio, "rounds": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
