"""A daemon in this process, on a thread of its own with its own asyncio loop (for tests).

with DaemonThread(config) as d:
    d.ready(timeout=60)          # the "ready" event's fields
    d.call(d.daemon.move(2, 4))  # run a coroutine on the daemon's loop
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from node.daemon import Daemon, DaemonConfig

__all__ = ["DaemonThread"]

T = TypeVar("T")


class DaemonThread:
    """Runs `Daemon(config).run()`; `__exit__` stops it gracefully and waits for the thread."""

    def __init__(self, config: DaemonConfig) -> None:
        self.events: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self.log: list[str] = []
        self.daemon = Daemon(config, self.log.append, lambda kind, **fields: self.events.put((kind, fields)))
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="moemesh-test-daemon", daemon=True)

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self.daemon.run(handle_signals=False))
        except BaseException as e:  # surfaced by ready() and __exit__
            self.error = e
            self.events.put(("error", {"error": repr(e)}))
        finally:
            self.loop.close()

    def __enter__(self) -> DaemonThread:
        self._thread.start()
        return self

    def ready(self, timeout: float) -> dict[str, Any]:
        """Wait for the "ready" event (raises if the daemon failed first)."""
        while True:
            kind, fields = self.events.get(timeout=timeout)
            if kind == "error":
                raise RuntimeError(f"the daemon failed: {fields['error']}\n" + "\n".join(self.log[-20:]))
            if kind == "ready":
                return fields

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.stop)
            self._thread.join(60)
            if self._thread.is_alive():  # the grace period did not end it: hurry
                self.loop.call_soon_threadsafe(self.daemon.stop)
                self._thread.join(30)
