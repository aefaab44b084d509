"""Ctrl-C at any point of a real `moemesh serve` or `moemesh daemon`: exit code 130, no traceback,
no grpc or asyncio noise. SIGINT is sent while the process starts (imports), while it loads its
span, and once it serves."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("Traceback", "invalid state", "Event loop is closed", "Exception ignored", "KeyboardInterrupt")


def _python_is_up(pid: int) -> bool:
    """Whether the interpreter has installed its SIGINT handler (bit 2 of SigCgt): before that a
    SIGINT ends any Python program by the signal itself, which no code of ours can change."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # exited: let wait() tell
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & (1 << (signal.SIGINT - 1)))


def _interrupt(args: list[str], when: str | float, home: Path) -> tuple[int, str]:
    """Run `moemesh ARGS`, send SIGINT `when` seconds after its interpreter is up or once a line
    holds `when`; returns (exit code, everything it printed). Counting from the interpreter's
    start, not the fork, keeps a loaded machine's slow exec from moving the signal before it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home), "MOEMESH_CACHE": str(home / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if isinstance(when, float):
            deadline = time.monotonic() + 60
            while not _python_is_up(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(when)
        else:
            deadline = time.monotonic() + 120
            while (line := lines.get(timeout=max(0.1, deadline - time.monotonic()))) is not None:
                if when in line:
                    break
            else:
                raise AssertionError(f"it exited before saying {when!r}:\n{''.join(seen)}")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    return code, "".join(seen)


@pytest.mark.parametrize(
    "when", [0.5, 1.5, "loading layers", "TLS fingerprint"], ids=["import", "torch", "load", "serving"]
)
def test_ctrl_c_stops_serve_at_any_point(tiny_models: dict[str, Path], tmp_path: Path, when: str | float) -> None:
    code, output = _interrupt(["serve", "--model", str(tiny_models["mixtral"]), "--layers", "0:4"], when, tmp_path)
    assert code == 130, output
    assert not [n for n in NOISE if n in output], output


@pytest.mark.parametrize("when", [1.0, "loading layers", "advertised"], ids=["start", "load", "serving"])
def test_ctrl_c_stops_a_daemon_at_any_point(tiny_models: dict[str, Path], tmp_path: Path, when: str | float) -> None:
    args = ["daemon", "--model", str(tiny_models["mixtral"]), "--layers", "0:4", "--identity", str(tmp_path / "id")]
    code, output = _interrupt(args, when, tmp_path)
    assert code == 130, output
    assert not [n for n in NOISE if n in output], output
    if when == "advertised":
        assert "withdrawing the record" in output  # a Ctrl-C once serving is the graceful stop


def test_ctrl_c_stops_an_auto_placed_daemon_while_it_loads(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    args = ["daemon", "--model", str(tiny_models["mixtral"]), "--layers", "auto", "--identity", str(tmp_path / "id")]
    code, output = _interrupt(args, "placement:", tmp_path)
    assert code == 130, output
    assert not [n for n in NOISE if n in output], output


def test_sigterm_is_a_clean_stop_with_exit_code_0(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    args = ["serve", "--model", str(tiny_models["mixtral"]), "--layers", "0:4"]
    proc = subprocess.Popen([sys.executable, "-m", "node", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "TLS fingerprint" in line:
                break
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
