"""The lighter wire and live pace, without processes: logits in the compute dtype widen to
exactly the fp32 a peer would have sent; a hop's pace tells a slowed peer from a busy machine;
the measured decode time travels in the signed Load entry (and older entries without it read)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crdt import BadEntryError, Load
from node.client.pace import HopPace, slow_hop
from node.client.sampling import logits_of
from node.errors import PeerError
from node.serve.codec import to_message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compact_logits_widen_to_exactly_the_fp32_ones(dtype: torch.dtype) -> None:
    logits = (torch.randn(1, 3, 1000, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    logits[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    ours = logits_of(to_message(logits), "peer")
    want = logits.float().numpy()[0]
    assert ours.dtype == np.float32
    assert np.array_equal(ours, want) and np.array_equal(np.signbit(ours), np.signbit(want))
    if dtype != torch.float32:
        assert len(to_message(logits).data) == len(to_message(logits.float()).data) // 2


def test_logits_of_refuses_what_is_not_logits() -> None:
    with pytest.raises(PeerError, match="expected logits"):
        logits_of(to_message(torch.zeros(1, 2, dtype=torch.int64)), "peer")


def _pace(normal: float, recent: list[float]) -> HopPace:
    pace = HopPace(window=len(recent))
    for seconds in [1.0, *[normal] * 8, *recent]:  # the first step (a warm-up) is left out
        pace.add(seconds)
    return pace


def test_a_hop_several_times_slower_than_it_was_is_the_slow_one() -> None:
    paces = [_pace(0.01, [0.011] * 6), _pace(0.02, [0.2, 0.01, 0.3, 0.2, 0.02, 0.25])]
    assert slow_hop(paces, factor=4.0, margin_s=0.05) == (1, pytest.approx(0.98 / 6 / 0.02))
    assert slow_hop(paces, factor=0.0, margin_s=0.05) is None  # moving is off
    assert slow_hop(paces, factor=4.0, margin_s=0.5) is None  # slower, but not by enough to be worth a move


def test_when_every_hop_slowed_alike_no_hop_is_blamed() -> None:
    machine_busy = [_pace(0.01, [0.08] * 6), _pace(0.02, [0.16] * 6)]
    assert slow_hop(machine_busy, factor=4.0, margin_s=0.05) is None


def test_a_pace_needs_its_baseline_and_a_full_window() -> None:
    pace = HopPace(window=6)
    for _ in range(5):
        pace.add(1.0)
    assert pace.ratio() == 0.0 and slow_hop([pace], 4.0, 0.0) is None


def test_the_measured_decode_time_travels_in_the_load_entry() -> None:
    load = Load(2, 4096, 1, decode_ms=12.5)
    assert Load.from_body(load.body()) == load
    old = {"active_sessions": 2, "free_kv_tokens": 4096, "queue_length": 1}  # a peer of an older version
    assert Load.from_body(old) == Load(2, 4096, 1)
    with pytest.raises(BadEntryError):
        Load.from_body({**old, "decode_ms": -1.0})
    with pytest.raises(BadEntryError):
        Load.from_body({**old, "decode_ms": float("nan")})
