"""Spot-checks: a peer can lie (return wrong activations while looking healthy); the client checks.

With probability `ClientConfig.verify_probability` a generation is checked. A checked
generation checks `verify_steps` of its steps: its first (the prompt) and others sampled
among its decode steps. At a checked step each hop's output is checked before it goes on
to the next hop: another chain of peers for the hop's layers (never the hop's own peer,
never an avoided one) runs the hop's recorded inputs, from position 0 through this step, as
one stateless Forward, and a sampled stretch of up to `verify_tokens` of this step's
positions is compared, as the relative L2 error of the two outputs, within a tolerance fit
for both sides' dtype and quantization (`tolerance`). When they disagree, a third chain (if
there is one) settles who lied. A liar is `PeerLied`: the session avoids it, moves its
layers to another peer (its failover: the hop's inputs are replayed there) and runs the
step there, so the lie never reaches the next hop.

Every check is recorded as a `Verification` (`Client.verifications`): what was checked,
against whom, the error measured and the verdict.

What it costs: a check of a hop at position P recomputes P positions of the hop's layers on
the verifier, as one prefill (and ships them both ways); nothing for unchecked generations.
What it does not catch: a peer that lies only at steps it is not checked at, or by less than
the tolerance. Tokens the liar influenced before the check that caught it are already out.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np

from node.client.config import ClientConfig
from node.client.host import StepCheck
from node.client.stream import StepRecord, ask_info
from node.errors import PeerError, PeerLied, RouteError, peer_error
from node.plan.peers import PeerView
from node.plan.routing import Hop, best_chain
from protocol import check_tensor, make_tensor
from protocol.shard_pb2 import DType, ForwardRequest, ForwardResponse, Tensor

__all__ = ["CheckHost", "SpotChecker", "Verification", "relative_error", "tolerance", "verdicts"]

log = logging.getLogger(__name__)
_FORWARD = "/moemesh.v1.Shard/Forward"

# Relative L2 error two honest peers may show on the same inputs: the rounding of the
# coarser side (one step of a chunked-vs-whole prefill, batched or not, adds a little).
_DTYPE_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}
_QUANT_TOLERANCE = {"none": 0.0, "bf16": 5e-2, "int8": 0.15, "int4": 0.35}
_DTYPE_NAME = {DType.FLOAT32: "float32", DType.BFLOAT16: "bfloat16", DType.FLOAT16: "float16"}


def tolerance(a: tuple[str, str], b: tuple[str, str]) -> float:
    """The relative L2 error allowed between two peers given as (dtype, quantization)."""
    return max(
        _DTYPE_TOLERANCE.get(a[0], 5e-2),
        _DTYPE_TOLERANCE.get(b[0], 5e-2),
        _QUANT_TOLERANCE.get(a[1], 0.35),
        _QUANT_TOLERANCE.get(b[1], 0.35),
    )


@dataclass(frozen=True)
class Verification:
    """One spot-check of one hop at one step."""

    peer: str  # the checked hop's address
    start: int  # its layers [start, end)
    end: int
    positions: tuple[int, int]  # the compared stretch [from, to) of this step's positions
    verifier: tuple[str, ...]  # the chain that recomputed them ("" when none could)
    error: float  # relative L2 error measured (nan when unchecked)
    tolerance: float
    verdict: str  # "ok", "lied" (the hop), "verifier lied", "unchecked"
    note: str = ""

    def __str__(self) -> str:
        where = f"{self.peer} [{self.start}:{self.end}] at positions {self.positions[0]}:{self.positions[1]}"
        if self.verdict == "unchecked":
            return f"{where}: unchecked ({self.note})"
        against = ", ".join(self.verifier)
        note = f"; {self.note}" if self.note else ""
        return (
            f"{where}: {self.verdict} (error {self.error:.3g}, tolerance {self.tolerance:.3g}, against {against}{note})"
        )


def verdicts(checks: Sequence[Verification]) -> str:
    """One line: how many checks, and how many of each verdict ("5 checks: 4 ok, 1 lied")."""
    counts: dict[str, int] = {}
    for v in checks:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    return f"{len(checks)} checks: " + ", ".join(f"{n} {verdict}" for verdict, n in counts.items())


class CheckHost(Protocol):
    """What the checker asks of the client."""

    @property
    def config(self) -> ClientConfig: ...

    def channel(self, address: str) -> grpc.Channel: ...

    def usable_peers(self) -> tuple[str, int, list[PeerView]]:
        """(model id, number of layers, peers not avoided now)."""
        ...

    def avoid(self, hop: Hop, error: PeerError) -> None: ...


def _floats(t: Tensor) -> np.ndarray:
    """The tensor's values as fp32, rows first: [T, X]."""
    meta = check_tensor(t, what="output")
    if meta.dtype == "bfloat16":
        raw = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        values = raw.view(np.float32)
    elif meta.dtype == "float16":
        values = np.frombuffer(t.data, dtype="<f2").astype(np.float32)
    elif meta.dtype == "float32":
        values = np.frombuffer(t.data, dtype="<f4")
    else:
        raise ValueError(f"a {meta.dtype} output cannot be compared")
    return values.reshape(meta.shape[-2], -1) if len(meta.shape) >= 2 else values.reshape(1, -1)


