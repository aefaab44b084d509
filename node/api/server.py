"""Running the API app under uvicorn: the socket bound first (a port in use is an error before
anything starts), then a `ready` callback with the address once the app is up."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Sequence

from node.api.app import build_app
from node.api.relay import ApiConfig, Relay
from node.api.swarm import SwarmView
from node.client import Client
from node.errors import ConfigError

__all__ = ["run_api"]


def run_api(
    client: Client,
    *,
    host: str,
    port: int,
    bootstrap: Sequence[str] = (),
    peers: Sequence[str] = (),
    config: ApiConfig | None = None,
    ready: Callable[[str], None] = lambda address: None,
) -> None:
    """Serve the OpenAI-compatible API over `client` until SIGINT/SIGTERM (uvicorn's handlers
    stop it gracefully, then re-raise the signal). Closes the client at the end."""
    import uvicorn

    config = config or ApiConfig()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is in use (another `moemesh api`?): pick another --port"
            ) from None
        raise
    address = f"[{host}]:{sock.getsockname()[1]}" if family == socket.AF_INET6 else f"{host}:{sock.getsockname()[1]}"
    relay = Relay(client, config)
    app = build_app(relay, SwarmView(client, bootstrap, peers, config.swarm_refresh_s), lambda: ready(address))
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5, lifespan="on")
    )
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
