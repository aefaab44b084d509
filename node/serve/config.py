"""What a serving node was asked for: one frozen dataclass, passed as an object (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.swarmkey import SwarmKey
from protocol import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """What `moemesh serve` (or the daemon's serving part) was asked for."""

    model: Path
    start: int
    end: int
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (printed at start)
    dtype: str | None = None  # None: as stored in the checkpoint
    quantize: str = "none"  # weight-only quantization at load: "none", "bf16", "int8", "int4" (kernels.quant)
    device: str = "cpu"  # where the span computes: "cpu", "cuda" or "auto" (node.serve.device)
    max_memory_bytes: int = 0  # the span's weights may take this much; 0: a safe share of free memory
    max_sessions: int = 64
    max_length: int = 8192  # longest session accepted (capped by the model's positions)
    default_length: int = 2048  # when a session does not say
    max_tokens_per_step: int = 8192  # longest chunk one step or Forward may carry
    kv_budget_bytes: int = 4 * 1024**3  # KV caches of all sessions together
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    torch_threads: int | None = None
    max_batch: int = 16  # decode steps of this many sessions run as one forward
    batch_wait: float = 0.25  # a batch may wait this fraction of the last one's compute time for due steps
    slice_tokens: int = 64  # a Forward of this many tokens or more runs one layer per round (others go between)
    idle_timeout_s: float = 300.0  # a session with no request for this long is closed
    grace_s: float = 30.0  # on shutdown: how long open sessions may finish before they are told to move
    # What one client (one connection: its gRPC peer) may hold, so that no client can take the server:
    max_sessions_per_client: int = 0  # open sessions; 0: a quarter of max_sessions (at least 1)
    max_queued_per_client: int = 32  # steps and Forwards waiting for compute
    max_inflight_bytes_per_client: int = 0  # request bytes being served; 0: max_message_bytes
    insecure_lan: bool = False  # serve plaintext gRPC (a trusted LAN only); default: TLS with a pinned certificate
    swarm_key: SwarmKey | None = None  # a private swarm: only calls proving its key are served (node.serve.gate)

    @property
    def sessions_per_client(self) -> int:
        return self.max_sessions_per_client or max(1, self.max_sessions // 4)

    @property
    def inflight_bytes_per_client(self) -> int:
        return self.max_inflight_bytes_per_client or self.max_message_bytes
