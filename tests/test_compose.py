"""docker-compose.yml runs the mesh (bootstrap/relay daemon, --layers auto workers, the API) in a
slim image; `docker compose config` validates it, and the containers' entry script hands the
bootstrap daemon's peer id to the others."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    compose = _compose()
    if compose is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed (apt-get install docker-compose)")
    result = subprocess.run([*compose, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)  # type: ignore[no-any-return]


def test_compose_runs_a_bootstrap_relay_auto_workers_and_the_api(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"bootstrap", "worker-1", "worker-2", "worker-3", "api"}
    boot = services["bootstrap"]
    assert boot["command"][:2] == ["bootstrap", "daemon"] and "--relay" in boot["command"]
    assert [p["published"] for p in boot["ports"]] == [4001] and "--p2p-port" in boot["command"]
    assert any(v.startswith("bootstrap-identity:/identity") for v in boot["volumes"])  # a fixed peer id
    for name in ("worker-1", "worker-2", "worker-3"):
        command = services[name]["command"]
        assert command[:2] == ["join", "daemon"] and command[command.index("--layers") + 1] == "auto"
        assert services[name]["depends_on"]["bootstrap"]["condition"] == "service_healthy"
    api = services["api"]
    assert api["command"][:2] == ["join", "api"] and [p["published"] for p in api["ports"]] == [8000]
    assert all("healthcheck" in s and s["healthcheck"]["test"] for s in services.values())


def test_the_image_is_slim_and_takes_torch_from_pypi() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    final = dockerfile.rsplit("\nFROM ", 1)[1]  # the image's own stage
    assert "pip install --no-cache-dir torch==2.13.0\n" in dockerfile and "--index-url" not in dockerfile
    assert "[dev" not in dockerfile and ",dev" not in dockerfile
    assert "gcc" not in final and "transformers" not in final and "pip install" not in final


def test_the_entry_script_hands_the_bootstrap_peer_id_to_the_others(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "moemesh"  # prints its arguments and a ready event, as `moemesh --json-events` does
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "args: $*"\necho \'{"event": "ready", "peer_id": "12D3KooWBoot"}\'\nexit 3\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "MESH_DIR": str(tmp_path / "mesh"),
           "MESH_READY": str(tmp_path / "ready"), "BOOTSTRAP_HOST": "localhost"}  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        script = [sys.executable, str(ROOT / "docker" / "mesh.py"), *args]
        return subprocess.run(script, env=env, capture_output=True, text=True, timeout=30)

    boot = run("bootstrap", "daemon", "--relay")
    assert boot.returncode == 3  # the command's own exit code
    assert "args: daemon --relay --json-events" in boot.stdout
    assert (tmp_path / "mesh" / "bootstrap-id").read_text() == "12D3KooWBoot\n" and (tmp_path / "ready").exists()
    join = run("join", "api", "--port", "8000")
    assert "args: api --port 8000 --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooWBoot --json-events" in join.stdout
    assert run("nonsense").returncode == 2
