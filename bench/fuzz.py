"""Fuzz every handler of a live daemon with hostile messages and report what happened.

    python bench/fuzz.py [--count 10000] [--only sync,Forward] [--seed 0] [--private]

Starts one `moemesh daemon` serving a tiny random model (all layers) on loopback, then sends
`--count` messages to each handler (node.testing.fuzz: the gRPC methods Forward, Info and
InferenceSession; the libp2p protocols sync, record and the gRPC tunnel; Kademlia's stream
and its PUT_VALUE) from a throwaway identity, and prints per handler: messages sent, crashes
(the daemon exited), hangs (nothing within 10 s), non-status errors (UNKNOWN / INTERNAL
answers, tracebacks or ERROR lines in the daemon's log), and the daemon's RSS before and after.
At the end it checks the daemon still serves: its record, its Info, and a generation.
With --private the daemon has a swarm key and the fuzzer does not: every message meets the
swarm-key doors (the final check uses the key).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import build  # noqa: E402

from node.client import Client, ClientConfig  # noqa: E402
from node.client.channels import Channels  # noqa: E402
from node.swarmkey import generate_key_file  # noqa: E402
from node.testing.fuzz import GRPC_HANDLERS, MESH_HANDLERS, MeshProbe, Outcome, grpc_send, messages  # noqa: E402
from node.testing.launch import start_daemon  # noqa: E402
from protocol import DEFAULT_MAX_MESSAGE_BYTES  # noqa: E402
from protocol.shard_pb2 import InfoResponse  # noqa: E402

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
BATCH = 250


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bad_lines(log: list[str], since: int) -> int:
    return sum(1 for line in log[since:] if "Traceback" in line or " ERROR " in line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="messages per handler (default 10000)")
    parser.add_argument("--only", help="comma-separated handlers (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--private", action="store_true", help="the daemon has a swarm key, the fuzzer none")
    args = parser.parse_args()
    handlers = [*GRPC_HANDLERS, *MESH_HANDLERS]
    if args.only:
        handlers = [h for h in handlers if h in args.only.split(",")]
    root = Path(tempfile.mkdtemp(prefix="moemesh-fuzz-"))
    model = build(root / "tiny", TINY, torch.float32)
    key = generate_key_file(root / "swarm.key") if args.private else None
    private = ["--swarm-key", str(root / "swarm.key")] if key is not None else []
    daemon = start_daemon(
        ["--model", str(model), "--layers", "0:4", "--identity", str(root / "id.key"), "--ttl", "60", *private],
        verbose=False,
    )
    channels = Channels(DEFAULT_MAX_MESSAGE_BYTES, 10.0)
    ok = True
    try:
        pid = daemon.process.pid
        channel = channels.get(daemon.pinned)
        member = Channels(DEFAULT_MAX_MESSAGE_BYTES, 10.0, swarm_key=key)
        try:
            info = member.get(daemon.pinned).unary_unary("/moemesh.v1.Shard/Info")(b"", timeout=10)
        finally:
            member.close()
        model_id = InfoResponse.FromString(info).model_id
        rng = random.Random(args.seed)
        kind = "a private daemon, a fuzzer without its key" if key is not None else "an open daemon"
        print(f"{kind}: {daemon.peer_id} (pid {pid}), {args.count} messages per handler")
        heads = f"{'handler':18} {'sent':>7} {'crashes':>7} {'hangs':>6} {'non-status':>10}"
        print(f"{heads} {'unsent':>6} {'RSS before':>11} {'RSS after':>10}  seconds")
        with MeshProbe(daemon.multiaddr) as probe, ThreadPoolExecutor(8) as pool:
            for handler in handlers:
                before, since, started = rss_mb(pid), len(daemon.log), time.monotonic()
                counts: Counter[Outcome] = Counter()
                sent = 0
                while sent < args.count and daemon.process.poll() is None:
                    n = min(BATCH, args.count - sent)
                    batch = [messages(handler, rng, model_id=model_id, target=daemon.peer_id) for _ in range(n)]
                    if handler in GRPC_HANDLERS:
                        counts.update(pool.map(lambda m, h=handler: grpc_send(channel, h, m), batch))
                    else:
                        counts.update(probe.send(handler, batch))
                    sent += n
                crashed = int(daemon.process.poll() is not None)
                errors = counts[Outcome.ERROR] + bad_lines(daemon.log, since)
                after = rss_mb(pid) if not crashed else float("nan")
                ok = ok and not crashed and not counts[Outcome.HANG] and not errors and not counts[Outcome.DOWN]
                print(
                    f"{handler:18} {sent:7d} {crashed:7d} {counts[Outcome.HANG]:6d} {errors:10d}"
                    f" {counts[Outcome.DOWN]:6d} {before:8.0f} MB {after:7.0f} MB  {time.monotonic() - started:.0f}",
                    flush=True,
                )
                if crashed:
                    print("\n".join(daemon.log[-30:]))
                    return 1
        with Client(
            bootstrap=[daemon.multiaddr], config=ClientConfig(swarm_key=key)
        ) as client:  # still serving: record, Info, a generation
            tokens = list(client.generate([3, 1, 4, 1, 5], 8, stop_at_eos=False))
        print(f"after the fuzz: the daemon's record, Info and a generation work ({len(tokens)} tokens)")
        for line in [line for line in daemon.log if "Traceback" in line or " ERROR " in line][:10]:
            print("daemon log:", line)
    finally:
        channels.close()
        daemon.terminate()
        daemon.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
