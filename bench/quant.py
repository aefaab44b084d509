"""Benchmark: weight-only quantization (none | bf16 | int8 | int4), its decode speed and its quality.

Rows: "bf16 tf" is --quantize none, the bf16 checkpoint on transformers' kernels and bits (what
makes a pipeline of unquantized peers equal transformers); "bf16" is --quantize bf16, the same
weights on moemesh's decode kernels (fp32 sums in their own order: not transformers' bits).

Speed, on the bench model (random weights, bf16), one process, the span called in process
(no gRPC): decode tok/s after a 128-token prompt at each setting, the bytes of
weights one token reads, the streaming-read bandwidth measured here (``tensor.sum()`` over
1 GiB of fp32), and the fraction of that limit reached. Rounds interleave the settings and
the bandwidth probe; ratios are taken within each round, then the median over rounds is
shown (this machine is shared and noisy: compare ratios, not times). Then the same through
serving processes: one process and a 2-span pipeline at each precision, interleaved.

Quality, on the demo model (SmolLM2-135M upcycled to 4 experts, a real language model):
perplexity on bench/text.txt (public-domain English), per-layer relative error of the
hidden states, and greedy agreement with bf16 over the first 32 tokens of 8 prompts (fp32,
unquantized, shows for scale how far greedy decoding moves under rounding alone).

    python bench/quant.py                 # both parts
    python bench/quant.py --small         # a small random model instead of the bench model
    python bench/quant.py --skip-quality  # speed only (no demo model needed)
    python bench/quant.py --skip-pipelines  # no serving processes (1 process vs a 2-span pipeline)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import BENCH, SMALL, build  # noqa: E402

from kernels import ModelConfig, SpanModel, layer_errors, weight_bytes_per_token  # noqa: E402
from shards import Checkpoint  # noqa: E402

MODES = ("none", "bf16", "int8", "int4")
LABEL = {"none": "bf16 tf", "bf16": "bf16", "int8": "int8", "int4": "int4", "fp32": "fp32"}
TEXT = ROOT / "bench" / "text.txt"
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite book is",
    "The theory of evolution explains",
    "In the morning, the market was",
)


def streaming_read(buffer: torch.Tensor) -> float:
    """Bytes/s of one pass of ``sum()`` over `buffer` (a streaming read of memory)."""
    started = time.perf_counter()
    buffer.sum()
    return buffer.numel() * buffer.element_size() / (time.perf_counter() - started)


def decode_rate(span: SpanModel, prompt: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tok/s): prefill `prompt` [1, T], then `tokens` greedy steps."""
    cache = span.new_cache(prompt.shape[1] + tokens + 1)
    t0 = time.perf_counter()
    token = span(prompt, cache, 0, last_only=True)[0, -1].argmax()
    t1 = time.perf_counter()
    position = prompt.shape[1]
    for _ in range(tokens):
        token = span(token.view(1, 1), cache, position, last_only=True)[0, -1].argmax()
        position += 1
    return t1 - t0, tokens / (time.perf_counter() - t1)


def _span_worker(folder: str, mode: str, prompt: torch.Tensor, conn: Connection, threads: int = 0) -> None:
    """A process holding one precision's span: it answers ("run", tokens) with decode_rate's figures.

    One process per precision: once torch's int8 kernel has run in a process, oneDNN's packed
    bf16 matmuls there run 2-5x slower, which would understate bf16 in a shared process."""
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    checkpoint = Checkpoint(Path(folder))
    span = checkpoint.load_span(0, checkpoint.config.num_layers, dtype=torch.bfloat16, quantize=mode)
    decode_rate(span, prompt[:, :8], 2)  # warm-up
    conn.send((weight_bytes_per_token(span), time.perf_counter() - started))
    while (command := conn.recv()) is not None:
        conn.send(decode_rate(span, prompt, command))


