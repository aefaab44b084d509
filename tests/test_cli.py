"""The `moemesh` command line: help, clear errors without tracebacks, generate against a live swarm."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from node.testing.launch import local_swarm

ROOT = Path(__file__).resolve().parent.parent


def moemesh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _fails_cleanly(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_help_explains_every_command() -> None:
    result = moemesh("--help")
    assert result.returncode == 0
    for command in ("serve", "generate", "info", "build-demo-model"):
        assert command in result.stdout
    serve = moemesh("serve", "--help").stdout
    assert "--layers" in serve and "END exclusive" in serve


def test_serve_errors_are_one_clear_line(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    _fails_cleanly(moemesh("serve", "--model", str(tmp_path), "--layers", "0:1"), "no config.json")
    _fails_cleanly(
        moemesh("serve", "--model", str(tiny_models["llama"]), "--layers", "0:9"), "run past the model's 4 layers"
    )
    _fails_cleanly(moemesh("serve", "--model", str(tiny_models["llama"]), "--layers", "zero"), "START:END")
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["llama"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    _fails_cleanly(moemesh("serve", "--model", str(odd), "--layers", "0:1"), "not supported: model_type 'gpt_neox'")
    _fails_cleanly(moemesh("serve", "--model", str(odd), "--layers", "0:1", "--port", "70000"), "outside 0..65535")


def test_generate_errors(tiny_models: dict[str, Path]) -> None:
    _fails_cleanly(moemesh("generate", "--peers", "localhost", "--ids", "1"), "not host:port")
    _fails_cleanly(moemesh("generate", "--peers", "127.0.0.1:9", "--ids", "1,2"), "no peer answered")
    _fails_cleanly(moemesh("generate", "--peers", "127.0.0.1:9", "hello"), "no peer answered")  # its tokenizer too
    nobody = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDEFv3Tokarnn5vGZcEGbpzr9v1hUSuL9ZGCkUxx7inev"
    refused = moemesh("generate", "--bootstrap", nobody, "hello")
    _fails_cleanly(refused, "no bootstrap peer could be reached")
    assert "hello" not in refused.stderr  # the prompt, not a 2nd address


def test_generate_and_info_against_a_live_swarm(tiny_models: dict[str, Path]) -> None:
    with local_swarm(tiny_models["mixtral"], [(0, 3), (3, 4)]) as servers:
        peers = ",".join(s.pinned for s in servers)
        result = moemesh("generate", "--peers", peers, "--ids", "5,6,7", "--max-new-tokens", "5")
        assert result.returncode == 0, result.stderr
        tokens = result.stdout.split()
        assert len(tokens) == 5 and all(0 <= int(t) < 256 for t in tokens)
        info = moemesh("info", *(s.pinned for s in servers))
        assert info.returncode == 0 and "layers 0:3 of 4" in info.stdout and "layers 3:4 of 4" in info.stdout
        # Only the first span: the route misses layers 3:4 and says so.
        head = servers[0]
        partial = moemesh("generate", "--peers", head.address, "--fingerprint", head.fingerprint, "--ids", "1")
        _fails_cleanly(partial, "no known peer serves layers 3:4 of 4")


def test_daemon_and_status_errors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = str(tiny_models["mixtral"])
    _fails_cleanly(moemesh("daemon", "--model", model, "--identity", str(tmp_path / "k")), "needs --layers")
    _fails_cleanly(moemesh("status", "--bootstrap", "127.0.0.1:4001"), "not a multiaddr")
    nobody = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDEFv3Tokarnn5vGZcEGbpzr9v1hUSuL9ZGCkUxx7inev"
    _fails_cleanly(
        moemesh("daemon", "--bootstrap", nobody, "--identity", str(tmp_path / "k")),
        "no bootstrap peer could be reached",
    )
    (tmp_path / "bad.key").write_bytes(b"not a key")
    _fails_cleanly(moemesh("daemon", "--identity", str(tmp_path / "bad.key")), "not a libp2p private key")


def test_placement_and_sync_flag_errors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = str(tiny_models["mixtral"])
    key = ["--identity", str(tmp_path / "k")]
    _fails_cleanly(moemesh("serve", "--model", model, "--layers", "auto"), "use `moemesh daemon`")
    _fails_cleanly(moemesh("daemon", "--model", model, "--layers", "0:2", "--max-layers", "2", *key), "--layers auto")
    _fails_cleanly(moemesh("daemon", "--layers", "auto", "--lease", "1", "--model", model, *key), "3 sync intervals")
    _fails_cleanly(moemesh("daemon", "--sync-interval", "0", *key), "--sync-interval")


def test_version_and_logging_flags_on_every_subcommand() -> None:

    root = Path(__file__).resolve().parent.parent
    version = subprocess.run([sys.executable, "-m", "node", "--version"], cwd=root, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("moemesh ") and "protocol" in version.stdout
    from node.cli.parser import build_parser

    parser = build_parser()
    for command in (["info", "x:1"], ["status", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"], ["build-demo-model"]):
        args = parser.parse_args([command[0], "-vv", "-q", *command[1:]])
        assert (args.verbose, args.quiet) == (2, 1)


def test_quantized_peers_spin_their_idle_workers_less() -> None:
    """libgomp's spin before sleep: long for torch's ops (gaps between ops), short for a quantized
    span's one-call decode; an explicit GOMP_SPINCOUNT stays the user's."""
    from node.cli.commands import GOMP_SPINCOUNT, GOMP_SPINCOUNT_QUANTIZED, _spin_count
    from node.cli.parser import build_parser

    parser = build_parser()
    for command in ("serve", "daemon"):
        common = [command, "--model", "m"] + (["--layers", "0:1"] if command == "serve" else [])
        plain, quantized = parser.parse_args(common), parser.parse_args([*common, "--quantize", "int4"])
        assert (_spin_count(plain), _spin_count(quantized)) == (GOMP_SPINCOUNT, GOMP_SPINCOUNT_QUANTIZED)
    assert int(GOMP_SPINCOUNT_QUANTIZED) < int(GOMP_SPINCOUNT)


def test_a_port_in_use_is_an_error_not_a_shared_listener(tiny_models: dict[str, Path]) -> None:
    import socket

    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another gRPC server holds it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "node", "serve", "--model", str(tiny_models["llama"]), "--layers", "0:4"]
            + ["--port", str(port)],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert "in use" in result.stderr and "Traceback" not in result.stderr


def test_a_libp2p_port_in_use_is_an_error_too(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "node", "daemon", "--p2p-port", str(port), "--identity", str(tmp_path / "key")],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot listen for libp2p on 127.0.0.1:{port}: the port is in use" in result.stderr
    assert "Traceback" not in result.stderr
