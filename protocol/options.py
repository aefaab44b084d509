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
        # The server's side of that keepalive: by default it takes a ping without data at most every
        # 5 min and answers a client pinging every 20 s with GOAWAY "too_many_pings" (seen by bench/fuzz.py).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
