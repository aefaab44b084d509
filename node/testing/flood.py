"""One client floods a server with queued prefills while another generates: how much slower is
the victim? (The fairness test and `bench/fairness.py` share this.)

The flood is `requests` stateless Forwards of `tokens` tokens each, sent at once on a
connection of its own; the victim is an ordinary `Client` generating on another connection,
timed once the server holds most of the flood in its queue. Both ends are real gRPC over TLS.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from node.client import Client
from node.tls import pinned_channel, split_pin
from protocol import grpc_options, make_tensor
from protocol.shard_pb2 import ForwardRequest, ForwardResponse, InfoRequest, InfoResponse

__all__ = ["FloodResult", "victim_slowdown"]


@dataclass(frozen=True)
class FloodResult:
    unloaded_s: float  # the victim's generation alone (median of the runs)
    loaded_s: float  # the same generation under the flood (median of as many runs, one after another)
    queued_at_start: int  # steps the server had queued when the victim started
    flood_left: int  # flood requests not yet answered when the victim's last run finished
    flood_refused: int  # flood requests the server refused (RESOURCE_EXHAUSTED past the client's share)

    @property
    def ratio(self) -> float:
        return self.loaded_s / self.unloaded_s


def _generate(client: Client, prompt: Sequence[int], tokens: int) -> float:
    started = time.perf_counter()
    out = list(client.generate(prompt, tokens, stop_at_eos=False))
    assert len(out) == tokens
    return time.perf_counter() - started


def victim_slowdown(
    pinned: str,
    num_layers: int,
    *,
    requests: int = 100,
    tokens: int = 512,
    prompt: Sequence[int] = (5, 6, 7, 8),
    victim_tokens: int = 2,
    runs: int = 3,
) -> FloodResult:
    """Time the victim alone, then under a flood of `requests` Forwards; `pinned` is host:port#fingerprint."""
    address, fingerprint = split_pin(pinned)
    options = [*grpc_options(), ("grpc.use_local_subchannel_pool", 1)]  # the flood's own connection
    with Client([pinned]) as victim, pinned_channel(address, fingerprint, options) as flood:
        _generate(victim, prompt, victim_tokens)  # warm-up
        unloaded = statistics.median(_generate(victim, prompt, victim_tokens) for _ in range(runs))
        forward = flood.unary_unary(
            "/moemesh.v1.Shard/Forward",
            request_serializer=ForwardRequest.SerializeToString,
            response_deserializer=ForwardResponse.FromString,
        )
        info = victim.channel(pinned).unary_unary(
            "/moemesh.v1.Shard/Info",
            request_serializer=InfoRequest.SerializeToString,
            response_deserializer=InfoResponse.FromString,
        )
        ids = np.random.default_rng(0).integers(1, 200, size=(1, tokens), dtype="<i8")
        request = ForwardRequest(start=0, end=num_layers, input=make_tensor("int64", ids.shape, ids.tobytes()))
        futures = [forward.future(request, timeout=600) for _ in range(requests)]
        try:
            deadline = time.monotonic() + 30
            queued = 0
            while time.monotonic() < deadline:
                queued = info(InfoRequest(), timeout=10).capacity.queued_steps
                refused = sum(1 for f in futures if f.done() and f.exception() is not None)
                if queued + refused >= requests // 2:
                    break
                time.sleep(0.005)
            loaded = statistics.median(_generate(victim, prompt, victim_tokens) for _ in range(runs))
            left = sum(1 for f in futures if not f.done())
        finally:
            for f in futures:
                f.cancel()
        refused = sum(
            1
            for f in futures
            if f.done()
            and not f.cancelled()
            and isinstance(f.exception(), grpc.RpcError)
            and f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
        )
    return FloodResult(unloaded, loaded, queued, left, refused)
