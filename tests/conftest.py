"""Shared fixtures: tiny random checkpoints of each supported family, built offline."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

FAMILIES = ("mixtral", "qwen3_moe", "llama")
COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


# Every family and feature beyond the three above, as tiny variants: name -> (model_type, options).
SMALL: dict[str, Any] = dict(COMMON, num_hidden_layers=4)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-llama3": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),
    ),
    "llama-yarn": (
        "llama",
        dict(
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128)
        ),
    ),
    "llama-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama-dynamic": (
        "llama",
        dict(max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    ),
    "mixtral-swa": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
    "qwen3_moe-swa": (
        "qwen3_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=5,
        ),
    ),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, clip_qkv=1.5, norm_topk_prob=False)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            decoder_sparse_step=1,
            mlp_only_layers=[2],
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=3,
        ),
    ),
    "qwen2_moe-sparse_step": (
        "qwen2_moe",
        dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=2, norm_topk_prob=True
        ),
    ),
    "granitemoe": (
        "granitemoe",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0625,
            logits_scaling=8.0,
        ),
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            routed_scaling_factor=2.5,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=8.0,
                mscale=1.0,
                mscale_all_dim=1.0,
                beta_fast=32,
                beta_slow=1,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "deepseek_v3-no_q_lora": (
        "deepseek_v3",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            moe_intermediate_size=32,
            n_shared_experts=2,
            first_k_dense_replace=2,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            rope_interleave=False,
            norm_topk_prob=False,
        ),
    ),
    "deepseek_v2": (
        "deepseek_v2",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            moe_intermediate_size=32,
            n_shared_experts=2,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            routed_scaling_factor=1.5,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=8.0,
                mscale=0.707,
                mscale_all_dim=0.707,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "deepseek_v2-greedy": (
        "deepseek_v2",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
        ),
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, intermediate_size=32, sliding_window=4),
    ),
}


def tiny_config(family: str) -> Any:
    from transformers import AutoConfig, LlamaConfig, MixtralConfig, Qwen3MoeConfig

    if family in VARIANTS:
        model_type, options = VARIANTS[family]
        return AutoConfig.for_model(model_type, **(SMALL | options))
    if family == "mixtral":
        return MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16, mlp_only_layers=[1]
        )
    if family == "llama":
        return LlamaConfig(**COMMON)
    raise ValueError(family)


def build_tiny(family: str, folder: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    # Random init leaves routers near-uniform; make routing decisive so it matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] == 4:
                p.normal_(0, 0.5)
            elif family in VARIANTS and name.endswith(("gate.weight", "router.weight", "router.layer.weight")):
                p.normal_(0, 0.5)  # routers of the variants (8 experts for DeepSeek)
            elif family in VARIANTS and name.endswith(("sinks", "router.bias", "_proj_bias")):
                p.normal_(0, 0.5)  # GPT-OSS: sinks and biases that matter
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)  # DeepSeek: a choice bias that changes some choices
    model.save_pretrained(folder)
    return folder


def load_reference(folder: Path, **options: Any) -> Any:
    """transformers' own model, with the eager experts loop (our kernels' definition)."""
    import json

    from transformers import AutoModelForCausalLM

    dense = json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    kwargs: dict[str, Any] = {} if dense else {"experts_implementation": "eager"}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs, **options).eval()


def reference_tokens(folder: Path, prompt: list[int], n: int, stop_at_eos: bool = False) -> list[int]:
    """transformers' greedy tokens after `prompt`: `n` of them, or fewer up to its EOS."""
    ref = load_reference(folder)
    ids = torch.tensor([prompt])
    eos = {} if stop_at_eos else {"eos_token_id": None}
    with torch.no_grad():
        out = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0, **eos
        )
    return out[0, len(prompt) :].tolist()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.3) -> float:
    """Poll `predicate` until it holds; the seconds it took, or AssertionError after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(every)
    return time.monotonic() - started


def moemesh_status(bootstrap: str, *, json_output: bool = True) -> Any:
    """Run `moemesh status --bootstrap ADDR [--json]` and return its view (or its text)."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "node", "status", "--bootstrap", bootstrap, *(["--json"] if json_output else [])],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if json_output else result.stdout


@pytest.fixture(scope="session")
def variant_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {name: build_tiny(name, root / f"tiny-{name}") for name in VARIANTS}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny(family, root / f"tiny-{family}") for family in FAMILIES}


@pytest.fixture(scope="session", autouse=True)
def quiet_libp2p() -> None:
    """py-libp2p's logger has no handler and does not propagate, so its routine warnings about
    unreachable peers would reach stderr through logging's last resort; swallow them."""
    import logging

    import libp2p  # noqa: F401  (its import resets its logger)

    logging.getLogger("libp2p").addHandler(logging.NullHandler())
