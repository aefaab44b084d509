"""The swarm-key handshake at the start of every stream of our libp2p protocols (trio side).

A host belongs to a private swarm once `attach(host, key)` has been called (MeshNode does);
each protocol asks `key_of(host)`, so the key needs no plumbing through their configs.
Without a key nothing changes on the wire.

    opener                                     answerer
    MAGIC, nonce, proof("open")      ──>       checks it (else closes the stream)
                                     <──       proof("answer")
    checks it (else KeyRefused)

Each proof is an HMAC (node.swarmkey) over the protocol id, both Noise-authenticated peer
ids, its role and the opener's nonce. Neither side sends a byte of the protocol before the
other has proven the key; an answerer without the key (or with another) reads the opener's
proof as garbage and closes, and an opener without it is closed on.
"""

from __future__ import annotations

import hmac
import logging
import os
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from node.errors import FrameError, KeyRefused
from node.mesh.frames import read_exactly
from node.mesh.internals import gate_opened_streams
from node.swarmkey import SwarmKey

__all__ = ["HANDSHAKE_TIMEOUT_S", "attach", "gate_kademlia", "guard", "key_of", "open_keyed", "prove_as_opener"]

log = logging.getLogger(__name__)
MAGIC = b"mmswk1\x00\x00"
NONCE_BYTES = 32
PROOF_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0
_KEYS: weakref.WeakKeyDictionary[IHost, SwarmKey] = weakref.WeakKeyDictionary()

Handler = Callable[[INetStream], Awaitable[None]]


def attach(host: IHost, key: SwarmKey | None) -> None:
    """`host` speaks only to holders of `key` on our protocols (None: an open swarm)."""
    if key is None:
        _KEYS.pop(host, None)
    else:
        _KEYS[host] = key


def key_of(host: IHost) -> SwarmKey | None:
    return _KEYS.get(host)


async def _read_exactly(stream: Any, n: int) -> bytes:
    try:
        data = await read_exactly(stream, n)
    except FrameError:
        data = None
    if data is None:
        raise KeyRefused("the stream ended within the swarm-key handshake")
    return data


def _ids(stream: Any) -> str:
    return str(stream.muxed_conn.peer_id)


async def prove_as_opener(stream: Any, key: SwarmKey, protocol: str, me: str) -> None:
    """Our side of the handshake on a stream we opened; KeyRefused when the answerer does not prove the key."""
    them = _ids(stream)
    nonce = os.urandom(NONCE_BYTES)
    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
        await stream.write(MAGIC + nonce + key.stream_proof("open", protocol, me, them, nonce))
        answer = await _read_exactly(stream, PROOF_BYTES)
    if not hmac.compare_digest(answer, key.stream_proof("answer", protocol, me, them, nonce)):
        raise KeyRefused(f"{them} does not hold our swarm key")


async def _prove_as_answerer(stream: Any, key: SwarmKey, protocol: str, me: str) -> bool:
    them = _ids(stream)
    with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
        hello = await _read_exactly(stream, len(MAGIC) + NONCE_BYTES + PROOF_BYTES)
        nonce, proof = hello[len(MAGIC) : len(MAGIC) + NONCE_BYTES], hello[len(MAGIC) + NONCE_BYTES :]
        if hello[: len(MAGIC)] != MAGIC or not hmac.compare_digest(
            proof, key.stream_proof("open", protocol, them, me, nonce)
        ):
            log.info("refused a %s stream from %s: it does not hold our swarm key", protocol, them)
            return False
        await stream.write(key.stream_proof("answer", protocol, them, me, nonce))
        return True
    log.info("refused a %s stream from %s: no swarm-key handshake in time", protocol, them)
    return False


def guard(host: IHost, protocol: TProtocol, handler: Handler) -> Handler:
    """`handler`, run only for openers that prove our key (when `host` has one); others are reset."""

    async def keyed(stream: INetStream) -> None:
        key = key_of(host)
        if key is not None:
            try:
                ok = await _prove_as_answerer(stream, key, protocol, host.get_id().to_base58())
            except KeyRefused as e:
                log.info("refused a %s stream: %s", protocol, e)
                ok = False
            except Exception as e:  # the opener broke the stream: nothing to serve
                log.info("a %s stream broke in the swarm-key handshake: %r", protocol, e)
                ok = False
            if not ok:
                with trio.move_on_after(1):
                    await stream.reset()
                return
        await handler(stream)

    return keyed


def gate_kademlia(host: IHost, protocol: TProtocol, handler: Handler | None) -> None:
    """In a private swarm, Kademlia's streams prove the key too: py-libp2p's own, which it opens
    and handles itself. `handler`: the DHT's stream handler to guard (None in client mode, which
    serves none); call again after a mode switch, which registers the bare handler."""
    key = key_of(host)
    if key is None:
        return
    if handler is not None:
        host.set_stream_handler(protocol, guard(host, protocol, handler))
    if not getattr(host, "_moemesh_kad_gated", False):
        me = host.get_id().to_base58()
        gate_opened_streams(host, protocol, lambda stream: prove_as_opener(stream, key, protocol, me))
        host._moemesh_kad_gated = True  # type: ignore[attr-defined]


async def open_keyed(host: IHost, peer: ID, protocol: TProtocol) -> INetStream:
    """A new stream to `peer` on `protocol`, past the handshake when `host` has a key (KeyRefused)."""
    stream = await host.new_stream(peer, [protocol])
    key = key_of(host)
    if key is not None:
        try:
            await prove_as_opener(stream, key, protocol, host.get_id().to_base58())
        except BaseException:
            with trio.move_on_after(1):
                await stream.reset()
            raise
    return stream
