"""A model's manifest: what its weights are, tensor by tensor, and the model id that hashes it.

    Manifest
    ├── config          config.json, as parsed
    ├── files           tokenizer and generation files: name, size, sha256 (fetched whole)
    └── tensors         per tensor: name, dtype, shape, shard file, byte offset and length
                        in that file, sha256 of those bytes

The model id is the sha256 of the manifest's canonical JSON (sorted keys, no spaces), so
every peer of a model computes the same id whether it holds the whole checkpoint or only
the tensors of its span. Hashing every tensor of a large checkpoint takes a while, so the
manifest of a local folder is cached in the folder (`.moemesh-manifest.json`), keyed by the
size and mtime of every file it covers (or, when the folder is read-only, under the user's
cache). A folder assembled from fetched tensors holds the manifest it was fetched for,
marked pinned: its tensors were verified against it one by one.

Pure: no torch, no node imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from protocol.content import content_id
from shards.errors import CheckpointError, ManifestError

__all__ = [
    "CACHE_NAME",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "TensorEntry",
    "build_manifest",
    "group_of",
    "load_manifest",
    "local_tensors",
    "pin_manifest",
    "safetensors_header",
]

CACHE_NAME = ".moemesh-manifest.json"
FORMAT = 1
AUX_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template*",
)
MAX_AUX_BYTES = 256 << 20  # one tokenizer/generation file
MAX_HEADER_BYTES = 100 << 20  # a safetensors header (the format's own bound)
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1}  # fmt: skip
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_HEX64 = re.compile(r"[0-9a-f]{64}")
Progress = Callable[[int], None]  # bytes hashed since the last call


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # shard file name in the original checkpoint
    offset: int  # absolute byte offset of the data in that file
    length: int
    sha256: str


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    config: Mapping[str, Any]
    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": self.config,
            "files": [[f.name, f.size, f.sha256] for f in self.files],
            "tensors": [[t.name, t.dtype, list(t.shape), t.file, t.offset, t.length, t.sha256] for t in self.tensors],
        }

    def canonical(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def model_id(self) -> str:
        return content_id(self.canonical())

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def total_bytes(self) -> int:
        return sum(t.length for t in self.tensors)

    def tensor(self, name: str) -> TensorEntry | None:
        return self._by_name().get(name)

    def _by_name(self) -> dict[str, TensorEntry]:
        cached: dict[str, TensorEntry] | None = self.__dict__.get("_names")
        if cached is None:
            cached = {t.name: t for t in self.tensors}
            object.__setattr__(self, "_names", cached)
        return cached

    def groups_for_span(self, start: int, end: int) -> list[str]:
        """The tensor groups `Checkpoint.load_span(start, end)` reads: its layers, the embedding
        on the first span, the final norm and head on the last one (the embedding too when tied)."""
        groups = [str(b) for b in range(start, end)]
        if start == 0:
            groups.append("embed")
        if end == self.num_layers:
            groups.append("head")
            tied = bool(self.config.get("tie_word_embeddings")) or self.tensor("lm_head.weight") is None
            if tied and "embed" not in groups:
                groups.append("embed")
        return groups

    def tensors_of(self, groups: Iterable[str]) -> list[TensorEntry]:
        wanted = set(groups)
        return [t for t in self.tensors if group_of(t.name) in wanted]

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a manifest a peer sent; anything malformed is a ManifestError, never a crash."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("config"), dict):
                raise ValueError("not a moemesh manifest of format 1")
            files = tuple(_file_entry(f) for f in raw["files"])
            tensors = tuple(_tensor_entry(t) for t in raw["tensors"])
            int(raw["config"]["num_hidden_layers"])
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from None
        names = [t.name for t in tensors] + [f.name for f in files]
        if len(set(names)) != len(names):
            raise ManifestError("malformed manifest: a name appears twice")
        return cls(raw["config"], files, tensors)


def _file_entry(f: Any) -> FileEntry:
    name, size, digest = f
    if not isinstance(name, str) or not _safe_name(name) or not isinstance(size, int) or not 0 <= size <= MAX_AUX_BYTES:
        raise ValueError(f"bad file entry {f!r:.80}")
    return FileEntry(name, size, _digest(digest))


def _tensor_entry(t: Any) -> TensorEntry:
    name, dtype, shape, file, offset, length, digest = t
    ok = isinstance(name, str) and _plain(name) and isinstance(dtype, str) and dtype in DTYPE_BYTES
    ok = ok and isinstance(file, str)
    ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) and _safe_name(file)
    ok = ok and isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0
    if not ok:
        raise ValueError(f"bad tensor entry {t!r:.80}")
    count = 1
    for d in shape:
        count *= d
    if count * DTYPE_BYTES[dtype] != length:
        raise ValueError(f"tensor {name!r}: {length} bytes do not hold {dtype} {shape}")
    return TensorEntry(name, dtype, tuple(shape), file, offset, length, _digest(digest))


def _digest(value: Any) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError(f"bad sha256 {value!r:.80}")
    return value


def _plain(name: str) -> bool:
    """A tensor name as checkpoints have them: printable, no spaces (the fetch journal is split on them)."""
    return 0 < len(name) < 1024 and name.isprintable() and " " not in name


def _safe_name(name: str) -> bool:
    """A plain file name: no directories, nothing hidden (a peer names files we create)."""
    return bool(name) and len(name) < 256 and "/" not in name and "\\" not in name and not name.startswith(".")


def group_of(name: str) -> str:
    """The fetch and provider unit of a tensor: its layer's number, "embed", "head" or "other"."""
    layer = _LAYER.match(name)
    if layer:
        return layer.group(1)
    if name.startswith("model.embed_tokens."):
        return "embed"
    if name.startswith(("model.norm.", "lm_head.")):
        return "head"
    return "other"


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(where the data starts, the header without its metadata)."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {size} bytes")
        try:
            header: dict[str, Any] = json.loads(f.read(size))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return 8 + size, header


