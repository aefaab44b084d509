"""How fast each hop of a session answers, from its real steps: enough to tell when it got slow.

A hop's baseline is the median of its first decode steps (after the first, which may pay for
connecting); it is slow when its last few decode steps took `factor` times that on average,
and `margin_s` more, while the other hops did not slow down alike. Machines here are shared
and noisy: one slow token is no reason to move a session (moving one replays its history
elsewhere), a hop that stays several times slower is.
"""

from __future__ import annotations

import statistics
from collections import deque

__all__ = ["HopPace", "PeerPace", "slow_hop"]

BASELINE_STEPS = 8  # decode steps whose median is the hop's normal pace


class HopPace:
    """The decode step times of one hop of one session."""

    def __init__(self, window: int) -> None:
        self._seen = 0
        self._first: list[float] = []
        self._recent: deque[float] = deque(maxlen=max(window, 1))
        self.baseline_s = 0.0  # 0 until BASELINE_STEPS steps were seen

    def add(self, seconds: float) -> None:
        self._seen += 1
        if self._seen == 1:
            return  # the first may pay for a connection or a warm-up
        if not self.baseline_s:
            self._first.append(seconds)
            if len(self._first) == BASELINE_STEPS:
                self.baseline_s = statistics.median(self._first)
            return
        self._recent.append(seconds)

    def ratio(self) -> float:
        """Its last `window` decode steps' mean time over its baseline; 0 until both are known."""
        if not self.baseline_s or len(self._recent) < (self._recent.maxlen or 1):
            return 0.0
        return statistics.fmean(self._recent) / self.baseline_s

    def extra_s(self) -> float:
        """How much longer than its baseline its last decode steps took, on average."""
        return statistics.fmean(self._recent) - self.baseline_s if self._recent and self.baseline_s else 0.0


def slow_hop(paces: list[HopPace], factor: float, margin_s: float) -> tuple[int, float] | None:
    """The hop (index, ratio) that became `factor` times slower than it was, and `margin_s` slower
    per step, while the others did not (when every hop slowed down alike, it is this end or the
    machine, not a peer); None when none did."""
    if factor <= 0:
        return None
    ratios = [p.ratio() for p in paces]
    for k, (pace, ratio) in enumerate(zip(paces, ratios, strict=True)):
        others = [r for j, r in enumerate(ratios) if j != k and r > 0]
        if ratio >= factor * max(1.0, statistics.median(others) if others else 1.0) and pace.extra_s() >= margin_s:
            return k, ratio
    return None


class PeerPace:
    """A client's view of one peer's pace across its sessions: a baseline (the median of its
    first decode steps) and a moving average of the latest, per block."""

    def __init__(self, weight: float) -> None:
        self._weight = weight
        self._first: list[float] = []
        self.baseline_s = 0.0
        self.now_s = 0.0

    def add(self, per_block_s: float) -> None:
        self.now_s = per_block_s if not self.now_s else self._weight * per_block_s + (1 - self._weight) * self.now_s
        if not self.baseline_s:
            self._first.append(per_block_s)
            if len(self._first) == BASELINE_STEPS + 1:
                self.baseline_s = statistics.median(self._first[1:])  # the first may pay for a connection

    @property
    def slowdown(self) -> float:
        """How many times slower it answers now than it normally did (1.0 until known)."""
        return max(self.now_s / self.baseline_s, 1.0) if self.baseline_s else 1.0
