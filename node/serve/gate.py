"""The gRPC gate of a private swarm: a call is served only with a proof of the swarm key.

A server interceptor checks the call's `moemesh-swarm-proof` metadata (node.swarmkey)
before any handler runs: an HMAC over this server's TLS certificate fingerprint, a time
within `MAX_SKEW_S` of ours and a nonce not seen before. A call without one, with another
key's, a proof made for another server, an old one or a replayed one is answered
UNAUTHENTICATED and nothing else happens. Bound to the fingerprint, a proof a server
receives is useless at any other server; inside TLS, nobody else sees it.

The client side (`ProvingInterceptor`) adds a fresh proof to each call of a channel.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from node.swarmkey import GRPC_METADATA, MAX_SKEW_S, SwarmKey

__all__ = ["ProvingInterceptor", "SwarmGate"]

_STREAMING = {"InferenceSession"}  # stream-stream methods of the Shard service
_CLIENT_STREAMING = {"Push"}  # stream-unary (server to server); the rest are unary
MAX_NONCES = 100_000  # remembered proofs (one per call within the skew window)


class _Nonces:
    """Nonces seen within the last 2 * MAX_SKEW_S (bounded: the oldest are dropped first)."""

    def __init__(self) -> None:
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def fresh(self, nonce: str, at: float) -> bool:
        now = time.time()
        while self._seen and (len(self._seen) >= MAX_NONCES or next(iter(self._seen.values())) < now - 2 * MAX_SKEW_S):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = at
        return True


class SwarmGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call that does not prove `key` to the server with `fingerprint` ("" for plaintext)."""

    def __init__(self, key: SwarmKey, fingerprint: str) -> None:
        self.key = key
        self.fingerprint = fingerprint
        self._nonces = _Nonces()

    def _why_not(self, metadata: Any) -> str | None:
        values = [v for k, v in (metadata or ()) if k == GRPC_METADATA]
        if not values:
            return "this is a private swarm: the call carries no proof of its swarm key"
        value = values[0] if isinstance(values[0], str) else bytes(values[0]).decode("ascii", "replace")
        checked = self.key.check_grpc_proof(value, self.fingerprint)
        if checked is None:
            return "the call's swarm-key proof is not valid here (another key, another server, or too old)"
        if not self._nonces.fresh(*checked):
            return "the call's swarm-key proof was used before"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        why = self._why_not(details.invocation_metadata)
        if why is None:
            return await continuation(details)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        method = details.method.rsplit("/", 1)[-1]
        if method in _STREAMING:
            return grpc.stream_stream_rpc_method_handler(deny)
        if method in _CLIENT_STREAMING:
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):  # type: ignore[misc]
    pass


class ProvingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds a fresh proof of `key`, bound to the server's `fingerprint`, to every call."""

    def __init__(self, key: SwarmKey, fingerprint: str) -> None:
        self.key = key
        self.fingerprint = fingerprint

    def _with_proof(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), (GRPC_METADATA, self.key.grpc_proof(self.fingerprint))]
        return _Details(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_proof(details), request)

    def intercept_stream_stream(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return continuation(self._with_proof(details), requests)
