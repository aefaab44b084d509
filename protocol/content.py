"""Content ids: a model id is `content_id` of its manifest's canonical bytes (shards.manifest).

Here, beside the wire, so that a client without torch (the SDK) can check that bytes a peer
sent are the manifest of the model id it asked for, and then each file against its sha256.
"""

from __future__ import annotations

import hashlib

__all__ = ["ID_HEX", "content_id"]

ID_HEX = 24  # hex digits of a model id (96 bits)


def content_id(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()[:ID_HEX]
