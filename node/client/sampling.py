"""Picking the next token from the last hop's logits: greedy, or seeded temperature + top-p.

numpy only: the SDK never imports torch. The same `sample` runs where the logits are: a
client asks the chain's last hop to sample a decode step (`sample_request`, protocol
`Sample`), and that hop (`node.serve.service`) answers the token id instead of the logits,
computed by this very function on the very logits it would have sent (`sampled_token`). A
hop that cannot, or an older one, answers the logits and the client samples them itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from node.errors import ConfigError, PeerError
from protocol import InvalidTensorError, check_tensor, make_tensor
from protocol.shard_pb2 import Sample, Tensor

__all__ = ["Sampling", "logits_of", "sample", "sample_request", "sampled_token", "sampling_of", "token_of"]

_SEEDS = 1 << 64  # a seed is one word of numpy's seed sequence


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; else temperature + nucleus (top-p) sampling with a seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < _SEEDS):
            raise ConfigError(f"seed must be an integer in 0..2**64-1, got {self.seed!r}")


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


def logits_of(tensor: Tensor, address: str) -> np.ndarray:
    """The fp32 logits [T, V] of the last hop's output (fp32, or bf16/fp16 widened exactly)."""
    meta = check_tensor(tensor, what="logits")
    if len(meta.shape) != 3 or meta.dtype not in ("float32", "bfloat16", "float16"):
        raise PeerError(address, f"expected logits [1, T, V], got {meta.dtype} {meta.shape}")
    if meta.dtype == "bfloat16":  # the upper half of an fp32: shifting it up is the exact widening
        logits = (np.frombuffer(tensor.data, dtype="<u2").astype("<u4") << 16).view("<f4")
    elif meta.dtype == "float16":
        logits = np.frombuffer(tensor.data, dtype="<f2").astype("<f4")
    else:
        logits = np.frombuffer(tensor.data, dtype="<f4")
    return logits.reshape(meta.shape)[0]


# -- sampling at the last hop ------------------------------------------------------------------


def sample_request(sampling: Sampling, step: int) -> Sample:
    """What a step carries to have the last hop pick draw `step` of `sampling`."""
    return Sample(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed or 0, index=step)


def sampling_of(request: Sample) -> Sampling:
    """The `Sampling` a step's `Sample` asks for (ConfigError when it is not a valid one)."""
    return Sampling(request.temperature, request.top_p or 1.0, request.seed)


def sampled_token(logits: Tensor, sampling: Sampling, step: int) -> Tensor | None:
    """The token id [1, 1] (int64) that draw `step` of `sampling` picks from a last hop's output
    for one position; None where it cannot (several rows, logits that are not a distribution):
    the hop then answers the logits, and the client meets the same problem itself."""
    try:
        rows = logits_of(logits, "")
        if rows.shape[0] != 1:
            return None
        token = sample(rows[-1], sampling, step)
    except (PeerError, ValueError):
        return None
    return make_tensor("int64", (1, 1), np.array([token], dtype="<i8").tobytes())


def token_of(output: Tensor, address: str, vocab_size: int) -> int | None:
    """The token id a last hop answered a sampled step with, None when it answered logits (it
    could not sample, or does not know how); PeerError when it is not a token of the vocabulary."""
    try:
        meta = check_tensor(output, what="sampled token")
    except InvalidTensorError as e:
        raise PeerError(address, str(e)) from None
    if meta.dtype != "int64":
        return None
    if meta.shape != (1, 1):
        raise PeerError(address, f"answered a sampled step with int64 {list(meta.shape)}, not one token id")
    token = int(np.frombuffer(output.data, dtype="<i8")[0])
    if not 0 <= token < vocab_size:
        raise PeerError(address, f"answered token id {token}, outside the vocabulary of {vocab_size}")
    return token
