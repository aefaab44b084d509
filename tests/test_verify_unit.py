"""The spot-check's judgement (node.client.verify) with fake peers: who is blamed when outputs
disagree, what is recorded, which tolerance applies, and how often generations are checked."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from node.client import ClientConfig, Hop, PeerView
from node.client.stream import StepRecord
from node.client.verify import SpotChecker
from node.errors import PeerError, PeerLied
from protocol import make_tensor
from protocol.shard_pb2 import DType, ForwardResponse, InfoResponse, Tensor


def _hidden(values: np.ndarray) -> Tensor:
    return make_tensor("float32", (1, *values.shape), values.astype("<f4").tobytes())


def _true(x: np.ndarray) -> np.ndarray:
    return x * 2.0 + 1.0  # what an honest peer computes from its input


class _Channel:
    def __init__(self, peer: _Peer) -> None:
        self.peer = peer

    def unary_unary(self, method: str, **_: Any) -> Callable[..., Any]:
        peer = self.peer

        def call(request: Any, timeout: float = 0.0) -> Any:
            if method.endswith("Info"):
                return InfoResponse(dtype=peer.dtype, quantization="none")
            data = np.frombuffer(request.input.data, dtype="<f4").reshape(request.input.shape[1], -1)
            peer.calls += 1
            return ForwardResponse(output=_hidden(_true(data) + peer.lie))

        return call


class _Peer:
    def __init__(self, lie: float = 0.0, dtype: int = DType.FLOAT32) -> None:
        self.lie, self.dtype, self.calls = lie, dtype, 0


class _Host:
    """Peers A (the checked hop), B, C, all serving layers 0:2 of 2."""

    def __init__(self, peers: dict[str, _Peer], config: ClientConfig | None = None) -> None:
        self.peers = peers
        self.config = config or ClientConfig(verify_probability=1.0)
        self.avoided: list[str] = []
        self.order = list(peers)  # the verifier chain is the first peer not excluded

    def channel(self, address: str) -> Any:
        return _Channel(self.peers[address])

    def usable_peers(self) -> tuple[str, int, list[PeerView]]:
        views = [PeerView(a, 0, 2, 0.0, address=a, num_layers=2, rtt_s=0.001 * i) for i, a in enumerate(self.order)]
        return "m", 2, [v for v in views if v.peer_id not in self.avoided]

    def avoid(self, hop: Hop, error: PeerError) -> None:
        self.avoided.append(hop.peer or hop.address)


def _check(host: _Host, hop_lie: float) -> SpotChecker:
    checker = SpotChecker(host, rng=random.Random(0))  # type: ignore[arg-type]
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    steps = [StepRecord(0, _hidden(x[:2]), False), StepRecord(2, _hidden(x[2:]), False)]
    output = _hidden(_true(x[2:]) + hop_lie)
    checker.check(Hop("A", 0, 2, "A"), steps, output)
    return checker


def test_an_honest_hop_passes() -> None:
    host = _Host({"A": _Peer(), "B": _Peer(), "C": _Peer()})
    [v] = _check(host, 0.0).verifications
    assert v.verdict == "ok" and v.verifier == ("B",) and v.error == 0.0 and v.positions == (2, 3)
    assert host.peers["C"].calls == 0  # no third opinion needed


def test_a_liar_is_blamed_when_a_third_agrees_with_the_verifier() -> None:
    host = _Host({"A": _Peer(), "B": _Peer(), "C": _Peer()})
    with pytest.raises(PeerLied):
        _check(host, 0.5)
    assert host.peers["C"].calls == 1


def test_a_lying_verifier_is_avoided_and_the_hop_stays() -> None:
    host = _Host({"A": _Peer(), "B": _Peer(lie=0.5), "C": _Peer()})
    checker = _check(host, 0.0)  # no PeerLied: the hop keeps its session
    [v] = checker.verifications
    assert v.verdict == "verifier lied" and v.verifier == ("B",) and host.avoided == ["B"]


def test_with_no_third_chain_the_checked_hop_is_blamed() -> None:
    host = _Host({"A": _Peer(), "B": _Peer()})
    with pytest.raises(PeerLied, match="no third chain"):
        _check(host, 0.5)


def test_a_hop_with_no_other_peer_is_unchecked_and_said_so() -> None:
    host = _Host({"A": _Peer()})
    [v] = _check(host, 0.5).verifications
    assert v.verdict == "unchecked" and "no known peer serves layers 0:2" in v.note


def test_bf16_peers_get_a_bf16_tolerance() -> None:
    host = _Host({"A": _Peer(dtype=DType.BFLOAT16), "B": _Peer()})
    [v] = _check(host, 0.01).verifications  # ~1 % off: bf16 rounding, not a lie
    assert v.verdict == "ok" and v.tolerance == 5e-2 and 0 < v.error < v.tolerance


def test_the_probability_and_the_budget_of_a_plan() -> None:
    checker = SpotChecker(_Host({}, ClientConfig(verify_probability=0.25, verify_steps=3)), rng=random.Random(1))  # type: ignore[arg-type]
    plans = [checker.plan(10, 20) for _ in range(400)]
    checked = [p for p in plans if p is not None]
    assert 60 <= len(checked) <= 140  # binomial(400, 0.25): mean 100
    assert all(0 in p.positions and len(p.positions) == 3 for p in checked)  # type: ignore[attr-defined]
    assert all(10 <= q < 29 for p in checked for q in p.positions if q)  # type: ignore[attr-defined]
    assert SpotChecker(_Host({}, ClientConfig()), rng=random.Random(1)).plan(10, 20) is None  # type: ignore[arg-type]
