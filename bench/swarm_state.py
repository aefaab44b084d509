"""Benchmark: the cost of the replicated swarm state, simulated in process (no network).

1. Bytes on the wire for ONE member change (a peer moves its span) in swarms of 10, 100
   and 1,000 members: the eager PUSH frame, a whole push-pull anti-entropy conversation
   that carries the change to a peer that missed it (its state vectors grow with the
   number of writers), and, for scale, the whole document (what a full-state sync sends).
2. Anti-entropy rounds until 50 replicas that each know only their own record agree: in
   each round every replica holds one conversation with a random other replica.

    python bench/swarm_state.py [--sizes 10 100 1000] [--replicas 50] [--trials 20]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from functools import cache  # noqa: E402

from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402

from crdt import Load, Member, Replica, decode_frame, encode_frame  # noqa: E402
from node.mesh.identity import Libp2pSigner, Libp2pVerifier  # noqa: E402
from protocol.swarm_pb2 import SyncFrame  # noqa: E402

VERIFIER = Libp2pVerifier()


@cache
def signer(i: int) -> Libp2pSigner:
    return Libp2pSigner(create_new_key_pair())


def replica(i: int | None) -> Replica:
    """The replica of member i (signing as it), or a read-only one."""
    return Replica(VERIFIER, signer(i) if i is not None else None)


def member(i: int, start: int = 0) -> Member:
    pid = signer(i).peer_id
    return Member(
        pid,
        addresses=(f"10.0.{i // 250}.{i % 250}:7001",),
        model_id="036aee6454843a7e492fc20e",
        start=start,
        end=start + 8,
        capacity_bytes=4 << 30,
        throughput=25.0 + i % 7,
        version="0.1.0",
        lease_until=time.time() + 30,
        p2p_addresses=(f"/ip4/10.0.{i // 250}.{i % 250}/tcp/4001/p2p/{pid}",),
        num_layers=32,
        max_layers=8,
        state="serving",
    )


def conversation(a: Replica, b: Replica) -> int:
    """An anti-entropy conversation a -> b as the wire runs it; the bytes of every frame."""
    frame: SyncFrame | None = a.pull()
    sides, sent, turn = [b, a], 0, 0
    while frame is not None and turn < 6:
        data = encode_frame(frame)
        sent += len(data) + 4  # + the length prefix
        frame = sides[turn % 2].receive(decode_frame(data))
        turn += 1
    return sent


def one_change(n: int) -> dict[str, int]:
    mover = replica(0)
    mover.set_member(member(0))
    mover.set_load(Load(2, 4096, 0))
    seen, behind = replica(None), replica(None)
    for r in (seen, behind):
        r.state.apply(mover.state.diff())
    for i in range(1, n):
        other = replica(i)
        other.set_member(member(i))
        other.set_load(Load(i % 5, 8192, i % 3))
        update = other.state.diff()
        seen.state.apply(update)
        behind.state.apply(update)
    mover.state.apply(seen.state.diff(mover.state.state_vector()))
    mover.take_outbox()
    mover.set_member(member(0, start=8))  # the change: a new span
    push = encode_frame(mover.push(mover.take_outbox() or b""))
    assert seen.receive(decode_frame(push)) is None
    repair = conversation(behind, mover)
    assert behind.state.members() == mover.state.members()
    return {"push": len(push) + 4, "anti_entropy": repair, "whole": len(mover.state.diff())}


def rounds_to_converge(replicas: int, rng: random.Random) -> int:
    nodes = [replica(i) for i in range(replicas)]
    for i, r in enumerate(nodes):
        r.set_member(member(i))
    for r in nodes:
        r.take_outbox()  # no eager push here: anti-entropy alone
    for round_ in range(1, 100):
        for i, r in enumerate(nodes):
            j = rng.choice([k for k in range(replicas) if k != i])
            conversation(r, nodes[j])
        first = nodes[0].state.members()
        if all(len(r.state.members()) == replicas and r.state.members() == first for r in nodes):
            return round_
    raise RuntimeError("no convergence in 100 rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--replicas", type=int, default=50)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()

    print("bytes on the wire for one member change (incl. 4-byte frame prefixes)")
    print(f"{'members':>8} {'eager push':>11} {'anti-entropy':>13} {'whole doc':>10} {'push / whole':>13}")
    for n in args.sizes:
        r = one_change(n)
        print(f"{n:>8} {r['push']:>11} {r['anti_entropy']:>13} {r['whole']:>10} {r['push'] / r['whole']:>13.4f}")
    rng = random.Random(1)
    rounds = [rounds_to_converge(args.replicas, rng) for _ in range(args.trials)]
    print(
        f"anti-entropy rounds until {args.replicas} replicas agree (each replica one push-pull per round,"
        f" {args.trials} trials): median {statistics.median(rounds):g}, min {min(rounds)}, max {max(rounds)};"
        f" log2({args.replicas}) = {math.log2(args.replicas):.1f}"
    )


if __name__ == "__main__":
    main()
