"""Which layers of which model a peer serves."""

from __future__ import annotations

from dataclasses import dataclass

from shards.errors import SpanSpecError

__all__ = ["SpanSpec", "parse_layers", "split_evenly"]


@dataclass(frozen=True, order=True)
class SpanSpec:
    """Layers [start, end) of one model; `model_id` is the content hash of its checkpoint."""

    model_id: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise SpanSpecError(f"span [{self.start}, {self.end}) is empty or negative")

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def check_within(self, total_layers: int) -> None:
        if self.end > total_layers:
            raise SpanSpecError(f"span [{self.start}, {self.end}) runs past the model's {total_layers} layers")

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


def parse_layers(text: str, total_layers: int | None = None) -> tuple[int, int]:
    """Parse "START:END" (END exclusive; either side may be empty for "from the start/to the end")."""
    head, sep, tail = text.partition(":")
    if not sep:
        raise SpanSpecError(f"layers must look like START:END (for example 0:8), got {text!r}")
    try:
        start = int(head) if head.strip() else 0
        if tail.strip():
            end = int(tail)
        elif total_layers is not None:
            end = total_layers
        else:
            raise SpanSpecError(f"{text!r}: END may be left out only when the model's layer count is known")
    except ValueError:
        raise SpanSpecError(f"layers must be two integers START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise SpanSpecError(f"layers {text!r}: need 0 <= START < END")
    if total_layers is not None and end > total_layers:
        raise SpanSpecError(f"layers {text!r} run past the model's {total_layers} layers (valid: 0:{total_layers})")
    return start, end


def split_evenly(total_layers: int, parts: int) -> list[tuple[int, int]]:
    """Cut [0, total_layers) into `parts` contiguous spans whose sizes differ by at most one."""
    if not 0 < parts <= total_layers:
        raise SpanSpecError(f"cannot split {total_layers} layers into {parts} spans")
    base, extra = divmod(total_layers, parts)
    spans, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        spans.append((start, end))
        start = end
    return spans