@contextlib.contextmanager
def span_workers(
    folder: Path, modes: Sequence[str], prompt: torch.Tensor, threads: int = 0
) -> Iterator[dict[str, tuple[Connection, int, float]]]:
    """One `_span_worker` process per precision, started one at a time (loading and quantizing
    take the cores): mode -> (its pipe, weight bytes per token, seconds it took to load). All
    are stopped on exit."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    workers: dict[str, tuple[Connection, int, float]] = {}
    try:
        for mode in modes:
            mine, theirs = context.Pipe()
            process = context.Process(
                target=_span_worker, args=(str(folder), mode, prompt, theirs, threads), daemon=True
            )
            process.start()
            processes.append((process, mine))
            nbytes, took = mine.recv()
            workers[mode] = (mine, nbytes, took)
        yield workers
    finally:
        for process, conn in processes:
            with contextlib.suppress(OSError):
                conn.send(None)
            process.join(10)
            if process.is_alive():
                process.kill()


def speed(folder: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    cfg = Checkpoint(folder).config
    prompt = torch.randint(1, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with span_workers(folder, MODES, prompt) as workers:
        for mode, (_, _, took) in workers.items():
            print(f"loaded {LABEL[mode]} in {took:.1f} s (its own process)", flush=True)
        nbytes = {mode: n for mode, (_, n, _) in workers.items()}
        return _speed_rounds(folder, args, cfg, nbytes, {mode: conn for mode, (conn, _, _) in workers.items()})


def _speed_rounds(
    folder: Path,
    args: argparse.Namespace,
    cfg: ModelConfig,
    nbytes: dict[str, int],
    workers: dict[str, Connection],
) -> dict[str, dict[str, float]]:
    def decode(mode: str) -> tuple[float, float]:
        conn = workers[mode]
        conn.send(args.tokens)
        return conn.recv()  # type: ignore[no-any-return]

    buffer = torch.ones(2**28)  # 1 GiB of fp32
    streaming_read(buffer)
    rounds: list[dict[str, tuple[float, float]]] = []
    bandwidths: list[float] = []
    for r in range(args.repeat):
        bandwidths.append(max(streaming_read(buffer) for _ in range(3)))
        rounds.append({mode: decode(mode) for mode in MODES})
        bandwidths[-1] = max(bandwidths[-1], streaming_read(buffer))
        print(
            f"round {r + 1}/{args.repeat}: read {bandwidths[-1] / 1e9:.1f} GB/s, "
            + ", ".join(f"{LABEL[m]} {v[1]:.1f} tok/s" for m, v in rounds[-1].items()),
            flush=True,
        )
    med = statistics.median
    limit = med(bandwidths)
    print(
        f"\n{folder.name}: {cfg.num_layers} layers, prompt {args.prompt} tokens, {args.tokens} decode tokens,"
        f" {args.repeat} interleaved rounds (medians); streaming read {limit / 1e9:.1f} GB/s"
    )
    print(
        f"{'weights':8} {'decode tok/s':>12} {'x tf':>7} {'MB/token':>9} {'GB/s read':>10} {'of limit':>9}"
        f" {'prefill s':>10} {'x tf':>7}"
    )
    summary: dict[str, dict[str, float]] = {}
    for mode in MODES:
        rate = med([rd[mode][1] for rd in rounds])
        reached = med([rd[mode][1] * nbytes[mode] / bw for rd, bw in zip(rounds, bandwidths, strict=True)])
        summary[LABEL[mode]] = row = {
            "decode_tok_s": rate,
            "decode_x_bf16_tf": med([rd[mode][1] / rd["none"][1] for rd in rounds]),
            "weight_bytes_per_token": nbytes[mode],
            "read_gb_s": rate * nbytes[mode] / 1e9,
            "fraction_of_limit": reached,
            "prefill_s": med([rd[mode][0] for rd in rounds]),
            "prefill_x_bf16_tf": med([rd[mode][0] / rd["none"][0] for rd in rounds]),
            "streaming_read_gb_s": limit / 1e9,
        }
        print(
            f"{LABEL[mode]:8} {rate:12.2f} {row['decode_x_bf16_tf']:7.2f} {nbytes[mode] / 1e6:9.1f}"
            f" {row['read_gb_s']:10.2f} {reached:9.0%} {row['prefill_s']:10.3f} {row['prefill_x_bf16_tf']:7.2f}"
        )
    checks = [
        ("bf16 decode >= 70% of the streaming-read limit", summary["bf16"]["fraction_of_limit"], 0.7, "{:.0%}"),
        ("bf16 tf decode >= 70% of the limit", summary["bf16 tf"]["fraction_of_limit"], 0.7, "{:.0%}"),
        ("int8 decode >= 1.7x bf16 tf", summary["int8"]["decode_x_bf16_tf"], 1.7, "{:.2f}x"),
        ("int4 decode >= 3x bf16 tf", summary["int4"]["decode_x_bf16_tf"], 3.0, "{:.2f}x"),
    ]
    for what, value, target, fmt in checks:
        print(f"target: {what}: {fmt.format(value)} -> {'met' if value >= target else 'NOT met'}")
    return summary


def pipelines(folder: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Decode tok/s through serving processes: one process and a 2-span pipeline, at each precision,
    in interleaved rounds (gRPC and sessions included, as a client sees them)."""
    import contextlib

    from pipeline import SwarmRunner

    from node.client import Client
    from node.testing.launch import local_swarm
    from shards import split_evenly

    cfg = Checkpoint(folder).config
    prompt = torch.randint(1, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    runners: dict[tuple[str, int], SwarmRunner] = {}
    with contextlib.ExitStack() as stack:
        for mode in MODES:
            for parts in (1, 2):
                spans = split_evenly(cfg.num_layers, parts)
                # 12 processes hold 4 precisions twice over: the default share of free RAM, taken
                # while the others load, refused the last ones on a 23 GiB machine; they fit
                extra = ["--quantize", mode, "--max-memory", "8GiB"]
                servers = stack.enter_context(local_swarm(folder, spans, extra_args=extra, timeout=900))
                runners[mode, parts] = SwarmRunner(stack.enter_context(Client([s.pinned for s in servers])))
                print(f"serving {LABEL[mode]} in {parts} process(es)", flush=True)
        for run in runners.values():
            run(prompt[:8], 2)  # warm-up
        rounds = []
        for r in range(args.repeat):
            rounds.append({key: run(prompt, args.tokens)[1] for key, run in runners.items()})
            print(
                f"pipeline round {r + 1}/{args.repeat}: "
                + ", ".join(f"{LABEL[m]} x{p} {v:.1f} tok/s" for (m, p), v in rounds[-1].items()),
                flush=True,
            )
    med = statistics.median
    print(f"\n{'weights':8} {'1 process tok/s':>15} {'2 spans tok/s':>14} {'2 spans x 1':>11}")
    summary: dict[str, dict[str, float]] = {}
    for mode in MODES:
        one, two = med([rd[mode, 1] for rd in rounds]), med([rd[mode, 2] for rd in rounds])
        ratio = med([rd[mode, 2] / rd[mode, 1] for rd in rounds])
        summary[LABEL[mode]] = {"one_process_tok_s": one, "two_spans_tok_s": two, "two_spans_x_one": ratio}
        print(f"{LABEL[mode]:8} {one:15.2f} {two:14.2f} {ratio:11.2f}")
    for mode in MODES:
        ratio = summary[LABEL[mode]]["two_spans_x_one"]
        print(f"target: {LABEL[mode]} 2-span pipeline >= 0.95x one process: {ratio:.2f}x ->"
              f" {'met' if ratio >= 0.95 else 'NOT met'}")  # fmt: skip
    return summary


def profile(folder: Path, args: argparse.Namespace) -> None:
    """Per-op profile (torch.profiler) of decode steps after the prompt, at each precision."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    checkpoint = Checkpoint(folder)
    cfg = checkpoint.config
    prompt = torch.randint(1, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    steps = 8
    for mode in MODES:
        span = checkpoint.load_span(0, cfg.num_layers, dtype=torch.bfloat16, quantize=mode)
        cache = span.new_cache(args.prompt + steps + 4)
        token = span(prompt, cache, 0, last_only=True)[0, -1].argmax()
        position = args.prompt
        for _ in range(2):  # warm-up
            token = span(token.view(1, 1), cache, position, last_only=True)[0, -1].argmax()
            position += 1
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            for _ in range(steps):
                token = span(token.view(1, 1), cache, position, last_only=True)[0, -1].argmax()
                position += 1
            elapsed = (time.perf_counter() - started) / steps
        events = prof.key_averages()
        calls = sum(e.count for e in events) / steps
        print(
            f"\nprofile {LABEL[mode]}: {elapsed * 1e3:.1f} ms per decode step under the profiler,"
            f" {calls:.0f} recorded ops per step; self CPU time per op (sums over {steps} steps):"
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        del span


def perplexity(span: SpanModel, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token NLL) over `ids` [N], in non-overlapping windows, each from an empty cache."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1]
        if chunk.numel() < 2:
            break
        logits = span(chunk[None, :-1], span.new_cache(window), 0)[0].float()  # [T, V]
        total += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(total / count)


def greedy(span: SpanModel, prompt: list[int], tokens: int) -> list[int]:
    cache = span.new_cache(len(prompt) + tokens)
    token = int(span(torch.tensor([prompt]), cache, 0, last_only=True)[0, -1].argmax())
    out, position = [token], len(prompt)
    for _ in range(tokens - 1):
        token = int(span(torch.tensor([[token]]), cache, position, last_only=True)[0, -1].argmax())
        out.append(token)
        position += 1
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(b))


def quality(folder: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    checkpoint = Checkpoint(folder)
    cfg = checkpoint.config
    spans = {mode: checkpoint.load_span(0, cfg.num_layers, dtype=torch.bfloat16, quantize=mode) for mode in MODES}
    # fp32, unquantized: how far greedy decoding moves under rounding alone, for scale
    spans["fp32"] = checkpoint.load_span(0, cfg.num_layers, dtype=torch.float32)
    ids = torch.tensor(tokenizer(TEXT.read_text())["input_ids"])
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ppl = {mode: perplexity(span, ids, args.window) for mode, span in spans.items()}
    outputs = {mode: [greedy(span, p, args.greedy) for p in prompts] for mode, span in spans.items()}
    errors = {m: layer_errors(spans["none"], spans[m], ids[None, : args.window]) for m in ("bf16", "int8", "int4")}
    print(
        f"\n{folder.name}: perplexity on {TEXT.name} ({ids.numel()} tokens, windows of {args.window}),"
        f" greedy agreement with bf16 over {args.greedy} tokens of {len(prompts)} prompts"
    )
    print(f"{'weights':8} {'perplexity':>10} {'x bf16':>7} {'same tokens':>11} {'same prefix':>11} {'all same':>8}")
    summary: dict[str, dict[str, float]] = {}
    for mode in (*MODES, "fp32"):
        pairs = list(zip(outputs[mode], outputs["none"], strict=True))
        same = statistics.mean(sum(a == b for a, b in zip(x, y, strict=True)) / len(y) for x, y in pairs)
        prefix = statistics.mean(_common_prefix(x, y) / len(y) for x, y in pairs)
        whole = sum(x == y for x, y in pairs)
        summary[LABEL[mode]] = {
            "perplexity": ppl[mode],
            "perplexity_x_bf16": ppl[mode] / ppl["none"],
            "same_tokens": same,
            "same_prefix": prefix,
            "prompts_all_same": whole,
        }
        print(
            f"{LABEL[mode]:8} {ppl[mode]:10.3f} {ppl[mode] / ppl['none']:7.4f} {same:11.0%} {prefix:11.0%}"
            f" {whole:5d}/{len(prompts)}"
        )
    for mode in ("bf16", "int8", "int4"):
        layers = " ".join(f"{e:.3f}" for e in errors[mode])
        summary[LABEL[mode]]["layer_errors"] = errors[mode]  # type: ignore[assignment]
        print(f"{LABEL[mode]} relative error of each layer's hidden states: {layers}")
    for mode, limit in (("bf16", 1.01), ("int8", 1.01), ("int4", 1.06)):
        x = summary[LABEL[mode]]["perplexity_x_bf16"]
        print(
            f"target: {LABEL[mode]} perplexity within {limit - 1:.0%} of bf16: {x:.4f}x ->"
            f" {'met' if x <= limit else 'NOT met'}"
        )
    print(f"\nsample (prompt {PROMPTS[0]!r}):")
    for mode in (*MODES, "fp32"):
        print(f"  {LABEL[mode]}: {tokenizer.decode(outputs[mode][0])!r}")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model instead of the bench model")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per run (default 32)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--window", type=int, default=256, help="perplexity window in tokens (default 256)")
    parser.add_argument("--greedy", type=int, default=32, help="greedy tokens per prompt (default 32)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench")
    parser.add_argument("--demo", type=Path, help="the demo model folder (default: build or reuse the cached one)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-pipelines", action="store_true", help="no serving processes (1 vs 2 spans)")
    parser.add_argument("--profile", action="store_true", help="also print a per-op profile of decode steps")
    parser.add_argument("--profile-rows", type=int, default=15, help="ops per profile table (default 15)")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()

    summary: dict[str, object] = {}
    if not args.skip_speed:
        name = f"{'small' if args.small else 'bench'}-bfloat16"
        print(f"building/reusing {name} model in {args.cache / name} ...", flush=True)
        folder = build(args.cache / name, SMALL if args.small else BENCH, torch.bfloat16)
        summary["speed"] = speed(folder, args)
        if not args.skip_pipelines:
            summary["pipelines"] = pipelines(folder, args)
        if args.profile:
            profile(folder, args)
    if not args.skip_quality:
        from node.demo_model import build_demo_model

        summary["quality"] = quality(args.demo or build_demo_model(), args)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
