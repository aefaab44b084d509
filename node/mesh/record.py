"""`/moemesh/record/1.0.0`: "send me your current signed record", asked of the peer itself.

A fresh record in one dial, without a DHT lookup. The answerer writes its signed record
(possibly empty: not published yet) and closes; the asker reads to the end, up to a bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF

from node.mesh.bridge import unwrap
from node.mesh.keyed import guard, open_keyed

__all__ = ["RECORD_PROTOCOL", "RecordConfig", "RecordProtocol", "install", "read_record", "write_record"]

log = logging.getLogger(__name__)
RECORD_PROTOCOL = TProtocol("/moemesh/record/1.0.0")


@dataclass(frozen=True)
class RecordConfig:
    timeout_s: float = 3.0  # to answer, and to ask (dial included)
    max_bytes: int = 64 * 1024


async def write_record(stream: INetStream, signed: bytes) -> None:
    await stream.write(signed)


async def read_record(stream: INetStream, max_bytes: int) -> bytes:
    """What the peer wrote until it closed, at most a little over `max_bytes`."""
    data = b""
    while len(data) <= max_bytes:
        try:
            chunk = await stream.read(max_bytes)
        except (StreamEOF, MuxedStreamEOF):
            break
        if not chunk:
            break
        data += chunk
    return data


class RecordProtocol:
    """Answers with `signed` (what we last published); asks peers for theirs."""

    def __init__(self, host: IHost, config: RecordConfig) -> None:
        self.host = host
        self.config = config
        self.signed = b""

    async def answer(self, stream: INetStream) -> None:
        """The handler of an asker's stream: our record, then close."""
        try:
            with trio.move_on_after(self.config.timeout_s):
                await write_record(stream, self.signed)
        finally:
            await stream.close()

    async def ask(self, peer_id: str) -> bytes | None:
        """The record straight from the peer (fresh, one dial), or None when it cannot be reached."""
        data = b""
        with trio.move_on_after(self.config.timeout_s):
            try:
                stream = await open_keyed(self.host, ID.from_base58(peer_id), RECORD_PROTOCOL)
                try:
                    data = await read_record(stream, self.config.max_bytes)
                finally:
                    await stream.close()
            except Exception as e:  # unreachable, or it broke off: ask the DHT
                log.debug("asking %s for its record: %r", peer_id, unwrap(e))
        return data or None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


def install(host: IHost, config: RecordConfig) -> RecordProtocol:
    proto = RecordProtocol(host, config)
    host.set_stream_handler(RECORD_PROTOCOL, guard(host, RECORD_PROTOCOL, proto.answer))
    return proto
