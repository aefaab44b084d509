"""Where a text client's tokenizer comes from when it has no model folder: the swarm.

The first peer (of those serving the model, nearest first) whose `Tokenizer` answer passes
`node.textfiles.unpack` gives it; it is stored under the cache folder of its model id
(`ClientConfig.tokenizer_cache`, default $MOEMESH_CACHE/tokenizers) and read from there by
every later client of that model, with no network at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from node.client.stream import ask_tokenizer
from node.errors import PeerError, TokenizerError
from node.textfiles import cached, store, unpack

__all__ = ["MAX_ASKED", "swarm_tokenizer"]

log = logging.getLogger(__name__)
MAX_ASKED = 8  # peers asked before giving up: a swarm of bad answers costs at most this many calls


def swarm_tokenizer(
    model_id: str,
    addresses: Sequence[str],
    channel: Callable[[str], grpc.Channel],
    root: Path,
    timeout_s: float,
) -> Path:
    """The folder holding `model_id`'s tokenizer: the cached one, else one fetched from the first
    of `addresses` to give a valid one. TokenizerError naming each peer's failure otherwise."""
    if (folder := cached(root, model_id)) is not None:
        return folder
    why: list[str] = []
    for address in list(dict.fromkeys(addresses))[:MAX_ASKED]:
        try:
            raw = ask_tokenizer(channel(address), address, model_id, timeout_s)
            folder = store(root, unpack(raw, model_id, address))
        except (PeerError, TokenizerError) as e:
            log.info("no tokenizer from %s: %s", address, e)
            why.append(str(e))
            continue
        log.info("tokenizer of %s from %s, kept in %s", model_id, address, folder)
        return folder
    raise TokenizerError(
        f"no tokenizer for model {model_id} ({'; '.join(why) or 'no peer serves the model'});"
        " pass the model folder (--model) for its tokenizer"
    )
