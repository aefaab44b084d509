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


def tiny_config(family: str) -> Any:
    from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

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
    model.save_pretrained(folder)
    return folder


def load_reference(folder: Path) -> Any:
    """transformers' own model, with the eager experts loop (our kernels' definition)."""
    import json

    from transformers import AutoModelForCausalLM

    dense = json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    kwargs = {} if dense else {"experts_implementation": "eager"}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


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
