"""`make demo`: a local swarm of three serving processes on loopback answering a prompt.

python -m node.demo ["your question"]
"""

from __future__ import annotations

import argparse
import sys
import time

from node.client import Client
from node.demo_model import build_demo_model
from node.testing.launch import local_swarm
from shards import Checkpoint, split_evenly

DEFAULT_PROMPT = "What is the capital of France, and what is it famous for?"


def main() -> int:
    parser = argparse.ArgumentParser(description="Run three local peers, each serving a third of the demo model.")
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--peers", type=int, default=3, help="serving processes (default 3)")
    args = parser.parse_args()

    model = build_demo_model()
    layers = Checkpoint(model).config.num_layers
    spans = split_evenly(layers, args.peers)
    print(f"demo: starting {args.peers} peers on loopback: layers " + ", ".join(f"{a}:{b}" for a, b in spans))
    with local_swarm(model, spans) as servers:
        for s in servers:
            print(f"demo:   layers {s.layers[0]}:{s.layers[1]} on {s.address} (pid {s.process.pid})")
        print(f"\nuser> {args.prompt}\nassistant> ", end="", flush=True)
        started, count = time.monotonic(), 0
        with Client([s.pinned for s in servers], model_folder=model) as client:
            for piece in client.generate_text(args.prompt, args.max_new_tokens, chat=True):
                print(piece, end="", flush=True)
                count += 1
        elapsed = time.monotonic() - started
        print(f"\n\ndemo: {count} tokens in {elapsed:.1f} s through {len(servers)} peers; stopping them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
