"""Length-prefixed frames on a libp2p stream (trio side): a 4-byte big-endian length, then the
body. The sync and weights protocols speak them; the swarm-key handshake reads fixed sizes."""

from __future__ import annotations

from typing import Any

from libp2p.network.stream.exceptions import StreamEOF
from libp2p.stream_muxer.exceptions import MuxedStreamEOF

from node.errors import FrameError

__all__ = ["read_exactly", "read_frame", "write_frame"]


async def read_exactly(stream: Any, n: int) -> bytes | None:
    """`n` bytes; None when the stream ended before the first, FrameError when it ended within."""
    parts, got = [], 0
    while got < n:
        try:
            chunk = await stream.read(n - got)
        except (StreamEOF, MuxedStreamEOF):
            chunk = b""
        if not chunk:
            if got:
                raise FrameError(f"stream ended {n - got} bytes short of a frame")
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def read_frame(stream: Any, limit: int) -> bytes | None:
    """The next frame, or None when the peer closed the stream between frames."""
    header = await read_exactly(stream, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > limit:
        raise FrameError(f"frame of {size} bytes is over the limit of {limit}")
    body = await read_exactly(stream, size) if size else b""
    if body is None:
        raise FrameError("stream ended before the frame's body")
    return body


async def write_frame(stream: Any, frame: bytes) -> None:
    await stream.write(len(frame).to_bytes(4, "big") + frame)
