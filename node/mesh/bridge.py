"""The one bridge between the asyncio world (gRPC, state) and the trio world (py-libp2p).

py-libp2p runs on trio only and grpc.aio on asyncio only, so the libp2p host lives on its
own thread running `trio.run`. Calls cross as coroutine functions with plain arguments and
plain results (bytes, strings, numbers): nothing else touches the other loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio

__all__ = ["TrioThread", "unwrap"]

T = TypeVar("T")


def unwrap(error: BaseException) -> BaseException:
    """The one real error inside trio's nested one-member exception groups (else the group)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class TrioThread:
    """A thread running a trio loop with one root nursery, until `stop()`."""

    def __init__(self, name: str = "moemesh-p2p") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stopped: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # surfaced by start() or logged by the owner
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stopped = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stopped.wait()
            nursery.cancel_scope.cancel()

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        if self._token is None:
            raise RuntimeError("the trio thread is not running")
        return self._token

    def call_sync(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From a plain thread: run `fn(*args)` on the trio loop and wait for it."""
        try:
            return trio.from_thread.run(fn, *args, trio_token=self.token)
        except BaseExceptionGroup as group:
            raise unwrap(group) from None

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From asyncio: run `fn(*args)` on the trio loop; cancelling the await cancels it there."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()

        def settle(ok: bool, value: Any) -> None:
            if future.done():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        async def task() -> None:
            with scope:
                try:
                    result = await fn(*args)
                except BaseException as e:  # crosses to asyncio, re-raised there
                    error = unwrap(e)
                    if not isinstance(error, Exception):
                        error = RuntimeError(repr(error))
                    loop.call_soon_threadsafe(settle, False, error)
                    return
                loop.call_soon_threadsafe(settle, True, result)
            if scope.cancelled_caught:
                loop.call_soon_threadsafe(settle, False, asyncio.CancelledError())

        def spawn() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(task)

        self.token.run_sync_soon(spawn)
        try:
            return await future
        except asyncio.CancelledError:
            self.token.run_sync_soon(scope.cancel)
            raise

    @staticmethod
    async def to_asyncio(loop: asyncio.AbstractEventLoop, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """(On trio) run `fn(*args)` on the asyncio `loop` and await its result; cancelling cancels it there.

        For handlers of incoming streams whose answer needs state that lives on asyncio.
        """
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(fn(*args), loop)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    async def start_service(self, fn: Callable[..., Awaitable[None]]) -> Any:
        """(On trio) start `fn(task_status=...)` in the root nursery; return what it reports started."""
        assert self._nursery is not None
        return await self._nursery.start(fn)

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start a background task in the root nursery (from any thread)."""

        def start() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(fn, *args)

        self.token.run_sync_soon(start)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._stopped is None:
            return
        try:
            self.token.run_sync_soon(self._stopped.set)
        except trio.RunFinishedError:
            pass
        self._thread.join(timeout)
        self._thread = None
