"""The client's one config object: timeouts, chunking, message limits, the failover budget, caches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.swarmkey import SwarmKey
from protocol import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["ClientConfig"]


@dataclass(frozen=True)
class ClientConfig:
    step_timeout_s: float = 120.0  # one prefill chunk through one hop
    decode_timeout_s: float = 30.0  # one token through one hop: longer means the peer hangs
    info_timeout_s: float = 10.0  # Info, and opening a session
    prefill_chunk: int = 512  # prompt tokens per step
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_retries: int = 5  # attempts to replace one failed hop
    retry_backoff_s: float = 0.25  # wait before the 2nd attempt; doubles each time (at most 5 s)
    recovery_deadline_s: float = 120.0  # time to replace one failed hop
    avoid_s: float = 60.0  # a peer that failed is left out of routes this long
    exact: bool = False  # route only through --quantize none peers (else bf16, int8 and int4 ones are mixed in)
    hole_punch_wait_s: float = 0.0  # after routing through a relay, wait this long for a direct path
    warm_spares: bool = False  # keep a second session of each hop in step on another peer (2x compute, no replay)
    slow_factor: float = 4.0  # a session moves off a hop this many times slower than it was (0: never)
    slow_steps: int = 6  # ... on average over this many decode steps
    slow_margin_s: float = 0.05  # ... and slower by at least this much per step
    push: bool = True  # hops push their outputs straight to the next hop (else the client relays every hop's)
    sample_at_last_hop: bool = True  # decode steps: the last hop sends the sampled token id, not the logits
    insecure_lan: bool = False  # dial plaintext where no fingerprint is known (a trusted LAN only); default: TLS
    tokenizer_cache: Path | None = None  # tokenizers fetched from peers, per model id; None: $MOEMESH_CACHE/tokenizers
    # Spot-checks of peers' outputs (node.client.verify): the chance that a generation is checked,
    # how many of its steps are (its first, then sampled ones), and how many positions each compares.
    verify_probability: float = 0.0
    verify_steps: int = 2
    verify_tokens: int = 16
    verify_tolerance: float = 0.0  # relative L2 error allowed; 0: by both peers' dtype and quantization
    swarm_key: SwarmKey | None = None  # a private swarm's key (node.swarmkey, SwarmKey.load(path))
