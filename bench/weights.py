"""Benchmark: fetching one span's weights over the mesh, from 1 and from 3 providers, on loopback.

Builds a small Mixtral-style checkpoint (random weights, ~60 MB in fp32), starts one swarm with
one provider and another with three (`moemesh daemon` processes holding the whole folder),
then a daemon that knows only the model id in each swarm: it fetches layers 0:4 (and the
embedding) over `/moemesh/weights/1.0.0`, verifies every tensor, and reports the transfer
in its `fetched` event. Rates are printed beside a plain local copy of the same bytes.

    python bench/weights.py [--layers 8] [--hidden 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testing.launch import DaemonProcess, event_of, start_daemon  # noqa: E402
from shards.manifest import load_manifest  # noqa: E402


def build(folder: Path, layers: int, hidden: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def plain_copy_rate(folder: Path, start: int, end: int, out: Path) -> tuple[int, float]:
    """Bytes of the span's tensors and the rate (B/s) of copying them file to file, one read and write each."""
    manifest = load_manifest(folder)
    tensors = manifest.tensors_of(manifest.groups_for_span(start, end))
    times = []
    for _ in range(5):  # the median of 5: one copy of tens of MB is over in milliseconds
        began = time.perf_counter()
        with out.open("wb") as dst:
            for t in tensors:
                with (folder / t.file).open("rb") as src:
                    src.seek(t.offset)
                    dst.write(src.read(t.length))
        times.append(time.perf_counter() - began)
        out.unlink()
    total = sum(t.length for t in tensors)
    return total, total / statistics.median(times)


def fetch_rate(folder: Path, model_id: str, providers: int, tmp: Path) -> dict[str, Any]:
    started: list[DaemonProcess] = []
    try:
        boot = ""
        for i in range(providers):
            args = ["--model", str(folder), "--layers", "0:1", "--identity", str(tmp / f"p{providers}-{i}.key")]
            started.append(start_daemon(args + (["--bootstrap", boot] if boot else []), verbose=False))
            boot = boot or started[0].multiaddr
        fetcher = start_daemon(
            ["--model", model_id, "--layers", "0:4", "--identity", str(tmp / f"f{providers}.key")]
            + ["--cache-dir", str(tmp / f"cache-{providers}"), "--bootstrap", boot],
            verbose=False,
            timeout=600,
        )
        started.append(fetcher)
        done = [e for line in fetcher.log if (e := event_of(line, "fetched")) is not None][-1]
        return done
    finally:
        for d in started:
            d.terminate()
        for d in started:
            d.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moemesh-bench-weights-") as name:
        tmp = Path(name)
        folder = tmp / "model"
        build(folder, args.layers, args.hidden)
        model_id = load_manifest(folder).model_id
        span_bytes, copy_rate = plain_copy_rate(folder, 0, 4, tmp / "copy.bin")
        mb, copy_mb_s = span_bytes / 1e6, copy_rate / 1e6
        print(f"span 0:4 of {args.layers} layers: {mb:.1f} MB; plain local copy {copy_mb_s:.0f} MB/s")
        for n in (1, 3):
            done = fetch_rate(folder, model_id, n, tmp)
            rate = done["bytes"] / done["seconds"]
            used = len(done["by_provider"])
            print(
                f"{n} provider{'s' if n > 1 else ''}: {done['bytes'] / 1e6:.1f} MB in {done['seconds']:.2f} s,"
                f" {rate / 1e6:.1f} MB/s = {rate / copy_rate:.3f} x the local copy ({used} providers sent bytes)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
