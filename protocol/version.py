"""Versions carried on the wire."""

from __future__ import annotations

from importlib import metadata

__all__ = ["PROTOCOL_VERSION", "software_version"]

PROTOCOL_VERSION = 1  # bump on any incompatible change to shard.proto's meaning


def software_version() -> str:
    try:
        return metadata.version("moemesh")
    except metadata.PackageNotFoundError:
        return "0+unknown"
