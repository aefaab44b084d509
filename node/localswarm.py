"""`make swarm`: a whole swarm on this machine, in the foreground, until Ctrl-C.

    python -m node.localswarm [--workers 3] [--api-port 8000]

A bootstrap daemon (libp2p port 4001 by default), then `--workers` daemons that each place
themselves on the demo model (--layers auto, a share of its layers each), then the HTTP API
with the dashboard, which takes its tokenizer from the swarm. Each daemon has its own key in
$MOEMESH_CACHE/swarm/. It prints the commands to try (status, chat, curl, the dashboard),
then waits; Ctrl-C (or SIGTERM) stops every process it started, the last one first.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from node.demo_model import build_demo_model, default_cache
from node.testing.launch import DaemonProcess, event_of, start_daemon
from shards import Checkpoint

__all__ = ["main"]


def _say(message: str) -> None:
    print(f"swarm: {message}", flush=True)


def _start_api(bootstrap: str, port: int, timeout: float = 120.0) -> tuple[subprocess.Popen[str], str]:
    """`moemesh api` on `port`; returns the process and its address once it is ready."""
    cmd = [sys.executable, "-m", "node", "api", "--bootstrap", bootstrap, "--port", str(port), "--json-events"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[dict[str, Any]] = []
    log: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            if not found and (ready := event_of(line, "ready")) is not None:
                found.append(ready)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("moemesh api did not start:\n" + "".join(log[-20:]))
        time.sleep(0.2)
    return proc, str(found[0]["http_address"])


def _stop(processes: list[subprocess.Popen[str]]) -> None:
    """SIGTERM each (a daemon withdraws its record), the last started first; SIGKILL after 20 s."""
    for proc in reversed(processes):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(processes):
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _interrupted(number: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the swarm as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a swarm on this machine until Ctrl-C.")
    parser.add_argument("--workers", type=int, default=3, help="serving daemons (default 3)")
    parser.add_argument("--p2p-port", type=int, default=4001, help="the bootstrap daemon's libp2p port (4001)")
    parser.add_argument("--api-port", type=int, default=8000, help="the HTTP API's port (8000)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    started: list[subprocess.Popen[str]] = []
    try:
        model = build_demo_model()
        layers = Checkpoint(model).config.num_layers
        keys = default_cache() / "swarm"
        keys.mkdir(parents=True, exist_ok=True)
        share = -(-layers // args.workers)
        boot = start_daemon(["--p2p-port", str(args.p2p_port), "--relay", "--identity", str(keys / "bootstrap.key")])
        started.append(boot.process)
        _say(f"bootstrap daemon {boot.peer_id} at {boot.multiaddr}")
        workers: list[DaemonProcess] = []
        for i in range(args.workers):  # one after another: each sees the spans the others claimed
            worker = start_daemon(
                ["--model", str(model), "--layers", "auto", "--max-layers", str(share),
                 "--bootstrap", boot.multiaddr, "--identity", str(keys / f"worker-{i + 1}.key")],
                timeout=600,
            )  # fmt: skip
            started.append(worker.process)
            workers.append(worker)
            _say(f"worker {i + 1} ({worker.peer_id}) serving on {worker.grpc_address}")
        api, address = _start_api(boot.multiaddr, args.api_port)
        started.append(api)
        _say(f"ready: {args.workers} workers over {layers} layers of {model.name}. In another terminal:")
        print(
            f"  moemesh status --bootstrap {boot.multiaddr}\n"
            f"  moemesh chat --bootstrap {boot.multiaddr}\n"
            f"  curl http://{address}/v1/chat/completions -H 'content-type: application/json' \\\n"
            f'    -d \'{{"model": "{model.name}", "messages": [{{"role": "user", "content": "Hi!"}}]}}\'\n'
            f"  the dashboard: http://{address}/",
            flush=True,
        )
        _say("Ctrl-C stops them all")
        while all(p.poll() is None for p in started):
            time.sleep(1)
        _say("a process of the swarm exited; stopping the others")
        return 1
    except KeyboardInterrupt:
        _say("stopping")
        return 130
    finally:
        _stop(started)


if __name__ == "__main__":
    sys.exit(main())
