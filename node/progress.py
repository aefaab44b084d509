"""Progress bars for people at a terminal (tqdm): building a model, loading a span, measuring it.

A bar is drawn only when stderr is a terminal and the CLI was not told to be quiet (`-q`);
in logs, pipes and tests nothing is drawn, and the `moemesh: ...` lines and --json-events
stay what scripts read. `ticks(what)` gives a `tick(done, total)` callable, safe to call
from the compute thread, that draws (and at the end clears) one bar.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Ticks", "configure", "shown", "ticks"]

Ticks = Callable[[int, int], None]  # (done, total)
_enabled: bool | None = None  # None: when stderr is a terminal


def configure(enabled: bool | None) -> None:
    """Force bars on or off (the CLI turns them off for -q); None: on a terminal only."""
    global _enabled
    _enabled = enabled


def shown() -> bool:
    if _enabled is not None:
        return _enabled
    return sys.stderr.isatty()


@contextlib.contextmanager
def ticks(what: str, unit: str = "it") -> Iterator[Ticks]:
    """A `tick(done, total)` drawing one bar while the block runs (nothing when bars are off)."""
    bar: Any = None

    def tick(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            if not shown():
                return
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"moemesh: {what}", unit=unit, leave=False, file=sys.stderr)
        bar.update(done - bar.n)

    try:
        yield tick
    finally:
        if bar is not None:
            bar.close()
