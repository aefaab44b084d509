"""The entry point of the mesh's containers (docker-compose.yml): runs one `moemesh` command.

    python docker/mesh.py bootstrap daemon --relay ...   the swarm's first daemon: once ready, it
                                                         writes its peer id to $MESH_DIR/bootstrap-id
    python docker/mesh.py join daemon --layers auto ...  waits for that file, then runs the command
    python docker/mesh.py join api --port 8000 ...       with --bootstrap /ip4/<bootstrap>/tcp/4001/p2p/<id>

The command runs with --json-events; its lines pass through, and its ready event also makes
/tmp/moemesh-ready, which the healthchecks test. SIGTERM and SIGINT go to the command (a
daemon then withdraws its record), and its exit code is this one's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHARED = Path(os.environ.get("MESH_DIR", "/mesh"))
READY = Path(os.environ.get("MESH_READY", "/tmp/moemesh-ready"))


def _bootstrap_address() -> str:
    """The bootstrap daemon's multiaddr, once it has said its peer id (it keeps it: a fixed identity)."""
    id_file = SHARED / "bootstrap-id"
    host = os.environ.get("BOOTSTRAP_HOST", "bootstrap")
    port = os.environ.get("BOOTSTRAP_PORT", "4001")
    while True:
        try:
            peer_id = id_file.read_text().strip()
            ip = socket.gethostbyname(host)
        except OSError:
            peer_id, ip = "", ""
        if peer_id and ip:
            return f"/ip4/{ip}/tcp/{port}/p2p/{peer_id}"
        print(f"mesh: waiting for the bootstrap daemon ({host}, {id_file})", flush=True)
        time.sleep(2)


def _on_event(role: str, event: dict[str, Any]) -> None:
    if event.get("event") != "ready":
        return
    if role == "bootstrap":
        SHARED.mkdir(parents=True, exist_ok=True)
        staging = SHARED / ".bootstrap-id"
        staging.write_text(str(event["peer_id"]) + "\n")
        staging.replace(SHARED / "bootstrap-id")
    READY.touch()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("bootstrap", "join"):
        print("usage: mesh.py bootstrap|join MOEMESH-COMMAND [ARGS...]", file=sys.stderr)
        return 2
    role, command = argv[0], argv[1:]
    READY.unlink(missing_ok=True)
    if role == "join":
        command += ["--bootstrap", _bootstrap_address()]
    child = subprocess.Popen(["moemesh", *command, "--json-events"], stdout=subprocess.PIPE, text=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: child.send_signal(number))
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                _on_event(role, event)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
