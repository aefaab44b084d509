"""Benchmark: aggregate decode tokens/s of 1, 4 and 8 concurrent sessions on one server
(continuous batching), and the stall a SIGKILL of the serving peer adds to a generation.

Ratios are taken within each round (rounds interleave the settings; this machine is shared
and noisy). Target: 8 sessions >= 3x the single-session rate.

    python bench/batching.py            # the bench model of DESIGN.md, random weights, bf16
    python bench/batching.py --small    # a small model, for a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import BENCH, SMALL, build  # noqa: E402

from node.client import Client, Hop  # noqa: E402
from node.testing.launch import local_swarm  # noqa: E402


def aggregate_decode(address: str, sessions: int, prompt: list[int], tokens: int) -> float:
    """Tokens/s of `sessions` concurrent greedy sessions, each with its own client, decoding together."""
    prefilled = threading.Barrier(sessions + 1)
    finished = threading.Barrier(sessions + 1)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with Client([address]) as client, client.session(len(prompt) + tokens + 2) as session:
                token = int(session.step([*prompt[:-1], (prompt[-1] + i) % 1000]).argmax())
                prefilled.wait()
                for _ in range(tokens):
                    token = int(session.step([token]).argmax())
                finished.wait()
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            prefilled.abort()
            finished.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    prefilled.wait()
    started = time.perf_counter()
    finished.wait()
    elapsed = time.perf_counter() - started
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sessions * tokens / elapsed


def kill_stall(folder: Path, layers: int, prompt: list[int], tokens: int) -> tuple[float, float, int]:
    """Generate through one of two servers of the whole model; SIGKILL it halfway. Returns
    (median token interval, the interval that held the recovery, steps replayed)."""
    with local_swarm(folder, [(0, layers), (0, layers)]) as servers:
        with Client([s.pinned for s in servers]) as client:
            model_id, _ = client.route()
            victim = servers[0]
            route = (model_id, [Hop(victim.pinned, 0, layers, victim.pinned)])
            stamps = [time.perf_counter()]
            for i, _ in enumerate(client.generate(prompt, tokens, stop_at_eos=False, route=route)):
                stamps.append(time.perf_counter())
                if i + 1 == tokens // 2:
                    victim.process.kill()
                    victim.process.wait()
            gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
            assert client.recoveries, "the generation did not notice the kill"
            replayed = int(client.recoveries[0].rsplit(",", 1)[1].split()[0])
            return statistics.median(gaps), gaps[tokens // 2 - 1], replayed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model instead of the bench model")
    parser.add_argument("--tokens", type=int, default=24, help="decode tokens per session (default 24)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()

    shape = SMALL if args.small else BENCH
    name = f"{'small' if args.small else 'bench'}-bfloat16"
    print(f"building/reusing {name} model in {args.cache / name} ...", flush=True)
    folder = build(args.cache / name, shape, torch.bfloat16)
    layers = shape["num_hidden_layers"]
    prompt = torch.randint(1, 1000, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    counts = (1, 4, 8)

    rounds: list[dict[int, float]] = []
    with local_swarm(folder, [(0, layers)]) as (server,):
        aggregate_decode(server.pinned, 2, prompt, 2)  # warm-up
        for r in range(args.repeat):
            rounds.append({n: aggregate_decode(server.pinned, n, prompt, args.tokens) for n in counts})
            print(
                f"round {r + 1}/{args.repeat}: "
                + ", ".join(f"{n} sessions {v:.1f} tok/s" for n, v in rounds[-1].items()),
                flush=True,
            )
        with Client([server.pinned]) as client:
            info = client.info(server.pinned)
    print(f"\n{name}: {layers} layers on one server, prompt {args.prompt}, {args.tokens} decode tokens per session")
    print(f"{'sessions':>8} {'aggregate tok/s':>16} {'x 1 session':>12}")
    summary: dict[str, float] = {}
    for n in counts:
        rate = statistics.median(rd[n] for rd in rounds)
        ratio = statistics.median(rd[n] / rd[1] for rd in rounds)
        summary[f"{n}_sessions_tok_s"], summary[f"{n}_sessions_x_one"] = rate, ratio
        print(f"{n:8d} {rate:16.1f} {ratio:12.2f}")
    print(f"decode steps the server ran batched: {info.batched_steps}")
    eight = summary["8_sessions_x_one"]
    print(f"target: 8 sessions >= 3x one session: {eight:.2f}x -> {'met' if eight >= 3 else 'NOT met'}")

    median_gap, stall_gap, replayed = kill_stall(folder, layers, prompt, 2 * args.tokens)
    summary["kill_stall_s"] = stall_gap - median_gap
    print(
        f"\nSIGKILL of the serving peer halfway through {2 * args.tokens} tokens: the token after it took"
        f" {stall_gap:.3f} s against a median {median_gap:.3f} s, a stall of {stall_gap - median_gap:.3f} s"
        f" ({replayed} steps replayed on the spare peer)"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
