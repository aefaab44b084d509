"""The tokenizer a peer serves with its span, so that a text client needs no model folder.

The wire is `Tokenizer` on the Shard service (protocol/shard.proto): the client names the
model id, the peer answers with its folder's tokenizer files and chat template. Both ends
use the pure functions here: `pack` reads a folder into a `TokenizerResponse` (None when it
has no tokenizer.json), `unpack` checks an answer from a stranger before anything of it is
used, and `store` writes a checked answer into the client's cache folder for that model id,
where `node.client.text.TextCodec` reads it like any model folder.

What a peer sends is bounded (`MAX_TOKENIZER_BYTES` in all, only the names in `FILES`);
the JSON files must be JSON objects and tokenizer.json must load; the answer carries the
model's manifest, whose hash must be the model id asked for, and every file and the chat
template must match a sha256 it lists (so no peer can serve a tokenizer of its own under
another model's id, and the cache keeps only the model's own). The chat template is
rendered in jinja2's sandbox (`TextCodec`), since it comes from a stranger.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from node.errors import TokenizerError
from protocol.content import content_id
from protocol.shard_pb2 import TokenizerResponse

__all__ = ["FILES", "MAX_TOKENIZER_BYTES", "cache_root", "cached", "pack", "store", "unpack"]

FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
TEMPLATE_FILE = "chat_template.jinja"
MAX_TOKENIZER_BYTES = 32 * 1024 * 1024  # DeepSeek-V3's tokenizer.json is 7.8 MB, Qwen3's 11 MB
_MODEL_ID = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]{0,127}")


def cache_root() -> Path:
    """Where fetched tokenizers are kept: $MOEMESH_CACHE/tokenizers (default ~/.cache/moemesh/tokenizers)."""
    root = os.environ.get("MOEMESH_CACHE") or Path.home() / ".cache" / "moemesh"
    return Path(root).expanduser() / "tokenizers"


def _folder(root: Path, model_id: str) -> Path:
    if not _MODEL_ID.fullmatch(model_id):
        raise TokenizerError(f"model id {model_id[:40]!r} cannot name a cache folder")
    return root / model_id


def cached(root: Path, model_id: str) -> Path | None:
    """The cache folder of `model_id` if a tokenizer was stored there, else None."""
    folder = _folder(root, model_id)
    return folder if (folder / "tokenizer.json").is_file() else None


def pack(folder: Path, model_id: str, manifest: bytes) -> TokenizerResponse | None:
    """The answer a peer gives for the model in `folder`, whose canonical manifest is `manifest`;
    None when the folder has no tokenizer.json. TokenizerError when its files are over the
    bound (the peer then serves none)."""
    if not (folder / "tokenizer.json").is_file():
        return None
    files = {name: (folder / name).read_bytes() for name in FILES if (folder / name).is_file()}
    template = ""
    try:
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
    except ValueError:
        config = {}
    if isinstance(config, dict) and isinstance(config.get("chat_template"), str):
        template = config["chat_template"]
    elif (folder / TEMPLATE_FILE).is_file():
        template = (folder / TEMPLATE_FILE).read_bytes().decode()  # as hashed: no newline translation
    response = TokenizerResponse(model_id=model_id, files=files, chat_template=template, manifest=manifest)
    if (size := response.ByteSize()) > MAX_TOKENIZER_BYTES:
        raise TokenizerError(f"{folder}: the tokenizer files are {size} bytes, over the {MAX_TOKENIZER_BYTES} bound")
    return response


def unpack(raw: bytes, model_id: str, peer: str) -> TokenizerResponse:
    """A peer's answer, checked: bounded, of the model asked for, only known files, valid JSON, a
    tokenizer.json that loads. TokenizerError naming `peer` and what is wrong otherwise."""
    from google.protobuf.message import DecodeError
    from tokenizers import Tokenizer

    if len(raw) > MAX_TOKENIZER_BYTES:
        raise TokenizerError(f"{peer} sent a tokenizer of {len(raw)} bytes, over the {MAX_TOKENIZER_BYTES} bound")
    try:
        response = TokenizerResponse.FromString(raw)
    except DecodeError:
        raise TokenizerError(f"{peer} sent a Tokenizer answer that is not a TokenizerResponse") from None
    if response.model_id != model_id:
        raise TokenizerError(f"{peer} sent the tokenizer of model {response.model_id[:40]!r}, not {model_id}")
    if unknown := sorted(set(response.files) - set(FILES)):
        raise TokenizerError(f"{peer} sent unexpected tokenizer files: {', '.join(repr(n[:40]) for n in unknown)}")
    if "tokenizer.json" not in response.files:
        raise TokenizerError(f"{peer} sent no tokenizer.json")
    for name in FILES[1:]:
        if name in response.files:
            try:
                value = json.loads(response.files[name])
            except ValueError:
                value = None
            if not isinstance(value, dict):
                raise TokenizerError(f"{peer} sent a {name} that is not a JSON object")
    try:
        Tokenizer.from_str(response.files["tokenizer.json"].decode())
    except Exception as e:  # the tokenizers package raises a bare Exception for a bad file
        raise TokenizerError(f"{peer} sent a tokenizer.json that does not load: {str(e)[:200]}") from None
    _check_against_manifest(response, model_id, peer)
    return response


def _check_against_manifest(response: TokenizerResponse, model_id: str, peer: str) -> None:
    """Every file and the chat template are the model's own: the manifest hashes to `model_id`,
    and each byte sent matches a sha256 it lists."""
    if content_id(response.manifest) != model_id:
        raise TokenizerError(f"{peer} sent no manifest of model {model_id} with its tokenizer")
    try:
        listed = {str(name): str(digest) for name, _, digest in json.loads(response.manifest)["files"]}
    except (ValueError, KeyError, TypeError):
        raise TokenizerError(f"{peer} sent a malformed manifest of model {model_id}") from None
    for name, data in response.files.items():
        if listed.get(name) != hashlib.sha256(data).hexdigest():
            raise TokenizerError(f"{peer} sent a {name} that is not model {model_id}'s (its sha256 differs)")
    template = response.chat_template
    if template:
        config = json.loads(response.files.get("tokenizer_config.json", b"{}"))  # a JSON object: checked above
        own = config.get("chat_template") == template
        if not own and listed.get(TEMPLATE_FILE) != hashlib.sha256(template.encode()).hexdigest():
            raise TokenizerError(f"{peer} sent a chat template that is not model {model_id}'s")


def store(root: Path, response: TokenizerResponse) -> Path:
    """Write a checked answer into its model's cache folder (atomically: a folder is complete or
    absent) and return that folder."""
    folder = _folder(root, response.model_id)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{response.model_id}-", dir=root))
    try:
        for name, data in response.files.items():
            (staging / name).write_bytes(data)
        if response.chat_template:
            (staging / TEMPLATE_FILE).write_text(response.chat_template)
        try:
            staging.rename(folder)
        except OSError:  # another client stored it first: theirs is as good
            if cached(root, response.model_id) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
