"""Benchmark: decode tokens/s and 128-token prefill time, one process vs 2- and 3-span pipelines.

Every figure is also printed as a ratio to plain transformers `generate` measured in the
same run on the same machine (this machine is shared and noisy: compare ratios, not times).

    python bench/pipeline.py              # the bench model of DESIGN.md, random weights, bf16
    python bench/pipeline.py --small      # a small model, for a quick check
    python bench/pipeline.py --llama      # random Llamas of ~58M and ~551M parameters, fp32: a 2-server
                                          # pipeline (client-relayed and pushed) vs transformers generate
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

from node.client import Client, Sampling  # noqa: E402
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
LOGITS = "pushed, logits to the client"  # every step's logits picked by the client, not by the last hop
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


# Random Llamas (fp32) of the size Petals' own benchmarks use: hidden 512 / 8 layers (~58M
# parameters) and hidden 1536 / 16 layers (~551M).
LLAMAS = {
    "llama-58m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "llama-551m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16),
}


def build_llama(folder: Path, shape: dict[str, int]) -> Path:
    """A Llama checkpoint with random weights (transformers' own init, seeded), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    cfg = LlamaConfig(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def h_dim(cfg: object) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # type: ignore[attr-defined]


GREEDY = Sampling()


class HFRunner:
    """transformers generate, as a user would call it."""

    def __init__(self, folder: Path, experts: str | None) -> None:
        from transformers import AutoModelForCausalLM

        kwargs = {"experts_implementation": experts} if experts else {}
        self.model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()

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
    """A session through a chain of serving processes: prefill the prompt, then greedy decode as
    `Client.generate` does (the last hop samples each decode step: `sampled`), or with the
    logits of every step sent to the client and picked there (`sampled=False`)."""

    def __init__(self, client: Client, push: bool | None = None, sampled: bool = True) -> None:
        self.client = client
        self.push = push
        self.sampled = sampled

    def __call__(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        with self.client.session(len(prompt) + tokens + 1, push=self.push) as session:
            t0 = time.perf_counter()
            token = int(session.step(prompt).argmax())
            t1 = time.perf_counter()
            for i in range(tokens):
                if self.sampled:
                    token = session.next_token([token], GREEDY, i + 1)
                else:
                    token = int(session.step([token]).argmax())
            t2 = time.perf_counter()
        return t1 - t0, tokens / (t2 - t1)


def interleave(
    runners: dict[str, Callable[[list[int], int], tuple[float, float]]], prompt: list[int], tokens: int, repeat: int
) -> list[dict[str, tuple[float, float]]]:
    """Rounds that interleave the settings, so drift on this shared machine hits them all alike."""
    for run in runners.values():
        run(prompt, 2)  # warm-up
    rounds: list[dict[str, tuple[float, float]]] = []
    for r in range(repeat):
        rounds.append({label: run(prompt, tokens) for label, run in runners.items()})
        print(
            f"round {r + 1}/{repeat}: " + ", ".join(f"{k} {v[1]:.1f} tok/s" for k, v in rounds[-1].items()),
            flush=True,
        )
    return rounds


def llama_main(args: argparse.Namespace) -> int:
    """Each random Llama: transformers generate vs a 2-server pipeline on loopback, relayed and pushed."""
    prompt = torch.randint(1, 32000, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens = 64 if args.tokens == 32 else args.tokens
    results: dict[str, dict[str, float]] = {}
    for name, shape in LLAMAS.items():
        print(f"building/reusing {name} in {args.cache / name} ...", flush=True)
        folder = build_llama(args.cache / name, shape)
        layers = shape["num_hidden_layers"]
        runners: dict[str, Callable[[list[int], int], tuple[float, float]]] = {}
        with contextlib.ExitStack() as stack:
            runners[HF] = HFRunner(folder, None)
            env = {"GOMP_SPINCOUNT": str(args.spin)} if args.spin is not None else None
            servers = stack.enter_context(local_swarm(folder, split_evenly(layers, 2), env=env))
            client = stack.enter_context(Client([s.pinned for s in servers]))
            runners["relayed"] = SwarmRunner(client, push=False)
            runners["pushed"] = SwarmRunner(client, push=True)
            runners[LOGITS] = SwarmRunner(client, push=True, sampled=False)
            rounds = interleave(runners, prompt, tokens, args.repeat)
            # each server's moving average of its decode compute: the rest of a token is the wire
            compute_ms = [client.info(s.pinned).decode_ms for s in servers]
        row = {"hf_tok_s": statistics.median(rd[HF][1] for rd in rounds)}
        for mode in ("relayed", "pushed", LOGITS):
            row[f"{mode}_tok_s"] = statistics.median(rd[mode][1] for rd in rounds)
            row[f"{mode}_x_hf"] = statistics.median(rd[mode][1] / rd[HF][1] for rd in rounds)
        row["servers_compute_ms"] = sum(compute_ms)
        results[name] = row
        print(
            f"{name}: a pushed token takes {1000 / row['pushed_tok_s']:.1f} ms, of which the servers' decode"
            f" compute (moving averages, rough) {' + '.join(f'{ms:.1f}' for ms in compute_ms)} ms;"
            " the rest is the wire, the client and the hand-offs",
            flush=True,
        )
        print(
            f"{name}: fp32, greedy {tokens} tokens after {len(prompt)}, 2-server pipeline on loopback:"
            f" transformers {row['hf_tok_s']:.1f} tok/s; relayed {row['relayed_tok_s']:.1f} tok/s"
            f" = {row['relayed_x_hf']:.2f}x; pushed {row['pushed_tok_s']:.1f} tok/s = {row['pushed_x_hf']:.2f}x"
            f" (the logits to the client instead of the token: {row[f'{LOGITS}_x_hf']:.2f}x)"
            f" -> target >= 1.0x {'met' if max(row['relayed_x_hf'], row['pushed_x_hf']) >= 1.0 else 'NOT met'}",
            flush=True,
        )
    print(json.dumps(results))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model instead of the bench model")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per run (default 32)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--spin", type=int, help="GOMP_SPINCOUNT for the serving processes (default: unset)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench")
    parser.add_argument("--llama", action="store_true", help="random Llamas, 58M and 551M, fp32 (see above)")
    args = parser.parse_args()
    if args.llama:
        return llama_main(args)

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
        # each round's ratios are taken within the round, then the median over rounds is shown.
        rounds = interleave(runners, prompt, args.tokens, args.repeat)

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
