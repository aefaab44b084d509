"""The tokenizer from the swarm: peers serve their folder's tokenizer files and chat template
over `Tokenizer`, and a client without a model folder fetches, checks and caches them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from node.client import Client, ClientConfig
from node.client.text import TextCodec
from node.client.tokenizer import swarm_tokenizer
from node.errors import ConfigError, TokenizerError
from node.testing.launch import local_swarm, start_server_process
from node.textfiles import MAX_TOKENIZER_BYTES, cached, pack, store, unpack
from protocol.shard_pb2 import TokenizerResponse
from shards.manifest import load_manifest
from tests.test_api import TEMPLATE, with_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _answer(folder: Path) -> TokenizerResponse:
    """What a peer serving the model in `folder` answers (its model id: the manifest's hash)."""
    manifest = load_manifest(folder)
    response = pack(folder, manifest.model_id, manifest.canonical())
    assert response is not None and response.model_id == manifest.model_id
    return response


# -- the pure pieces --------------------------------------------------------------------------


def test_a_packed_folder_unpacks_and_stores_as_a_folder_that_encodes_alike(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = with_tokenizer(tiny_models["mixtral"], tmp_path / "m")
    response = _answer(folder)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} == set(response.files)
    assert response.chat_template == TEMPLATE
    model_id = response.model_id
    stored = store(tmp_path / "cache", unpack(response.SerializeToString(), model_id, "peer"))
    assert stored == tmp_path / "cache" / model_id and cached(tmp_path / "cache", model_id) == stored
    ours, theirs = TextCodec(folder), TextCodec(stored)
    chat = [{"role": "user", "content": "is it you"}]
    assert theirs.encode(theirs.render_chat(chat)) == ours.encode(ours.render_chat(chat))
    assert theirs.eos_token_ids == ours.eos_token_ids and theirs.eos_token_ids
    assert pack(tiny_models["mixtral"], "m1", b"") is None  # no tokenizer.json: nothing to serve


def test_a_chat_template_from_its_own_file_travels_too(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = with_tokenizer(tiny_models["mixtral"], tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    answer = _answer(folder)
    stored = store(tmp_path / "cache", unpack(answer.SerializeToString(), answer.model_id, "peer"))
    assert TextCodec(stored).has_chat_template


def _bad_answers(good: TokenizerResponse) -> dict[str, tuple[bytes, str]]:
    def changed(edit: Callable[[TokenizerResponse], None]) -> bytes:
        copy = TokenizerResponse()
        copy.CopyFrom(good)
        edit(copy)
        return copy.SerializeToString()

    return {
        "garbage": (b"\xff\xff\xff", "not a TokenizerResponse"),
        "oversize": (b"\0" * (MAX_TOKENIZER_BYTES + 1), "over the"),
        "other model": (changed(lambda r: setattr(r, "model_id", "m2")), f"not {good.model_id}"),
        "unknown file": (changed(lambda r: r.files.__setitem__("../../.bashrc", b"x")), "unexpected tokenizer files"),
        "no tokenizer.json": (changed(lambda r: r.files.__delitem__("tokenizer.json")), "no tokenizer.json"),
        "bad json": (changed(lambda r: r.files.__setitem__("tokenizer_config.json", b"[1]")), "not a JSON object"),
        "bad tokenizer": (changed(lambda r: r.files.__setitem__("tokenizer.json", b"{}")), "does not load"),
        # well-formed, but not the model's own bytes: the manifest (whose hash is the id) says so
        "no manifest": (changed(lambda r: r.ClearField("manifest")), "no manifest of model"),
        "another manifest": (changed(lambda r: setattr(r, "manifest", r.manifest + b" ")), "no manifest of model"),
        "tampered file": (
            changed(lambda r: r.files.__setitem__("generation_config.json", b'{"eos_token_id": 7}')),
            "generation_config.json that is not model",
        ),
        "tampered template": (
            changed(lambda r: setattr(r, "chat_template", "{{ 'mine' }}")),
            "chat template that is not",
        ),
    }


def test_a_bad_answer_is_a_clear_error_naming_the_peer(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    good = _answer(with_tokenizer(tiny_models["mixtral"], tmp_path / "m"))
    for case, (raw, says) in _bad_answers(good).items():
        with pytest.raises(TokenizerError, match=says) as caught:
            unpack(raw, good.model_id, "10.0.0.9:7001")
        assert "10.0.0.9:7001" in str(caught.value), case
    with pytest.raises(TokenizerError, match="cannot name a cache folder"):
        store(tmp_path / "cache", TokenizerResponse(model_id="../x", files=dict(good.files)))


def test_a_strangers_chat_template_runs_in_the_sandbox(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = with_tokenizer(tiny_models["mixtral"], tmp_path / "m")
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": escape}))
    with pytest.raises(ConfigError, match="chat template"):
        TextCodec(folder).render_chat([{"role": "user", "content": "hi"}])


# -- over gRPC: a peer that answers badly -----------------------------------------------------


@pytest.fixture
def liar() -> Iterator[Callable[[bytes], str]]:
    """A gRPC server whose Tokenizer answers whatever bytes the test sets; yields the setter."""
    answer = [b""]
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_send_message_length", 64 << 20)])
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: answer[0])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("moemesh.v1.Shard", {"Tokenizer": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def set_answer(raw: bytes) -> str:
        answer[0] = raw
        return f"127.0.0.1:{port}"

    try:
        yield set_answer
    finally:
        server.stop(None)


def test_a_peer_sending_a_bad_or_oversize_tokenizer_is_refused_and_the_next_asked(
    tiny_models: dict[str, Path], tmp_path: Path, liar: Callable[[bytes], str]
) -> None:
    good = _answer(with_tokenizer(tiny_models["mixtral"], tmp_path / "m"))
    channel = grpc.insecure_channel(liar(b""), options=[("grpc.max_receive_message_length", 64 << 20)])

    def fetch(*addresses: str) -> Path:
        return swarm_tokenizer(good.model_id, addresses, lambda a: channel, tmp_path / "cache", 10.0)

    try:
        for case, (raw, says) in _bad_answers(good).items():
            address = liar(raw)
            with pytest.raises(TokenizerError, match=says) as caught:
                fetch(address)
            assert "--model" in str(caught.value) and address in str(caught.value), case
            assert cached(tmp_path / "cache", good.model_id) is None  # nothing of a bad answer is kept
        folder = fetch(liar(good.SerializeToString()))
        assert TextCodec(folder).has_chat_template
        assert fetch() == folder  # cached: no peer needed any more
    finally:
        channel.close()


# -- a live swarm -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("tok")
    model = with_tokenizer(tiny_models["mixtral"], root / "tiny")
    bare = start_server_process(tiny_models["mixtral"], (0, 4))  # a folder without tokenizer
    try:
        with local_swarm(model, [(0, 2), (2, 4)]) as servers:
            yield {"model": model, "peers": [s.address for s in servers], "bare": bare.address, "root": root}
    finally:
        bare.stop()


@pytest.mark.slow
def test_a_text_prompt_needs_no_local_folder(swarm: dict[str, Any], tmp_path: Path) -> None:
    with Client(swarm["peers"], model_folder=swarm["model"]) as local:
        expected = "".join(local.generate_text("is it you", 12, chat=True))
    config = ClientConfig(tokenizer_cache=tmp_path / "cache")
    with Client(swarm["peers"], config=config) as client:
        assert "".join(client.generate_text("is it you", 12, chat=True)) == expected
        model_id = client.candidates().model_id
    assert cached(tmp_path / "cache", model_id) is not None


@pytest.mark.slow
def test_peers_without_a_tokenizer_say_so(swarm: dict[str, Any], tmp_path: Path) -> None:
    config = ClientConfig(tokenizer_cache=tmp_path / "cache")
    with Client([swarm["bare"]], config=config) as client:
        with pytest.raises(TokenizerError, match="NOT_FOUND: this peer has no tokenizer.*--model"):
            client.generate_text("is it you", 4).__next__()


def _moemesh(*args: str, cache: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOEMESH_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "node", *args], cwd=ROOT, input=stdin, capture_output=True, text=True, env=env,
        timeout=180,
    )  # fmt: skip


@pytest.mark.slow
def test_generate_and_chat_commands_fetch_the_tokenizer(swarm: dict[str, Any], tmp_path: Path) -> None:
    with Client(swarm["peers"], model_folder=swarm["model"]) as local:
        expected = "".join(local.generate_text("is it you", 8, chat=True))
    peers = ",".join(swarm["peers"])
    generated = _moemesh("generate", "--peers", peers, "--max-new-tokens", "8", "is it you", cache=tmp_path)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip() == expected.strip()
    assert (tmp_path / "tokenizers").is_dir()
    greedy = ("--temperature", "0", "--max-new-tokens", "8")
    chat = _moemesh("chat", "--peers", peers, *greedy, cache=tmp_path / "2", stdin="is it you\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == expected.strip() and "Traceback" not in chat.stderr
