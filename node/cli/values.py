"""The command line's value types: what an option's text must be, checked by argparse so that
a bad value is refused with the option's name and the rule, before anything heavy is imported.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = [
    "fingerprint", "is_fingerprint", "megabytes", "memory", "number", "peers", "port", "positive", "probability",
    "seconds", "to_bytes",
]  # fmt: skip


def peers(text: str) -> list[str]:
    """'host:port#fingerprint,host:port' -> the addresses, each checked."""
    found = [p.strip() for p in text.split(",") if p.strip()]
    for p in found:
        address, pinned, pin = p.partition("#")
        host, sep, number_text = address.rpartition(":")
        if not sep or not host or not number_text.isdigit():
            raise argparse.ArgumentTypeError(f"peer {p!r} is not host:port or host:port#fingerprint")
        if pinned and not is_fingerprint(pin):
            raise argparse.ArgumentTypeError(f"peer {p!r}: {pin!r} is not a SHA-256 fingerprint (64 hex)")
    return found


def is_fingerprint(text: str) -> bool:
    fp = text.strip().lower().removeprefix("sha256:").replace(":", "")
    return len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)


def fingerprint(text: str) -> str:
    if not is_fingerprint(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits)")
    return text


def number(convert: Callable[[str], Any], noun: str, valid: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse type: `convert` the text, then check it; errors name the value and the rule."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{text} {rule}")
        return value

    return parse


positive = number(int, "an integer", lambda v: v >= 1, "must be positive")
port = number(int, "a port number", lambda v: 0 <= v <= 65535, "is outside 0..65535")
megabytes = number(float, "a number of megabytes", lambda v: 0 < v < 1e9, "MB must be positive")
probability = number(float, "a probability", lambda v: 0 <= v <= 1, "is outside 0..1")
seconds = number(float, "a number of seconds", lambda v: 0 <= v < 1e9, "seconds is not a duration")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4,
          "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}  # fmt: skip


def to_bytes(text: str) -> int:
    """'8GiB', '512MB', '1.5g', '1000000' -> bytes (decimal units, or binary with 'i')."""
    t = text.strip().lower().replace(" ", "")
    digits = t.rstrip("kmgtib")
    unit = t[len(digits) :]
    if unit not in _UNITS or not digits:
        raise ValueError(text)
    return int(float(digits) * _UNITS[unit])


memory = number(to_bytes, "a memory size (e.g. 8GiB, 512MB)", lambda v: v >= 1, "must be positive")
