"""The weights cache of one model: fetched tensors, group by group, in a folder `load_span` loads.

    <cache>/weights/<model id>/
    ├── .moemesh-manifest.json       the model's manifest, pinned (its hash is the model id)
    ├── config.json, tokenizer...    from the manifest, each verified by its sha256
    ├── g-<group>.safetensors        one group's tensors (a layer, "embed", "head"), all verified
    ├── g-<group>.safetensors.partial + g-<group>.journal   a group being fetched
    └── model.safetensors.index.json the complete groups' tensors

A group file's header is known from the manifest before any byte arrives, so chunks are
written where they belong in the preallocated `.partial` file; the journal (append-only
lines) says which chunks are written and which tensors verified, so a fetch that crashed
or was interrupted resumes where it stopped. A tensor is verified (sha256) once all its
chunks are in; a mismatch forgets its chunks. A group becomes `g-<group>.safetensors` only
when every tensor of it verified: nothing unverified is ever loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node.errors import DiskQuota
from node.mesh.weights import Holding
from shards.manifest import FileEntry, Manifest, TensorEntry, group_of, local_tensors, pin_manifest

__all__ = ["GroupFile", "ModelCache", "folder_holding"]

log = logging.getLogger(__name__)
ALIGN = 8


def _layout(tensors: list[TensorEntry]) -> tuple[bytes, dict[str, int]]:
    """A safetensors header for `tensors` packed in order, and each one's absolute data offset."""
    header: dict[str, object] = {}
    offsets: dict[str, int] = {}
    position = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [position, position + t.length]}
        offsets[t.name] = position
        position += t.length
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % ALIGN)
    prefix = len(body).to_bytes(8, "little") + body
    return prefix, {name: len(prefix) + at for name, at in offsets.items()}


