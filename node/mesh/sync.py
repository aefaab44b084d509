"""The swarm-state sync protocol on libp2p streams (`/moemesh/sync/1.0.0`), trio side.

A stream carries a short conversation of length-prefixed `SyncFrame`s (4-byte big-endian
length, then the frame): the opener writes one frame, then each side answers what it
reads until one has nothing to answer and closes. What to answer is decided by
`crdt.Replica` on the asyncio thread; here are only bytes, framing and timeouts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from crdt import Limits
from node.mesh.frames import read_frame, write_frame
from node.mesh.keyed import guard, open_keyed

__all__ = ["SYNC_PROTOCOL", "SyncConfig", "SyncWire", "fetch_state", "install"]

log = logging.getLogger(__name__)

SYNC_PROTOCOL = TProtocol("/moemesh/sync/1.0.0")
MAX_FRAME_BYTES = Limits().max_frame_bytes + (64 << 10)  # what a replica takes, + the frame's other fields
MAX_FRAMES = 6  # a conversation is at most PULL, ANSWER, PUSH (+ an epoch change)
TIMEOUT_S = 10.0
ADDRESS_TTL_S = 600

Responder = Callable[[str, bytes], Awaitable[bytes | None]]  # (the sender's peer id, frame) -> answer


@dataclass(frozen=True)
class SyncConfig:
    timeout_s: float = TIMEOUT_S  # one whole conversation


async def converse(stream: Any, first: bytes | None, respond: Responder) -> float | None:
    """Write `first` (if any), then answer frames until one side has nothing to say.

    `respond` gets the remote peer id that Noise authenticated, for per-peer limits.
    Returns the seconds from writing `first` to reading the answer (None without one).
    """
    sender = _remote(stream)
    rtt = None
    started = time.perf_counter()
    if first is not None:
        await write_frame(stream, first)
    for _ in range(MAX_FRAMES):
        frame = await read_frame(stream, MAX_FRAME_BYTES)
        if rtt is None and first is not None and frame is not None:
            rtt = time.perf_counter() - started
        if frame is None:
            break
        answer = await respond(sender, frame)
        if answer is None:
            break
        await write_frame(stream, answer)
    return rtt


def _addresses(multiaddrs: Sequence[str]) -> list[Multiaddr]:
    out = []
    for text in multiaddrs:
        try:
            out.extend(info_from_p2p_addr(Multiaddr(text)).addrs)
        except Exception:  # multiaddr raises several types; a bad address of a peer is skipped
            log.debug("skipping the address %r", text)
    return out


class SyncWire:
    """Serves and opens sync conversations on one host; every method runs on the trio thread."""

    def __init__(self, host: IHost, respond: Responder, timeout_s: float = TIMEOUT_S) -> None:
        self.host = host
        self.respond = respond
        self.timeout_s = timeout_s

    async def install(self) -> None:
        """Serve `SYNC_PROTOCOL` with this wire (what `install` does, for a wire made first)."""
        self.host.set_stream_handler(SYNC_PROTOCOL, guard(self.host, SYNC_PROTOCOL, self.handle))

    async def handle(self, stream: Any) -> None:
        """The handler of a peer's conversation: answer it, within the timeout."""
        try:
            with trio.move_on_after(self.timeout_s):
                await converse(stream, None, self.respond)
        except Exception as e:  # a broken peer must not take the handler down
            log.info("sync conversation with %s failed: %r", _remote(stream), e)
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def exchange(self, peer_id: str, multiaddrs: Sequence[str], first: bytes) -> float | None:
        """Open a conversation with `peer_id` starting with `first`; the first round trip in seconds,
        or None when the peer could not be reached or broke off."""
        try:
            peer = ID.from_base58(peer_id)
            addrs = _addresses(multiaddrs)
            if addrs:
                self.host.get_peerstore().add_addrs(peer, addrs, ADDRESS_TTL_S)
            with trio.fail_after(self.timeout_s):
                stream = await open_keyed(self.host, peer, SYNC_PROTOCOL)
                try:
                    return await converse(stream, first, self.respond)
                finally:
                    with trio.move_on_after(1):
                        await stream.close()
        except Exception as e:  # unreachable, gone, or a broken conversation: anti-entropy repairs later
            log.debug("sync with %s failed: %r", peer_id, e)
            return None


def install(host: IHost, config: SyncConfig, respond: Responder) -> SyncWire:
    """Serve `SYNC_PROTOCOL` on `host` (on the trio thread), answering with `respond`."""
    wire = SyncWire(host, respond, config.timeout_s)
    host.set_stream_handler(SYNC_PROTOCOL, guard(host, SYNC_PROTOCOL, wire.handle))
    return wire


async def fetch_state(
    host: IHost, peer_id: str, multiaddrs: Sequence[str], pull: bytes, timeout_s: float = TIMEOUT_S
) -> bytes | None:
    """Send one PULL frame to `peer_id` and return its first answer (its document), or None."""
    answer: list[bytes] = []

    async def keep(sender: str, frame: bytes) -> None:
        answer.append(frame)
        return None

    wire = SyncWire(host, keep, timeout_s)
    await wire.exchange(peer_id, multiaddrs, pull)
    return answer[0] if answer else None


def _remote(stream: Any) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except AttributeError:
        return ""  # unknown: no per-peer accounting
