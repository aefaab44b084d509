"""The layering of DESIGN.md, the public API of each package, and import-time promises."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"kernels", "shards", "protocol", "crdt", "node"}
ALLOWED = {
    "kernels": {"kernels"},
    "protocol": {"protocol"},
    "shards": {"shards", "kernels"},
    "crdt": {"crdt", "protocol"},
    "node": OURS,
}


# Leaf modules of ours every package may import (stdlib only): the error root, and the content-id
# rule that shards hashes a manifest with and that a torch-free client checks it by.
SHARED = {"protocol.errors", "protocol.content"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name not in SHARED}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module not in SHARED:
            found.add(node.module)
    return {name.split(".")[0] for name in found} & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_the_layering_allows(package: str) -> None:
    bad = {
        str(path.relative_to(ROOT)): sorted(_imports(path) - ALLOWED[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_kernels_is_ours() -> None:
    import kernels

    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    assert kernels.MOEMESH_KERNELS


def test_sdk_and_cli_do_not_import_torch() -> None:
    code = "import sys, node, node.client, node.cli; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("package", sorted(OURS))
def test_all_lists_exactly_the_public_names(package: str) -> None:
    module = importlib.import_module(package)
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not (getattr(value, "__name__", "").startswith(package + ".") and type(value).__name__ == "module")
        and name not in {"annotations", "MOEMESH_KERNELS"}
    }
    lazy = {name for name in module.__all__ if name not in vars(module) and hasattr(module, name)}  # __getattr__
    assert set(module.__all__) == public | lazy


def test_every_error_is_defined_in_an_errors_module_under_one_root() -> None:
    from protocol.errors import MoemeshError

    misplaced = []
    for package in sorted(OURS):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "errors.py" or "_pb2" in path.name:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases
                ):
                    misplaced.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert not misplaced, f"error types outside errors.py: {misplaced}"
    for package in sorted(OURS):
        errors = importlib.import_module(f"{package}.errors")
        for name in errors.__all__:
            value = getattr(errors, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                assert issubclass(value, MoemeshError), f"{package}.errors.{name} is not a MoemeshError"