@dataclass
class GroupFile:
    """One group being fetched: its `.partial` file, its journal, what is written and verified."""

    group: str
    tensors: list[TensorEntry]
    path: Path  # the final name
    chunk_bytes: int
    offsets: dict[str, int]
    done: dict[str, set[int]]  # chunks written, per tensor
    verified: set[str]

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    @property
    def journal(self) -> Path:
        return self.path.with_name(f"g-{self.group}.journal")

    @property
    def size(self) -> int:
        return max((self.offsets[t.name] + t.length for t in self.tensors), default=0)

    def chunks(self, tensor: TensorEntry) -> list[tuple[int, int]]:
        """(index, length) of each chunk of `tensor` not written yet."""
        count = -(-tensor.length // self.chunk_bytes)
        have = self.done.get(tensor.name, set())
        out = []
        for i in range(count):
            if i not in have:
                out.append((i, min(self.chunk_bytes, tensor.length - i * self.chunk_bytes)))
        return out

    def write(self, tensor: TensorEntry, index: int, data: bytes) -> None:
        fd = os.open(self.partial, os.O_WRONLY)
        try:
            os.pwrite(fd, data, self.offsets[tensor.name] + index * self.chunk_bytes)
        finally:
            os.close(fd)
        self.done.setdefault(tensor.name, set()).add(index)
        self._note(f"d {tensor.name} {index}")

    def verify(self, tensor: TensorEntry) -> bool:
        """Hash the tensor's bytes; True (and journalled) when they match the manifest, else forget them."""
        digest = hashlib.sha256()
        with self.partial.open("rb") as f:
            f.seek(self.offsets[tensor.name])
            left = tensor.length
            while left:
                block = f.read(min(left, 8 << 20))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
        if digest.hexdigest() == tensor.sha256:
            self.verified.add(tensor.name)
            self._note(f"v {tensor.name}")
            return True
        self.done.pop(tensor.name, None)
        self._note(f"x {tensor.name}")
        return False

    def _note(self, line: str) -> None:
        with self.journal.open("a") as f:
            f.write(line + "\n")

    def complete(self) -> bool:
        return all(t.name in self.verified for t in self.tensors)

    def finish(self) -> None:
        os.replace(self.partial, self.path)
        self.journal.unlink(missing_ok=True)


def _read_journal(path: Path, chunk_bytes: int) -> tuple[dict[str, set[int]], set[str]]:
    done: dict[str, set[int]] = {}
    verified: set[str] = set()
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return done, verified
    if not lines or lines[0] != f"chunk {chunk_bytes}":
        return {}, set()  # another chunk size, or no header: start the group over
    for line in lines[1:]:
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == "d" and parts[2].isdigit():
            done.setdefault(parts[1], set()).add(int(parts[2]))
        elif len(parts) == 2 and parts[0] == "v":
            verified.add(parts[1])
        elif len(parts) == 2 and parts[0] == "x":
            done.pop(parts[1], None)
            verified.discard(parts[1])
        # anything else: a line cut by a crash, ignored
    return done, verified


class ModelCache:
    """The cache folder of one model (`root`): groups fetched, being fetched, and the quota."""

    def __init__(self, cache_dir: Path, manifest: Manifest, max_disk_bytes: int = 0, chunk_bytes: int = 1 << 20):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.root = cache_dir / "weights" / manifest.model_id
        self.max_disk_bytes = max_disk_bytes
        self.chunk_bytes = chunk_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        pin_manifest(self.root, manifest)
        (self.root / "config.json").write_text(json.dumps(dict(manifest.config), indent=2))

    def group_path(self, group: str) -> Path:
        return self.root / f"g-{group}.safetensors"

    def has_group(self, group: str) -> bool:
        return self.group_path(group).is_file()

    def complete_groups(self) -> list[str]:
        return sorted(p.name[2 : -len(".safetensors")] for p in self.root.glob("g-*.safetensors"))

    def open_group(self, group: str) -> GroupFile:
        """The group's partial file (created, or reopened with its journal) ready for chunks."""
        tensors = sorted(self.manifest.tensors_of([group]), key=lambda t: t.name)
        prefix, offsets = _layout(tensors)
        gf = GroupFile(group, tensors, self.group_path(group), self.chunk_bytes, offsets, {}, set())
        resumed = gf.partial.is_file() and gf.partial.stat().st_size == gf.size
        if resumed and gf.journal.is_file() and gf.journal.read_text().startswith(f"chunk {self.chunk_bytes}\n"):
            gf.done, gf.verified = _read_journal(gf.journal, self.chunk_bytes)
        else:
            with gf.partial.open("wb") as f:
                f.write(prefix)
                f.truncate(gf.size)
            gf.journal.write_text(f"chunk {self.chunk_bytes}\n")
        return gf

    def bytes_of(self, groups: Iterable[str]) -> int:
        return sum(t.length for t in self.manifest.tensors_of(groups))

    def check_quota(self, groups: Iterable[str]) -> None:
        """Make room for `groups` (evicting complete groups not among them), or say why it cannot."""
        if not self.max_disk_bytes:
            return
        wanted = set(groups)
        need = sum(len(_layout(self.manifest.tensors_of([g]))[0]) + self.bytes_of([g]) for g in wanted)
        held = _disk_usage(self.cache_dir / "weights")
        present = sum(self._on_disk(g) for g in wanted)
        for group in self.complete_groups():
            if held - present + need <= self.max_disk_bytes:
                break
            if group not in wanted:
                size = self._on_disk(group)
                self.group_path(group).unlink(missing_ok=True)
                held -= size
                log.info("evicted group %s of %s (%d B) to make room", group, self.manifest.model_id, size)
        if held - present + need > self.max_disk_bytes:
            raise DiskQuota(
                f"the span needs {need / 1e9:.3f} GB of weights, the cache already holds {held / 1e9:.3f} GB"
                f" it cannot evict, and --max-disk is {self.max_disk_bytes / 1e9:.3f} GB"
            )

    def _on_disk(self, group: str) -> int:
        total = 0
        for path in (self.group_path(group), self.group_path(group).with_name(f"g-{group}.safetensors.partial")):
            if path.is_file():
                total += path.stat().st_size
        return total

    def write_index(self) -> None:
        """The index of every complete group, so `Checkpoint(root)` sees exactly what is verified."""
        weight_map = {name: file.name for name, (file, _, _) in local_tensors(self.root).items()}
        tmp = self.root / f".index.{os.getpid()}.{threading.get_ident()}.tmp"  # groups may finish at once
        tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        os.replace(tmp, self.root / "model.safetensors.index.json")

    def missing_files(self) -> list[FileEntry]:
        return [f for f in self.manifest.files if not _matches(self.root / f.name, f)]

    def store_file(self, entry: FileEntry, data: bytes) -> bool:
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            return False
        tmp = self.root / f".{entry.name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / entry.name)
        return True

    def holding(self) -> Holding:
        return folder_holding(self.root, self.manifest, verified=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _matches(path: Path, entry: FileEntry) -> bool:
    try:
        return path.stat().st_size == entry.size and hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    except OSError:
        return False


def _disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def folder_holding(folder: Path, manifest: Manifest, verified: bool = False) -> Holding:
    """What a folder can serve of `manifest`: its tensors whose layout matches, and the groups held whole.

    A full local checkpoint is the one the manifest was computed from; a cache folder holds
    only verified groups. Tensors whose length differs from the manifest's are not served."""
    tensors = {
        name: where
        for name, where in local_tensors(folder).items()
        if (entry := manifest.tensor(name)) is not None and entry.length == where[2]
    }
    by_group: dict[str, list[str]] = {}
    for t in manifest.tensors:
        by_group.setdefault(group_of(t.name), []).append(t.name)
    groups = tuple(sorted(g for g, names in by_group.items() if g != "other" and all(n in tensors for n in names)))
    files = {f.name: folder / f.name for f in manifest.files if (folder / f.name).is_file()}
    return Holding(manifest, tensors, files, groups, manifest.canonical())
