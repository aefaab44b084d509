"""How the gRPC edge refuses: a request's bytes parsed into its message or INVALID_ARGUMENT,
each domain error (`node.errors.RequestError`) as its one gRPC status (`STATUS_OF`), a bug
as INTERNAL with a short message (logged whole here), and each client's share of request
bytes in flight (`InFlight`: RESOURCE_EXHAUSTED past it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from node.errors import (
    Draining,
    IdleTimeout,
    InvalidRequest,
    OutOfRange,
    Overloaded,
    RequestError,
    SessionStateError,
    WrongModel,
)

__all__ = ["STATUS_OF", "InFlight", "abort", "internal", "parse", "status_of"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)


def parse(kind: type[M], raw: bytes) -> M:
    try:
        return kind.FromString(raw)
    except DecodeError:
        raise InvalidRequest(f"request is not a valid {kind.__name__} message") from None


# The one place where our domain errors become gRPC statuses.
STATUS_OF: dict[type[RequestError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    WrongModel: grpc.StatusCode.NOT_FOUND,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SessionStateError: grpc.StatusCode.FAILED_PRECONDITION,
    Draining: grpc.StatusCode.UNAVAILABLE,
    IdleTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class InFlight:
    """Request bytes each client has being served now; Overloaded past its share.

    A client with nothing in flight may always send one message (up to gRPC's limit), so a
    share below the message limit slows a client down but never locks it out."""

    def __init__(self, share: int) -> None:
        self.share = share
        self._bytes: dict[str, int] = {}  # only clients with something in flight

    def of(self, client: str) -> int:
        return self._bytes.get(client, 0)

    @contextlib.contextmanager
    def hold(self, client: str, size: int) -> Iterator[None]:
        held = self._bytes.get(client, 0)
        if held and held + size > self.share:
            raise Overloaded(
                f"this client has {held} request bytes in flight; {size} more exceed its share {self.share}"
            )
        self._bytes[client] = held + size
        try:
            yield
        finally:
            left = self._bytes[client] - size
            if left:
                self._bytes[client] = left
            else:
                del self._bytes[client]


def status_of(error: RequestError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, error: RequestError) -> NoReturn:
    await context.abort(status_of(error), str(error))
    raise AssertionError("unreachable: context.abort raises")


async def internal(context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    """A handler failed unexpectedly (a bug): log it whole here, tell the client only that."""
    log.exception("%s failed for %s", method, context.peer())
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (logged by the server)")
    raise AssertionError("unreachable: context.abort raises")
