"""Benchmark: decode tokens/s and 128-token prefill time, one process vs 2- and 3-span pipelines.

Every figure is also printed as a ratio to plain transformers `generate` measured in the
same run on the same machine (this machine is shared and noisy: compare ratios, not times).

    python bench/pipeline.py              # the bench model of DESIGN.md, random weights, bf16
    python bench/pipeline.py --small      # a small model, for a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.client import Client  # noqa: E402
from node.testing.launch import local_swarm  # noqa: E402
from shards import split_evenly  # noqa: E402

BENCH = dict(
    hidden_size=1024,
    num_hidden_layers=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    intermediate_size=2816,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)
HF = "transformers generate"
ONE = "moemesh, 1 process"
SMALL = dict(
    hidden_size=256,
    num_hidden_layers=6,
    num_local_experts=4,
    num_experts_per_tok=2,
    intermediate_size=512,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=8000,
)


def build(folder: Path, shape: dict[str, int], dtype: torch.dtype) -> Path:
    """A Mixtral checkpoint with random weights, written tensor by tensor (no 1.2 B-parameter init)."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = MixtralConfig(**shape, max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(0)
    h, i, e, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, h_dim(cfg)
    state: dict[str, torch.Tensor] = {}

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(dtype)

    state["model.embed_tokens.weight"] = rnd(cfg.vocab_size, h)
    state["model.norm.weight"] = torch.ones(h, dtype=dtype)
    state["lm_head.weight"] = rnd(cfg.vocab_size, h)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        state[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        state[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
        state[f"{p}.self_attn.q_proj.weight"] = rnd(cfg.num_attention_heads * hd, h)
        state[f"{p}.self_attn.k_proj.weight"] = rnd(cfg.num_key_value_heads * hd, h)
        state[f"{p}.self_attn.v_proj.weight"] = rnd(cfg.num_key_value_heads * hd, h)
        state[f"{p}.self_attn.o_proj.weight"] = rnd(h, cfg.num_attention_heads * hd)
        state[f"{p}.block_sparse_moe.gate.weight"] = rnd(e, h)
        for x in range(e):
            state[f"{p}.block_sparse_moe.experts.{x}.w1.weight"] = rnd(i, h)
            state[f"{p}.block_sparse_moe.experts.{x}.w3.weight"] = rnd(i, h)
            state[f"{p}.block_sparse_moe.experts.{x}.w2.weight"] = rnd(h, i)
    save_file(state, folder / "model.safetensors")
    cfg.dtype = str(dtype).removeprefix("torch.")
    cfg.to_json_file(folder / "config.json")
    return folder


def h_dim(cfg: object) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # type: ignore[attr-defined]


class HFRunner:
    """transformers generate, as a user would call it."""

    def __init__(self, folder: Path, experts: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, experts_implementation=experts).eval()

    def __call__(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        ids = torch.tensor([prompt])
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(ids, max_new_tokens=1, **kwargs)
            t1 = time.perf_counter()
            self.model.generate(ids, max_new_tokens=1 + tokens, **kwargs)
            t2 = time.perf_counter()
        return t1 - t0, tokens / ((t2 - t1) - (t1 - t0))


class SwarmRunner:
    """A session through a chain of serving processes: prefill the prompt, then greedy decode."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __call__(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        with self.client.session(len(prompt) + tokens + 1) as session:
            t0 = time.perf_counter()
            token = int(session.step(prompt).argmax())
            t1 = time.perf_counter()
            for _ in range(tokens):
                token = int(session.step([token]).argmax())
            t2 = time.perf_counter()
        return t1 - t0, tokens / (t2 - t1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model instead of the bench model")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per run (default 32)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--spin", type=int, help="GOMP_SPINCOUNT for the serving processes (default: unset)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()

    shape = SMALL if args.small else BENCH
    dtype = getattr(torch, args.dtype)
    name = f"{'small' if args.small else 'bench'}-{args.dtype}"
    print(f"building/reusing {name} model in {args.cache / name} ...", flush=True)
    folder = build(args.cache / name, shape, dtype)
    layers = shape["num_hidden_layers"]
    prompt = torch.randint(1, shape["vocab_size"], (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()

    env = {"GOMP_SPINCOUNT": str(args.spin)} if args.spin is not None else None
    runners: dict[str, Callable[[list[int], int], tuple[float, float]]] = {}
    with contextlib.ExitStack() as stack:
        runners[HF] = HFRunner(folder, "grouped_mm")
        for parts in (1, 2, 3):
            servers = stack.enter_context(local_swarm(folder, split_evenly(layers, parts), env=env))
            client = stack.enter_context(Client([s.pinned for s in servers]))
            runners[ONE if parts == 1 else f"moemesh, {parts}-span pipeline"] = SwarmRunner(client)
        for run in runners.values():
            run(prompt, 2)  # warm-up
        # Rounds interleave the settings, so drift on this shared machine hits them all alike;
        # each round's ratios are taken within the round, then the median over rounds is shown.
        rounds: list[dict[str, tuple[float, float]]] = []
        for r in range(args.repeat):
            rounds.append({label: run(prompt, args.tokens) for label, run in runners.items()})
            print(
                f"round {r + 1}/{args.repeat}: "
                + ", ".join(f"{k.split(',')[-1].strip()} {v[1]:.1f} tok/s" for k, v in rounds[-1].items()),
                flush=True,
            )

    def median(values: list[float]) -> float:
        return statistics.median(values)

    print(
        f"\n{name}: {layers} layers, prompt {args.prompt} tokens, {args.tokens} decode tokens,"
        f" {args.repeat} interleaved rounds (medians)"
    )
    print(f"{'setting':34} {'decode tok/s':>12} {'x HF':>6} {'x 1proc':>8} {'prefill s':>10} {'x HF':>6}")
    summary = {}
    for label in runners:
        decode = median([rd[label][1] for rd in rounds])
        prefill = median([rd[label][0] for rd in rounds])
        x_hf = median([rd[label][1] / rd[HF][1] for rd in rounds])
        x_one = median([rd[label][1] / rd[ONE][1] for rd in rounds])
        p_hf = median([rd[label][0] / rd[HF][0] for rd in rounds])
        summary[label] = {
            "decode_tok_s": decode,
            "prefill_s": prefill,
            "decode_x_hf": x_hf,
            "decode_x_one_process": x_one,
            "prefill_x_hf": p_hf,
        }
        print(f"{label:34} {decode:12.2f} {x_hf:6.2f} {x_one:8.2f} {prefill:10.3f} {p_hf:6.2f}")
    two = summary["moemesh, 2-span pipeline"]["decode_x_one_process"]
    print(f"\ntarget: 2-span decode >= 0.9x one process: {two:.2f}x -> {'met' if two >= 0.9 else 'NOT met'}")
    vs_hf = summary[ONE]["decode_x_hf"]
    print(
        f"target: one process decode >= transformers generate: {vs_hf:.2f}x -> {'met' if vs_hf >= 1.0 else 'NOT met'}"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
