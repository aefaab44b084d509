"""The one lifecycle of a serving process (signals, drain, grace), for `moemesh serve` and `moemesh daemon`.

    with Lifecycle() as lifecycle:         # SIGINT/SIGTERM handlers on the running loop, removed on exit
        ...                                # serve
        await lifecycle.stop_requested()   # the first signal (or lifecycle.request_stop())
        await lifecycle.drain(engine)      # refuse new sessions, let open ones finish within the
                                           # grace, then tell the rest to move

- The first SIGINT/SIGTERM requests a graceful stop: `stop_requested()` returns, and
  `stopping` is true.
- A second one hurries (`hurry()`): the grace is cut short, the sessions of every engine
  being drained, or drained later by this lifecycle, are told to move at once (their streams
  end with UNAVAILABLE and their clients replay them on other peers).
- `drain(engine, grace_s=None)` is the same step for a stop and for a daemon's move to
  another span (a second signal during a move's drain hurries it too); the grace is the
  engine's `config.grace_s` unless given here or to `Lifecycle(grace_s=...)`.
- `await unless_stopped(work)` is for what comes before serving (loading a span, measuring
  it): a stop requested meanwhile cancels the work (a load ends at its next tensor) and
  raises `Stopped`, so Ctrl-C at any point of a start ends the process within moments.
- `received` is the first signal (`interrupted`: it was SIGINT, which the CLI answers with
  exit code 130, as a shell expects of Ctrl-C).

`Lifecycle` imports no torch. `serve(config, on_ready)` is `moemesh serve` whole: load the
engine off the loop, start the gRPC server, serve until a signal, drain, stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from node.errors import Stopped

if TYPE_CHECKING:
    from node.serve.config import ServerConfig
    from node.serve.engine import Engine
    from node.tls import Certificate

__all__ = ["SIGNALS", "Lifecycle", "serve"]

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


class Lifecycle:
    """Turns SIGINT/SIGTERM into a graceful stop, and drains engines within their grace."""

    def __init__(self, grace_s: float | None = None) -> None:
        self.grace_s = grace_s  # None: each engine's config.grace_s
        self._stop = asyncio.Event()
        self._hurried = False
        self._draining: set[Engine] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.received: int | None = None  # the first signal, if one came

    # -- signals ----------------------------------------------------------------------------

    def install(self) -> None:
        """Handle SIGINT and SIGTERM on the running loop (call from a coroutine)."""
        self._loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            self._loop.add_signal_handler(sig, self.on_signal, sig)

    def uninstall(self) -> None:
        """Give SIGINT and SIGTERM back to their default handling."""
        if self._loop is not None:
            for sig in SIGNALS:
                self._loop.remove_signal_handler(sig)
            self._loop = None

    def __enter__(self) -> Lifecycle:
        self.install()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.uninstall()

    def on_signal(self, sig: int | None = None) -> None:
        """The first signal stops gracefully; a second one cuts the grace period short."""
        if self.received is None:
            self.received = sig
        if self._stop.is_set():
            log.info("second signal: telling open sessions to move now")
            self.hurry()
        self.request_stop()

    # -- stopping ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """What the first signal does: `stop_requested()` returns."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def stop_requested(self) -> None:
        """Wait until a stop is requested (a signal, or `request_stop()`)."""
        await self._stop.wait()

    @property
    def interrupted(self) -> bool:
        """The stop came from SIGINT (Ctrl-C)."""
        return self.received == signal.SIGINT

    async def unless_stopped(self, work: Awaitable[T]) -> T:
        """`work`'s result, unless a stop is requested first: then `work` is cancelled (and
        awaited) and Stopped is raised."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})  # its cleanup, without swallowing a cancellation of ours
        if task.cancelled() and self.stopping:
            raise Stopped("stopped before it was ready")
        return task.result()

    def hurry(self) -> None:
        """Cut every grace short: the sessions of the engines being drained (and of those drained
        from now on) are told to move at once."""
        self._hurried = True
        for engine in self._draining:
            engine.moving.set()

    async def drain(self, engine: Engine, grace_s: float | None = None) -> None:
        """Refuse new sessions on `engine`, let its open ones finish within the grace, then tell
        the rest to move; returns when they are gone (or 5 s after telling them)."""
        grace_s = self.grace_s if grace_s is None else grace_s
        self._draining.add(engine)
        try:
            if self._hurried:
                engine.moving.set()
            await engine.drain(grace_s)
        finally:
            self._draining.discard(engine)


async def serve(
    config: ServerConfig,
    on_ready: Callable[[Engine, int], Awaitable[None] | None] | None = None,
    progress: Callable[[str], None] | None = None,
    certificate: Certificate | None = None,
    lifecycle: Lifecycle | None = None,
) -> None:
    """`moemesh serve`: load the span (the loop keeps running), serve it over gRPC until SIGINT
    or SIGTERM, then drain: refuse new sessions, let open ones finish within the grace period,
    tell the rest to move, and return. `on_ready(engine, port)` is called once it listens.
    It serves TLS with `certificate` (see `start_server`; plaintext only with `insecure_lan`).
    A signal during the load stops it there (and serve returns); `lifecycle.received` says which."""
    lifecycle = lifecycle or Lifecycle()
    with lifecycle:  # before the imports: a signal during them is a stop, not a KeyboardInterrupt
        from node.serve.engine import Engine
        from node.serve.service import start_server

        try:
            engine = await lifecycle.unless_stopped(Engine.load(config, progress))
        except Stopped:
            return
        try:
            server, port = await start_server(engine, certificate)
            try:
                if on_ready is not None:
                    maybe: Any = on_ready(engine, port)
                    if maybe is not None:
                        await maybe
                await lifecycle.stop_requested()
                await lifecycle.drain(engine)
            finally:
                await server.stop(grace=1.0)
        finally:
            await engine.aclose()