def local_tensors(folder: Path) -> dict[str, tuple[Path, int, int]]:
    """Every tensor the folder's safetensors files hold: name -> (file, absolute offset, length)."""
    found: dict[str, tuple[Path, int, int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        base, header = safetensors_header(file)
        for name, meta in header.items():
            begin, end = meta["data_offsets"]
            found[name] = (file, base + int(begin), int(end) - int(begin))
    return found


def _sha256_file(path: Path, offset: int, length: int, progress: Progress | None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(left, 8 << 20))
            if not block:
                raise CheckpointError(f"{path}: ends {left} bytes before a tensor's end")
            digest.update(block)
            left -= len(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def _aux_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in AUX_PATTERNS))


def _missing_shards(folder: Path) -> list[str]:
    try:
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return sorted({f for f in weight_map.values() if isinstance(f, str) and not (folder / f).is_file()})


def _still_current(cached: list[Any], stamp: list[list[Any]]) -> bool:
    """Every covered file as it was when hashed; shard files may since have been removed (a peer
    that keeps only its span's shards): the manifest is still the model's, what is left serves."""
    now = {entry[0]: entry for entry in stamp}
    for entry in cached:
        if not isinstance(entry, list) or not entry or not isinstance(entry[0], str):
            return False
        current = now.pop(entry[0], None)
        if current != entry and not (current is None and entry[0].endswith(".safetensors")):
            return False
    return not now  # nothing new appeared


def _stamp(folder: Path) -> list[list[Any]]:
    """What the cached manifest was computed from: every covered file's name, size and mtime."""
    paths = [folder / "config.json", *sorted(folder.glob("*.safetensors")), *_aux_files(folder)]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def build_manifest(
    folder: Path, progress: Progress | None = None, total: Callable[[int], None] | None = None
) -> Manifest:
    """Hash a local checkpoint folder, tensor by tensor. `total(n)` is told the bytes to hash first."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: no readable config.json ({e})") from None
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder}: no .safetensors files")
    missing = _missing_shards(folder)
    if missing:
        raise CheckpointError(
            f"{folder}: the weight index names shard files that are not here ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), so the model's manifest cannot be hashed; hash it before"
            " removing shards (moemesh manifest), or start the daemon with the model id to fetch a span"
        )
    layout = [(file, *safetensors_header(file)) for file in shards]
    aux = [p for p in _aux_files(folder) if p.stat().st_size <= MAX_AUX_BYTES]
    if total:
        total(sum(file.stat().st_size for file in shards) + sum(p.stat().st_size for p in aux))
    tensors = []
    for file, base, header in layout:
        for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
            meta = header[name]
            begin, end = (int(x) for x in meta["data_offsets"])
            digest = _sha256_file(file, base + begin, end - begin, progress)
            tensors.append(
                TensorEntry(name, meta["dtype"], tuple(meta["shape"]), file.name, base + begin, end - begin, digest)
            )
    files = tuple(FileEntry(p.name, p.stat().st_size, _sha256_file(p, 0, p.stat().st_size, progress)) for p in aux)
    return Manifest(config, files, tuple(sorted(tensors, key=lambda t: t.name)))


def _user_cache(folder: Path) -> Path:
    root = Path(os.environ.get("MOEMESH_CACHE") or Path.home() / ".cache" / "moemesh")
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    return root / "manifests" / f"{key}.json"


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cached if isinstance(cached, dict) else None


def load_manifest(
    folder: Path, progress: Progress | None = None, total: Callable[[int], None] | None = None
) -> Manifest:
    """The folder's manifest: pinned (an assembled folder), cached and current, or computed and cached."""
    folder = Path(folder)
    stamp = _stamp(folder)
    for path in (folder / CACHE_NAME, _user_cache(folder)):
        cached = _read_cache(path)
        if cached is None:
            continue
        known = cached.get("stamp")
        if cached.get("pinned") or (isinstance(known, list) and _still_current(known, stamp)):
            try:
                return Manifest.from_bytes(json.dumps(cached["manifest"]).encode())
            except (KeyError, ManifestError):
                continue
    manifest = build_manifest(folder, progress, total)
    body = json.dumps({"stamp": stamp, "manifest": manifest.to_json()})
    for path in (folder / CACHE_NAME, _user_cache(folder)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(body)
            os.replace(tmp, path)
            break
        except OSError:
            continue
    return manifest


def pin_manifest(folder: Path, manifest: Manifest) -> None:
    """Record, in an assembled folder, the manifest of the model its verified tensors belong to."""
    tmp = folder / f"{CACHE_NAME}.tmp"
    tmp.write_text(json.dumps({"pinned": True, "manifest": manifest.to_json()}))
    os.replace(tmp, folder / CACHE_NAME)
