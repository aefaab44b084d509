"""A Hugging Face Hub repository as a source of weights (`moemesh daemon --model ORG/NAME`).

The mesh comes first. The Hub's config.json and weight index (a few kB) are read, and the
swarm's peers are asked for the manifest of each model they serve: one whose config and
tensor layout are the Hub's is that model, so the daemon serves it under the swarm's model id
and fetches its span from peers; groups no peer holds are filled from the Hub, downloading only
the shard files that hold them, every tensor verified against the manifest's sha256. When no
peer has the model yet, the first volunteer downloads every shard (the manifest hashes them
all) and seeds the swarm. Everything here blocks (run it in an executor).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from node.errors import BadWeights, WeightsError
from node.weights.cache import ModelCache
from shards.manifest import AUX_PATTERNS, Manifest

__all__ = ["HUB_ID", "HubModel", "fill_from_folder"]

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SINGLE = "model.safetensors"


class HubModel:
    """One Hub repository: its config and weight map, then the files a span needs."""

    def __init__(self, repo_id: str, cache_dir: Path | None = None) -> None:
        self.repo_id, self.cache_dir = repo_id, cache_dir
        self.config: dict[str, Any] = json.loads(self._download("config.json").read_text())
        try:
            index = json.loads(self._download("model.safetensors.index.json").read_text())
            self.weight_map: dict[str, str] | None = dict(index["weight_map"])
        except WeightsError:  # no index: one model.safetensors holds every tensor
            self.weight_map = None

    def _download(self, filename: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            return Path(hf_hub_download(self.repo_id, filename, cache_dir=self.cache_dir))
        except RepositoryNotFoundError:
            raise WeightsError(f"the Hugging Face Hub has no repository {self.repo_id!r} (or it is gated)") from None
        except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not in the local cache
            raise WeightsError(
                f"the Hugging Face Hub is unreachable and {filename} of {self.repo_id} is not in the local cache"
            ) from None
        except EntryNotFoundError:
            raise WeightsError(f"{self.repo_id} has no {filename}") from None
        except (HfHubHTTPError, OSError) as e:
            raise WeightsError(f"the Hugging Face Hub is unreachable for {self.repo_id}: {e}") from None

    def matches(self, manifest: Manifest) -> bool:
        """Whether a swarm's manifest is this repository's model: the same config and tensor layout."""
        if dict(manifest.config) != self.config:
            return False
        files = {t.name: t.file for t in manifest.tensors}
        if self.weight_map is None:
            return set(files.values()) == {SINGLE}
        return files == self.weight_map

    def shard_files(self, names: Iterable[str] | None = None) -> list[str]:
        """The shard files holding `names` (every shard when None)."""
        if self.weight_map is None:
            return [SINGLE]
        wanted = self.weight_map.keys() if names is None else names
        return sorted({self.weight_map[n] for n in wanted if n in self.weight_map})

    def download(self, files: Iterable[str]) -> Path:
        """Download `files` (and the tokenizer's); the snapshot folder that holds them."""
        folder = self._download("config.json").parent
        for name in files:
            self._download(name)
        from huggingface_hub import list_repo_files

        try:
            listed = list_repo_files(self.repo_id)
        except Exception as e:  # the Hub's client raises several types; the tokenizer is optional here
            log.info("listing %s: %r", self.repo_id, e)
            listed = []
        from fnmatch import fnmatch

        for name in listed:
            if "/" not in name and any(fnmatch(name, pattern) for pattern in AUX_PATTERNS):
                self._download(name)
        return folder


def fill_from_folder(cache: ModelCache, groups: Iterable[str], folder: Path) -> int:
    """Copy the tensors of `groups` from a folder with the manifest's file layout into the cache,
    each verified by its sha256 before its group is complete; the bytes copied."""
    copied = 0
    for group in groups:
        if cache.has_group(group):
            continue
        gf = cache.open_group(group)
        for t in gf.tensors:
            if t.name in gf.verified:
                continue
            with (folder / t.file).open("rb") as f:
                for index, length in gf.chunks(t):
                    f.seek(t.offset + index * cache.chunk_bytes)
                    gf.write(t, index, f.read(length))
                    copied += length
            if not gf.verify(t):
                raise BadWeights(f"{folder / t.file}: {t.name} does not match the manifest's sha256")
        gf.finish()
    cache.write_index()
    return copied
