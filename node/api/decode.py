"""Turning a stream of generated token ids into a stream of text, and cutting it at stop strings.

Pure and synchronous, so they are tested without a swarm: the relay feeds them one token at
a time on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["Detokenizer", "StopMatcher"]


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class Detokenizer:
    """Incremental decoding with a short window of context (as vLLM does), not the whole text
    each token: decoding `ids[prefix:]` against `ids[prefix:read]` keeps the spaces that
    depend on the previous token, and waits while the text ends in an incomplete UTF-8
    sequence. The pieces joined equal `decode(all ids)` for the tokenizers we serve."""

    def __init__(self, codec: _Decoder) -> None:
        self._codec = codec
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are already in the text given out

    def add(self, token: int) -> str:
        """The new text that `token` completes ('' while it waits for more)."""
        self._ids.append(token)
        before = self._codec.decode(self._ids[self._prefix : self._read])
        after = self._codec.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """What is still held back at the end of the generation (a trailing partial character)."""
        before = self._codec.decode(self._ids[self._prefix : self._read])
        after = self._codec.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopMatcher:
    """Cuts the text before the first stop string, holding back any tail that could begin one,
    so a stream never shows a stop string, not even its first half."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text safe to show now; sets `stopped` when a stop string was reached."""
        if self.stopped:
            return ""
        self._text += piece
        hits = [i for s in self._stops if (i := self._text.find(s, max(0, self._sent - len(s) + 1))) >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(self._text) - self._held_back()
        out = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return out

    def flush(self) -> str:
        """The rest of the text at the end of a generation that no stop string ended."""
        if self.stopped:
            return ""
        out = self._text[self._sent :]
        self._sent = len(self._text)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:k]):
                    longest = k
                    break
        return longest
