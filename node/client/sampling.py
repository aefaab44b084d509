"""Picking the next token from the last hop's logits: greedy, or seeded temperature + top-p.

numpy only: the SDK never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.errors import ConfigError

__all__ = ["Sampling", "sample"]


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; else temperature + nucleus (top-p) sampling with a seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, sampling: Sampling, step: int) -> int:
    """Pick the next token from fp32 logits [V]; deterministic for a given (seed, step)."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    rng = np.random.default_rng([sampling.seed or 0, step])
    z = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
        kept = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(len(keep), p=kept)])
    return int(rng.choice(len(probs), p=probs))