def _concat(records: Sequence[StepRecord]) -> Tensor:
    """The inputs of consecutive steps as one [1, T, ...] input (batch 1: the bytes follow each other)."""
    metas = [check_tensor(r.input, what="input") for r in records]
    shape = list(metas[-1].shape)
    shape[1] = sum(m.shape[1] for m in metas)
    return make_tensor(metas[-1].dtype, shape, b"".join(r.input.data for r in records))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| (inf when either is not finite)."""
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return float("inf")
    return float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-12))


@dataclass
class _Plan:
    """Which positions of one generation are checked."""

    positions: frozenset[int]
    checker: SpotChecker

    def __call__(self, hop: Hop, history: Sequence[StepRecord], step: StepRecord, output: Tensor) -> None:
        if step.position in self.positions:
            self.checker.check(hop, [*history, step], output)


@dataclass
class SpotChecker:
    """Checks hops of sampled generations (see the module docstring); records every check."""

    host: CheckHost
    verifications: list[Verification] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)
    _kind: dict[str, tuple[str, str]] = field(default_factory=dict)  # address -> (dtype, quantization)

    def plan(self, prompt_tokens: int, new_tokens: int) -> StepCheck | None:
        """The check a session runs after each hop's step (None: this generation is not checked)."""
        config = self.host.config
        if config.verify_probability <= 0 or self.rng.random() >= config.verify_probability:
            return None
        decode = list(range(prompt_tokens, prompt_tokens + new_tokens - 1))  # positions of decode steps
        later = self.rng.sample(decode, min(len(decode), max(config.verify_steps - 1, 0)))
        return _Plan(frozenset([0, *later]), self)

    # -- one check ------------------------------------------------------------------------------

    def check(self, hop: Hop, steps: Sequence[StepRecord], output: Tensor) -> None:
        """Check `hop`'s `output` for the last of `steps` (its inputs from position 0); PeerLied if it lied."""
        step = steps[-1]
        rows = _floats(output)
        if steps[0].position != 0:  # not from the start (cannot happen: a session's history is)
            return
        tokens = check_tensor(step.input, what="input").shape[1]
        first = step.position + tokens - rows.shape[0]  # the position of the output's first row
        span = min(rows.shape[0], max(self.host.config.verify_tokens, 1))
        lo = first + self.rng.randrange(rows.shape[0] - span + 1)
        stretch = (lo, lo + span)
        got = rows[lo - first : lo - first + span]

        def record(verifier: Sequence[str], error: float, tol: float, verdict: str, note: str = "") -> Verification:
            v = Verification(hop.address, hop.start, hop.end, stretch, tuple(verifier), error, tol, verdict, note)
            self.verifications.append(v)
            log.info("spot-check: %s", v)
            return v

        exclude = {hop.peer or hop.address, hop.address}
        try:
            chain, want = self._recompute(hop, steps, stretch, exclude)
        except (RouteError, PeerError, ValueError) as e:
            record((), float("nan"), float("nan"), "unchecked", str(e))
            return
        tol = self._tolerance(hop, chain)
        error = relative_error(got, want)
        verifier = [h.address for h in chain]
        if error <= tol:
            record(verifier, error, tol, "ok")
            return
        # They disagree: a third chain, if any, says which one lied.
        try:
            third, judge = self._recompute(hop, steps, stretch, exclude | {h.peer or h.address for h in chain})
        except (RouteError, PeerError, ValueError):
            third, judge = [], None
        if judge is not None and relative_error(got, judge) <= self._tolerance(hop, third):
            note = f"{', '.join(h.address for h in third)} agrees with the hop"
            record(verifier, error, tol, "verifier lied", note)
            for h in chain:
                self.host.avoid(h, PeerLied(h.address, f"its outputs for layers {hop.start}:{hop.end} were wrong"))
            return
        note = "a third chain agrees with the verifier" if judge is not None else "no third chain to ask"
        v = record(verifier, error, tol, "lied", note)
        raise PeerLied(hop.address, f"its outputs disagree with another peer's on the same inputs ({v})")

    def _recompute(
        self, hop: Hop, steps: Sequence[StepRecord], stretch: tuple[int, int], exclude: set[str]
    ) -> tuple[list[Hop], np.ndarray]:
        """A chain of other peers for the hop's layers, and its output rows for `stretch`."""
        model_id, num_layers, peers = self.host.usable_peers()
        others = [p for p in peers if p.peer_id not in exclude and p.address not in exclude]
        chain = best_chain(others, num_layers, hop.start, hop.end)
        x = _concat(steps)
        for h in chain:
            x = self._forward(h, model_id, x)
        rows = _floats(x)
        return chain, rows[stretch[0] : stretch[1]]

    def _forward(self, hop: Hop, model_id: str, x: Tensor) -> Tensor:
        call = self.host.channel(hop.address).unary_unary(
            _FORWARD,
            request_serializer=ForwardRequest.SerializeToString,
            response_deserializer=ForwardResponse.FromString,
        )
        request = ForwardRequest(model_id=model_id, start=hop.start, end=hop.end, input=x, last_only=False)
        try:
            response = call(request, timeout=self.host.config.step_timeout_s)
        except grpc.RpcError as e:
            raise peer_error(hop.address, e) from None
        return response.output  # type: ignore[no-any-return]

    def _tolerance(self, hop: Hop, chain: Sequence[Hop]) -> float:
        if self.host.config.verify_tolerance > 0:
            return self.host.config.verify_tolerance
        return max(tolerance(self._kind_of(hop), self._kind_of(h)) for h in chain)

    def _kind_of(self, hop: Hop) -> tuple[str, str]:
        """The peer's compute dtype and quantization, from its Info (asked once)."""
        kind = self._kind.get(hop.address)
        if kind is None:
            try:
                info = ask_info(self.host.channel(hop.address), hop.address, self.host.config.info_timeout_s)
                kind = (_DTYPE_NAME.get(info.dtype, "bfloat16"), info.quantization or "none")
            except PeerError:
                kind = ("bfloat16", "int4")  # unknown: the loosest
            self._kind[hop.address] = kind
        return kind
