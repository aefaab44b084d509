"""Start and stop local `moemesh serve` and `moemesh daemon` processes (the demo, the tests, the benchmarks).

Readiness is read from the machine-readable events the commands print with `--json-events`
(one JSON object per line), never from the human log lines."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DaemonProcess",
    "ServerProcess",
    "event_of",
    "local_swarm",
    "named_servers",
    "start_daemon",
    "start_server_process",
]


def event_of(line: str, kind: str) -> dict[str, Any] | None:
    """The fields of a `--json-events` line of `kind` ("ready", "moved", ...), else None."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and event.get("event") == kind else None


def _stop(process: subprocess.Popen[str], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    address: str
    layers: tuple[int, int]
    log: list[str] = field(default_factory=list)
    fingerprint: str = ""  # its TLS certificate's; "" when it serves plaintext (--insecure-lan)

    @property
    def pinned(self) -> str:
        """What a client dials it by: `host:port#fingerprint` (plain `host:port` without TLS)."""
        return f"{self.address}#{self.fingerprint}" if self.fingerprint else self.address

    def stop(self, timeout: float = 10.0) -> None:
        _stop(self.process, timeout)


def _pump(stream: object, lines: queue.SimpleQueue[str | None], log: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        log.append(line.rstrip("\n"))
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _popen(
    cmd: Sequence[str], env: Mapping[str, str] | None
) -> tuple[subprocess.Popen[str], queue.SimpleQueue[str | None], list[str]]:
    """Start `cmd` in the repository root; its output lines go to a queue and a log."""
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, **env} if env else None,
    )
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    log: list[str] = []
    threading.Thread(target=_pump, args=(proc.stdout, lines, log), daemon=True).start()
    return proc, lines, log


def _spawn(
    model: Path,
    layers: tuple[int, int],
    extra_args: Sequence[str],
    env: Mapping[str, str] | None = None,
    runner: Sequence[str] = ("-m", "node"),
) -> tuple[ServerProcess, queue.SimpleQueue[str | None]]:
    cmd = [
        sys.executable,
        *runner,
        "serve",
        "--model",
        str(model),
        "--layers",
        f"{layers[0]}:{layers[1]}",
        "--port",
        "0",
        "--json-events",
        *extra_args,
    ]
    proc, lines, log = _popen(cmd, env)
    return ServerProcess(proc, "", layers, log), lines


def _lines(lines: queue.SimpleQueue[str | None], log: list[str], deadline: float, what: str) -> Iterator[str]:
    """The process's output lines until `deadline`; TimeoutError then, RuntimeError if it exits."""
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"{what} did not get ready in time") from None
        if line is None:
            raise RuntimeError(f"{what} exited:\n" + "\n".join(log[-20:]))
        yield line


def _wait_ready(server: ServerProcess, lines: queue.SimpleQueue[str | None], deadline: float) -> None:
    for line in _lines(lines, server.log, deadline, f"server for layers {server.layers}"):
        if (ready := event_of(line, "ready")) is not None:
            server.address = ready["grpc_address"]
            server.fingerprint = ready.get("tls_fingerprint") or ""
            return


def start_server_process(
    model: Path,
    layers: tuple[int, int],
    *,
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
    runner: Sequence[str] = ("-m", "node"),
) -> ServerProcess:
    """Start `moemesh serve` on a free loopback port and wait until it says it is serving.

    `runner`: what runs it after the Python executable (e.g. `-m node.testing.liar 1.0`)."""
    server, lines = _spawn(model, layers, extra_args, runner=runner)
    try:
        _wait_ready(server, lines, time.monotonic() + timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def local_swarm(
    model: Path,
    spans: Sequence[tuple[int, int]],
    *,
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[list[ServerProcess]]:
    """Serve each span in its own process (started together); all are stopped on exit, also on failure."""
    started: list[tuple[ServerProcess, queue.SimpleQueue[str | None]]] = []
    try:
        for span in spans:
            started.append(_spawn(model, span, extra_args, env))
        deadline = time.monotonic() + timeout
        for server, lines in started:
            _wait_ready(server, lines, deadline)
        yield [server for server, _ in started]
    finally:
        for server, _ in started:
            server.stop()


@contextlib.contextmanager
def named_servers(
    model: Path, specs: Mapping[str, tuple[tuple[int, int], Sequence[str]]], *, timeout: float = 300.0
) -> Iterator[dict[str, ServerProcess]]:
    """Serve each named span with its runner (`("-m", "node")`, or a test's lying serve:
    `node.testing.liar`), all started together; all are stopped on exit, also on failure."""
    started: dict[str, tuple[ServerProcess, queue.SimpleQueue[str | None]]] = {}
    try:
        for name, (span, runner) in specs.items():
            started[name] = _spawn(model, span, (), runner=runner)
        deadline = time.monotonic() + timeout
        for server, lines in started.values():
            _wait_ready(server, lines, deadline)
        yield {name: server for name, (server, _) in started.items()}
    finally:
        for server, _ in started.values():
            server.stop()


@dataclass
class DaemonProcess:
    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)
    peer_id: str = ""
    multiaddr: str = ""
    grpc_address: str = ""
    started: float = 0.0
    advertised_after_s: float = 0.0
    fingerprint: str = ""  # its gRPC TLS certificate's (in its signed record); "" without TLS

    @property
    def pinned(self) -> str:
        """Its gRPC address as a client dials it: `host:port#fingerprint`."""
        return f"{self.grpc_address}#{self.fingerprint}" if self.fingerprint else self.grpc_address

    def terminate(self) -> None:
        """SIGTERM: a clean stop (the daemon withdraws its record)."""
        if self.process.poll() is None:
            self.process.terminate()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def stop(self, timeout: float = 15.0) -> None:
        _stop(self.process, timeout)


def start_daemon(
    args: Sequence[str],
    *,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    verbose: bool = True,
    wrap: Callable[[list[str]], list[str]] | None = None,
    on_line: Callable[[str, DaemonProcess], None] | None = None,
) -> DaemonProcess:
    """Start `moemesh daemon ARGS` and wait until it has advertised its record.

    `wrap` turns the command line into the one to run (e.g. inside a network namespace);
    `on_line(line, daemon)` sees each output line before the daemon is ready (e.g. to act on an event).
    """
    cmd = [sys.executable, "-m", "node", *(["-v"] if verbose else []), "daemon", "--json-events", *args]
    if wrap is not None:
        cmd = wrap(cmd)
    started = time.monotonic()
    proc, lines, log = _popen(cmd, env)
    daemon = DaemonProcess(proc, log, started=started)
    deadline = started + timeout
    try:
        for line in _lines(lines, log, deadline, f"daemon {' '.join(args)}"):
            if on_line is not None:
                on_line(line, daemon)
            if (ready := event_of(line, "ready")) is not None:
                daemon.peer_id, daemon.multiaddr = ready["peer_id"], ready["multiaddrs"][0]
                daemon.grpc_address = ready["grpc_address"] or ""
                daemon.fingerprint = ready.get("tls_fingerprint") or ""
                daemon.advertised_after_s = time.monotonic() - started
                return daemon
        raise AssertionError("unreachable: _lines ends only by raising")
    except BaseException:
        daemon.stop()
        raise
