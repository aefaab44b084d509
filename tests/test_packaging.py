"""`pip install moemesh` is the SDK and the CLI without torch; serving needs `moemesh[serve]`."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_core_distribution_needs_no_torch_and_serve_brings_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core, extras = _names(project["dependencies"]), project["optional-dependencies"]
    assert not core & {"torch", "safetensors", "transformers"}, core
    assert {"torch", "safetensors"} <= _names(extras["serve"])
    assert {"grpcio", "protobuf", "libp2p", "pycrdt", "numpy", "tokenizers"} <= core


def test_serving_without_torch_says_which_extra_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
        "from node.cli import main\n"
        f"sys.exit(main(['serve', '--model', {str(tmp_path)!r}, '--layers', '0:1']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "needs torch: pip install 'moemesh[serve]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bootstrap_daemon_runs_where_torch_is_not_installed(tmp_path: Path) -> None:
    """A bootstrap or relay daemon serves no layers: it starts without torch (and ~1.5 s sooner)."""
    from node.testing.launch import start_daemon

    no_torch = "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['node', *sys.argv[1:]]; "
    no_torch += "runpy.run_module('node', run_name='__main__')"
    wrap = lambda cmd: [cmd[0], "-c", no_torch, *cmd[3:]]  # noqa: E731  # [python, -m, node, ...] -> -c
    daemon = start_daemon(["--host", "127.0.0.1", "--identity", str(tmp_path / "boot.key")], wrap=wrap)
    try:
        assert daemon.peer_id and daemon.multiaddr
    finally:
        daemon.terminate()
        daemon.stop()
