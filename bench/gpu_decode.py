"""The bench model's decode tok/s on a CUDA GPU: moemesh's span at bf16, int8 and int4 beside
transformers' `generate` (bf16) on the same GPU. Run by bench/gpu_check.sh.

int8 and int4 on CUDA run the reference path (dequantize, then matmul): correct, not fast.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import BENCH, build  # noqa: E402

from shards import Checkpoint  # noqa: E402

MODES = {"none": "bf16", "int8": "int8", "int4": "int4"}


def ours(span: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    cache = span.new_cache(prompt.shape[1] + tokens + 1)  # type: ignore[operator]
    token = span(prompt, cache, 0, last_only=True)[0, -1].argmax()
    torch.cuda.synchronize()
    started = time.perf_counter()
    position = prompt.shape[1]
    for _ in range(tokens):
        token = span(token.view(1, 1), cache, position, last_only=True)[0, -1].argmax()
        position += 1
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


def theirs(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    ids = prompt.cuda()
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kwargs)  # type: ignore[operator]
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=1 + tokens, **kwargs)  # type: ignore[operator]
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return tokens / ((t2 - t1) - (t1 - t0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 2
    from transformers import AutoModelForCausalLM

    folder = build(args.cache / "bench-bfloat16", BENCH, torch.bfloat16)
    checkpoint = Checkpoint(folder)
    n = checkpoint.config.num_layers
    prompt = torch.randint(1, BENCH["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1))
    runners = {}
    with torch.inference_mode():
        for mode, label in MODES.items():
            span = checkpoint.load_span(0, n, dtype=torch.bfloat16, quantize=mode, pack=False).to("cuda")
            runners[f"moemesh {label}"] = (ours, span)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
        runners["transformers generate bf16"] = (theirs, hf)
        for fn, model in runners.values():
            fn(model, prompt[:, :8], 4)  # warm-up
        rounds = [{k: fn(m, prompt, args.tokens) for k, (fn, m) in runners.items()} for _ in range(args.repeat)]
    print(f"\n{torch.cuda.get_device_name()}: bench model, decode after {args.prompt} tokens, {args.tokens} tokens")
    hf_key = "transformers generate bf16"
    summary = {}
    for key in runners:
        rate = statistics.median(r[key] for r in rounds)
        ratio = statistics.median(r[key] / r[hf_key] for r in rounds)
        summary[key] = {"decode_tok_s": rate, "x_transformers": ratio}
        print(f"{key:28} {rate:9.1f} tok/s  {ratio:5.2f}x transformers")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
