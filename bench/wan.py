"""Benchmark: per-token latency over links of a chosen one-way delay, client-relayed vs pushed.

netem is not available here, so a proxy of ours (asyncio, one process) stands in front of every
server and holds each chunk of bytes, in each direction, for the one-way delay before passing
it on. The client dials the proxies' addresses, and so do the servers when they push to the
next hop (the route carries the addresses the client dials): every link between processes,
client to hop, hop to hop and hop to client, pays the delay once per direction. TLS passes
through untouched (a plain TCP forwarder; the pin is still checked end to end).

For 2 and 3 hops at each delay it prints the per-token latency of both modes and its network
part (the latency minus that of the same mode through the proxies with no delay) as a multiple
of the one-way delay: a client relaying every hop pays 2 legs per hop, a pushed chain hops + 1.
Target: pushed pays at most (hops + 1) one-way delays per token plus compute, within 15 %.

    python bench/wan.py                      # 10 and 30 ms, 2 and 3 hops, random Llama ~58M (fp32)
    python bench/wan.py --delays 20 --tokens 8
    python bench/wan.py --mbit 20 --hops 2   # links of 20 Mbit/s too: the last hop's token vs its logits

Decoding is `Client.generate`'s: the last hop samples and answers the token id; with `--mbit`
a pushed chain that sends every step's logits to the client (128 KB a token here: fp32, 32,000
tokens) is measured beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from node.client.sampling import Sampling  # noqa: E402

GREEDY = Sampling()

# -- the delaying proxy (its own process: nothing of the client's threads slows it) ------------


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Synchronized[float], mbit: float
) -> None:
    """Copy reader to writer, each chunk `delay` seconds after it arrived (order kept); with
    `mbit`, each chunk also waits its turn on a link of that rate (one per direction)."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    free = 0.0  # when the link has sent everything before

    async def pump() -> None:
        nonlocal free
        while True:
            data = await reader.read(1 << 16)
            sent = loop.time()
            if mbit > 0:
                free = sent = max(sent, free) + len(data) * 8 / (mbit * 1e6)
            chunks.put_nowait((sent + delay.value, data))
            if not data:
                return

    async def send() -> None:
        while True:
            due, data = await chunks.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    with contextlib.suppress(ConnectionError, OSError):
        await asyncio.gather(pump(), send())
    writer.close()


async def _serve_proxies(
    targets: list[int],
    delay: Synchronized[float],
    mbit: float,
    ports: multiprocessing.Queue[list[int]],
    stop: multiprocessing.synchronize.Event,
) -> None:
    connections: set[asyncio.Task[None]] = set()

    async def forward_to(port: int) -> asyncio.Server:
        async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
                await asyncio.gather(_pipe(client_r, server_w, delay, mbit), _pipe(server_r, client_w, delay, mbit))
            except (OSError, asyncio.CancelledError):
                client_w.close()
            finally:
                connections.discard(task)

        return await asyncio.start_server(handle, "127.0.0.1", 0)

    servers = [await forward_to(port) for port in targets]
    ports.put([s.sockets[0].getsockname()[1] for s in servers])
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for s in servers:
        s.close()
    for task in list(connections):
        task.cancel()
    await asyncio.gather(*connections, return_exceptions=True)


def _proxy_main(
    targets: list[int],
    delay: Synchronized[float],
    mbit: float,
    ports: multiprocessing.Queue[list[int]],
    stop: multiprocessing.synchronize.Event,
) -> None:
    asyncio.run(_serve_proxies(targets, delay, mbit, ports, stop))


@contextlib.contextmanager
def delaying_proxies(targets: list[int], mbit: float = 0.0) -> Iterator[tuple[list[int], Synchronized[float]]]:
    """A proxy in front of each loopback port of `targets` (`mbit`: each link's rate, 0: none):
    (their ports, the one-way delay in s to set)."""
    ctx = multiprocessing.get_context("spawn")
    delay: Synchronized[float] = ctx.Value("d", 0.0)  # type: ignore[assignment]
    ports: multiprocessing.Queue[list[int]] = ctx.Queue()
    stop = ctx.Event()
    process = ctx.Process(target=_proxy_main, args=(targets, delay, mbit, ports, stop), daemon=True)
    process.start()
    try:
        yield ports.get(timeout=60), delay
    finally:
        stop.set()
        process.join(5)
        if process.is_alive():
            process.kill()


