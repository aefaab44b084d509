"""Benchmark: aggregate decode tokens/s of 1, 4 and 8 concurrent sessions on one server
(continuous batching), and the stall a SIGKILL of the serving peer adds to a generation after
48 and 512 tokens of history, recovered by replaying the history to the other peer (the stall
grows with the history) and by a warm spare kept in step on it (it does not).

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

from node.client import Client, ClientConfig, Hop  # noqa: E402
from node.testing.launch import ServerProcess, local_swarm  # noqa: E402


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


def kill_stall(
    servers: list[ServerProcess], layers: int, prompt: list[int], history: int, warm_spares: bool
) -> tuple[float, float, int]:
    """Generate through the first of the servers of the whole model; SIGKILL it after `history`
    tokens. Returns (median token interval, the interval that held the recovery, steps replayed)."""
    with Client([s.pinned for s in servers], config=ClientConfig(warm_spares=warm_spares)) as client:
        model_id, _ = client.route()
        victim = servers[0]
        route = (model_id, [Hop(victim.pinned, 0, layers, victim.pinned)])
        stamps = [time.perf_counter()]
        tokens = history + 8
        for i, _ in enumerate(client.generate(prompt, tokens, stop_at_eos=False, route=route)):
            stamps.append(time.perf_counter())
            if i + 1 == history:
                victim.process.kill()
                victim.process.wait()
        gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
        assert client.recoveries, "the generation did not notice the kill"
        replayed = int(client.recoveries[0].rsplit(",", 1)[1].split()[0])
        return statistics.median(gaps), gaps[history - 1], replayed


def kill_stalls(folder: Path, layers: int, prompt: list[int], histories: list[int]) -> dict[str, float]:
    """The stall of a SIGKILL after each of `histories` tokens, recovered by replay and by a warm spare."""
    summary: dict[str, float] = {}
    for warm in (False, True):
        for history in histories:
            with local_swarm(folder, [(0, layers), (0, layers)]) as servers:
                median_gap, stall_gap, replayed = kill_stall(servers, layers, prompt, history, warm)
            how = "warm spare" if warm else "replay"
            stall = summary[f"kill_stall_s_{history}_{'warm' if warm else 'replay'}"] = stall_gap - median_gap
            target = 0.5 if history <= 48 else 2.0
            print(
                f"SIGKILL of the serving peer after {history} tokens, {how}: the token after it took {stall_gap:.3f} s"
                f" against a median {median_gap:.3f} s, a stall of {stall:.3f} s ({replayed} steps replayed)"
                + (f" -> target <= {target:g} s {'met' if stall <= target else 'NOT met'}" if warm else ""),
                flush=True,
            )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model instead of the bench model")
    parser.add_argument("--tokens", type=int, default=24, help="decode tokens per session (default 24)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--histories", type=int, nargs="+", default=[48, 512], help="tokens before the SIGKILL (default 48 512)"
    )
    parser.add_argument("--stall-only", action="store_true", help="only the SIGKILL stalls")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()

    shape = SMALL if args.small else BENCH
    name = f"{'small' if args.small else 'bench'}-bfloat16"
    print(f"building/reusing {name} model in {args.cache / name} ...", flush=True)
    folder = build(args.cache / name, shape, torch.bfloat16)
    layers = shape["num_hidden_layers"]
    prompt = torch.randint(1, 1000, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    counts = (1, 4, 8)
    if args.stall_only:
        print(json.dumps(kill_stalls(folder, layers, prompt, args.histories)))
        return 0

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

    print()
    summary.update(kill_stalls(folder, layers, prompt, args.histories))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
