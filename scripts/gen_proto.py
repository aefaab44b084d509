"""Regenerate protocol/*_pb2*.py(i) from protocol/*.proto, or check they are current.

python scripts/gen_proto.py           # rewrite the generated files
python scripts/gen_proto.py --check   # exit 1 when they differ from a fresh generation
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protocol").glob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in PROTOS:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.name.endswith(SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for rel in fresh:
            new = (Path(tmp) / rel).read_text()
            target = ROOT / rel
            if check:
                if not target.is_file() or target.read_text() != new:
                    stale.append(str(rel))
            else:
                target.write_text(new)
        if stale:
            print("generated code is stale, run: python scripts/gen_proto.py\n  " + "\n  ".join(stale))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
