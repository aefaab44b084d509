"""gRPC channel and server options shared by both ends."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "grpc_options"]

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # gRPC's own default is 4 MiB: far too small for prefill


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Explicit message limits (both directions) and keepalive so a dead peer is noticed."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # a server takes the other end's keepalive pings (every 20 s) without calling them abuse: its
        # default (one per 5 min without data) answered a long session's pings with GOAWAY too_many_pings
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
