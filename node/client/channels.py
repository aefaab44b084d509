"""The client's gRPC channels: one per peer address, TLS pinned to a certificate fingerprint.

An address is "host:port#fingerprint" (pinned: a peer presenting another certificate is
refused with PeerUntrusted) or "host:port" (trusted on first use: the fingerprint seen first
is pinned from then on). Plaintext only with `insecure_lan`, and only to addresses without
a pin. A channel through a local tunnel is replaced when the tunnel's path changes (a hole
punch): new connections take the new path, the old channel lives on for the sessions
still using it.
"""

from __future__ import annotations

import threading

import grpc

from node.swarmkey import SwarmKey
from node.tls import TLS_NAME, channel_credentials, split_pin
from protocol import grpc_options

__all__ = ["Channels"]


class Channels:
    """Thread-safe: sessions of one client may run in several threads."""

    def __init__(
        self,
        max_message_bytes: int,
        handshake_timeout_s: float,
        insecure_lan: bool = False,
        swarm_key: SwarmKey | None = None,
    ) -> None:
        self._swarm_key = swarm_key  # a private swarm: every call proves it (node.serve.gate)
        self._max_message_bytes = max_message_bytes
        self._handshake_timeout_s = handshake_timeout_s
        self._insecure_lan = insecure_lan
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._paths: dict[str, str] = {}  # tunnel address -> the path when its channel was made
        self._old: list[grpc.Channel] = []
        self._first_seen: dict[str, str] = {}  # address given without a pin -> the fingerprint trusted first

    def get(self, address: str, tunnel_path: str | None = None) -> grpc.Channel:
        """The channel to `address`, made on first use (`tunnel_path`: how its tunnel goes now)."""
        with self._lock:
            if tunnel_path is not None:
                if address in self._channels and tunnel_path != self._paths[address]:
                    self._old.append(self._channels.pop(address))
                self._paths[address] = tunnel_path
            if address in self._channels:
                return self._channels[address]
        channel = self._dial(address)  # a TLS handshake: not under the lock
        with self._lock:
            if address in self._channels:  # another thread dialed it meanwhile
                channel.close()
            else:
                self._channels[address] = channel
            return self._channels[address]

    def first_seen(self, address: str) -> str:
        """The fingerprint trusted on first use for an address given without a pin ("" if none)."""
        with self._lock:
            return self._first_seen.get(address, "")

    def _dial(self, address: str) -> grpc.Channel:
        target, pin = split_pin(address)
        options = grpc_options(self._max_message_bytes)
        if not pin and self._insecure_lan:
            return self._proving(grpc.insecure_channel(target, options=options), "")
        with self._lock:
            pin = pin or self._first_seen.get(address, "")
        credentials, seen = channel_credentials(target, pin, self._handshake_timeout_s)
        with self._lock:
            self._first_seen.setdefault(address, seen)
        channel = grpc.secure_channel(
            target, credentials, options=[*options, ("grpc.ssl_target_name_override", TLS_NAME)]
        )
        return self._proving(channel, pin or seen)

    def _proving(self, channel: grpc.Channel, fingerprint: str) -> grpc.Channel:
        """In a private swarm, `channel` with a fresh swarm-key proof bound to `fingerprint` on every call."""
        if self._swarm_key is None:
            return channel
        from node.serve.gate import ProvingInterceptor

        return grpc.intercept_channel(channel, ProvingInterceptor(self._swarm_key, fingerprint))

    def close(self) -> None:
        with self._lock:
            channels = [*self._channels.values(), *self._old]
            self._channels.clear()
            self._old.clear()
        for channel in channels:
            channel.close()