# -- the benchmark ----------------------------------------------------------------------------


def per_token_s(client: object, push: bool, prompt: list[int], tokens: int, sampled: bool = True) -> float:
    """Median seconds per greedy decode token of one session: sampled by the last hop as
    `Client.generate` decodes, or (`sampled=False`) with every step's logits sent to the client."""
    with client.session(len(prompt) + tokens + 1, push=push) as session:  # type: ignore[attr-defined]
        token = int(session.step(prompt).argmax())
        gaps = []
        for i in range(tokens):
            started = time.perf_counter()
            if sampled:
                token = session.next_token([token], GREEDY, i + 1)
            else:
                token = int(session.step([token]).argmax())
            gaps.append(time.perf_counter() - started)
    return statistics.median(gaps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", type=float, nargs="+", default=[10.0, 30.0], help="one-way delays in ms")
    parser.add_argument("--hops", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--tokens", type=int, default=16, help="decode tokens per measurement (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--mbit",
        type=float,
        default=0.0,
        help="also limit every link to this rate, each direction (e.g. 20: a home line), and measure a pushed"
        " chain that sends the logits to the client beside one whose last hop samples (default: no limit)",
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()

    from pipeline import LLAMAS, build_llama

    from node.client import Client
    from node.testing.launch import local_swarm
    from shards import split_evenly

    name = "llama-58m"
    folder = build_llama(args.cache / name, LLAMAS[name])
    layers = LLAMAS[name]["num_hidden_layers"]
    prompt = list(range(1, 17))
    rate = f" at {args.mbit:g} Mbit/s" if args.mbit else ""
    summary: dict[str, dict[str, float]] = {}
    # (push, the last hop samples); with a rate limit, also a pushed chain sending the logits
    modes = [(False, True), (True, True), *([(True, False)] if args.mbit else [])]
    for hops in args.hops:
        with local_swarm(folder, split_evenly(layers, hops)) as servers:
            targets = [int(s.address.rsplit(":", 1)[1]) for s in servers]
            with delaying_proxies(targets, args.mbit) as (ports, delay):
                addresses = [f"127.0.0.1:{p}#{s.fingerprint}" for p, s in zip(ports, servers, strict=True)]
                with Client(addresses) as client:
                    per_token_s(client, True, prompt, 2)  # warm-up: channels, TLS, push links
                    # rounds interleave the delays and modes, so drift on this shared machine hits all alike
                    rounds: list[dict[tuple[float, bool, bool], float]] = []
                    for _ in range(args.repeat):
                        rounds.append({})
                        for ms in [0.0, *args.delays]:
                            delay.value = ms / 1000
                            for push, sampled in modes:
                                rounds[-1][ms, push, sampled] = per_token_s(client, push, prompt, args.tokens, sampled)
        for push, sampled in modes:
            key = f"{hops} hops, {'pushed' if push else 'relayed'}" + ("" if sampled else ", logits to the client")
            legs = hops + 1 if push else 2 * hops
            base = statistics.median(r[0.0, push, sampled] for r in rounds)
            summary[key] = {"0 ms": base}
            for ms in args.delays:
                t = summary[key][f"{ms:g} ms"] = statistics.median(r[ms, push, sampled] for r in rounds)
                network = statistics.median(r[ms, push, sampled] - r[0.0, push, sampled] for r in rounds)
                summary[key][f"{ms:g} ms network x one-way"] = network / (ms / 1000)
                print(
                    f"{key:18} one-way {ms:4g} ms{rate}: {1000 * t:7.1f} ms/token (no delay {1000 * base:5.1f}),"
                    f" network {1000 * network:6.1f} ms = {network / (ms / 1000):4.2f} x one-way"
                    f" (ideal {legs})"
                    + (
                        f" -> target <= {legs} x 1.15: {'met' if network <= 1.15 * legs * ms / 1000 else 'NOT met'}"
                        if push and sampled and not args.mbit
                        else ""
                    ),
                    flush=True,
                )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
