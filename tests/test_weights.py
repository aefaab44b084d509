"""Model weights shared over the mesh: the manifest and model id, the weights protocol's bounds,
the fetch cache's journal and quota (here), and daemons fetching their spans (test_weights_swarm.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import trio

from node.errors import BadWeights, DiskQuota, WeightsError
from node.mesh.weights import WeightsConfig, WeightsServer
from node.weights.cache import ModelCache, folder_holding
from node.weights.hub import HubModel, fill_from_folder
from protocol.weights_pb2 import ChunkRequest, ManifestRequest, WeightsRequest, WeightsResponse
from shards import Checkpoint
from shards.errors import CheckpointError, ManifestError
from shards.manifest import CACHE_NAME, Manifest, build_manifest, group_of, load_manifest


@pytest.fixture
def folder(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_models["mixtral"], copy)
    (copy / CACHE_NAME).unlink(missing_ok=True)
    (copy / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return copy


def test_the_model_id_is_the_manifest_hash_computed_once_and_cached(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = load_manifest(folder)
    assert Checkpoint(folder).model_id() == manifest.model_id
    assert {f.name for f in manifest.files} == {"generation_config.json", "tokenizer.json"}
    assert (folder / CACHE_NAME).is_file()
    import shards.manifest

    def no_hashing(*args: object, **kwargs: object) -> Manifest:
        raise AssertionError("hashed again")

    monkeypatch.setattr(shards.manifest, "build_manifest", no_hashing)
    assert Checkpoint(folder).model_id() == manifest.model_id  # from the cache: no pass over the weights
    (folder / "tokenizer.json").write_text('{"fake": "another tokenizer"}')  # a covered file changed
    with pytest.raises(AssertionError, match="hashed again"):
        load_manifest(folder)


def test_the_model_id_changes_with_any_tensor_byte(folder: Path, tmp_path: Path) -> None:
    before = load_manifest(folder)
    entry = before.tensor("model.layers.1.self_attn.q_proj.weight")
    assert entry is not None
    shard = folder / entry.file
    data = bytearray(shard.read_bytes())
    data[entry.offset] ^= 0x01  # same size, same header: the old id (headers only) did not see it
    shard.write_bytes(bytes(data))
    after = build_manifest(folder)
    assert after.model_id != before.model_id
    assert [t.sha256 for t in after.tensors if t.name != entry.name] == [
        t.sha256 for t in before.tensors if t.name != entry.name
    ]


def test_a_manifest_round_trips_and_hostile_ones_are_refused(folder: Path) -> None:
    manifest = load_manifest(folder)
    assert Manifest.from_bytes(manifest.canonical()).model_id == manifest.model_id
    good = json.loads(manifest.canonical())
    bad_cases = [b"not json", b"[]", json.dumps({**good, "format": 2}).encode()]
    for field, index, value in [
        ("files", 0, "../../etc/passwd"),  # a file name that escapes the folder
        ("files", 1, -5),  # negative size
        ("tensors", 0, "x 0\nv model.norm.weight"),  # a name that would forge fetch journal lines
        ("tensors", 1, "Q9"),  # unknown dtype
        ("tensors", 2, [10**9]),  # shape that does not fit its byte length
        ("tensors", 6, "zz"),  # not a sha256
    ]:
        raw = json.loads(manifest.canonical())
        raw[field][0][index] = value
        bad_cases.append(json.dumps(raw).encode())
    raw = json.loads(manifest.canonical())
    raw["tensors"].append(raw["tensors"][0])
    bad_cases.append(json.dumps(raw).encode())  # a name twice
    for case in bad_cases:
        with pytest.raises(ManifestError):
            Manifest.from_bytes(case)


def test_a_span_needs_its_layers_and_the_embedding_or_head_at_its_ends(folder: Path) -> None:
    manifest = load_manifest(folder)
    assert manifest.groups_for_span(0, 2) == ["0", "1", "embed"]
    assert manifest.groups_for_span(1, 3) == ["1", "2"]
    assert manifest.groups_for_span(2, 4) == ["2", "3", "head"]
    assert group_of("model.layers.12.mlp.experts.3.w1.weight") == "12"
    assert {group_of(t.name) for t in manifest.tensors} == {"0", "1", "2", "3", "embed", "head"}


def _answer(server: WeightsServer, request: WeightsRequest | bytes) -> WeightsResponse:
    frame = request if isinstance(request, bytes) else request.SerializeToString()
    return trio.run(server.answer, frame)


def test_every_chunk_request_is_bounded_and_a_bad_one_gets_an_error(folder: Path) -> None:
    manifest = load_manifest(folder)
    holding = folder_holding(folder, manifest)
    server = WeightsServer(None, WeightsConfig(max_chunk_bytes=1024), lambda: holding)  # type: ignore[arg-type]
    mid = manifest.model_id
    name = "model.layers.0.self_attn.q_proj.weight"
    entry = manifest.tensor(name)
    assert entry is not None and entry.length > 1024
    raw = (folder / entry.file).read_bytes()

    def chunk(**fields: object) -> WeightsResponse:
        request = dict(model_id=mid, name=name, offset=0, length=16)
        return _answer(server, WeightsRequest(chunk=ChunkRequest(**{**request, **fields})))  # type: ignore[arg-type]

    ok = chunk(offset=100, length=64)
    assert not ok.error and ok.data == raw[entry.offset + 100 : entry.offset + 164]
    assert (
        chunk(offset=entry.length - 8, length=8).data
        == raw[entry.offset + entry.length - 8 : entry.offset + entry.length]
    )
    for bad in [
        chunk(offset=entry.length - 8, length=16),  # past the tensor's end
        chunk(offset=2**63, length=16),  # far past it
        chunk(length=0),
        chunk(length=1025),  # over the chunk limit
        chunk(name="model.layers.0.nope"),
        chunk(name="../../etc/passwd", file=True),
        chunk(model_id="0" * 24),
    ]:
        assert bad.error and not bad.data
    assert _answer(server, b"\xff\xff\xff garbage").error == "malformed request"
    answer = _answer(server, WeightsRequest(manifest=ManifestRequest(model_id=mid)))
    assert Manifest.from_bytes(answer.manifest).model_id == mid and set(answer.groups) >= {"0", "embed", "head"}
    token = chunk(name="tokenizer.json", file=True, length=5)
    assert token.data == b'{"fak'


def test_a_fetch_resumes_from_its_journal_and_the_assembled_span_loads(folder: Path, tmp_path: Path) -> None:
    manifest = load_manifest(folder)
    cache = ModelCache(tmp_path / "cache", manifest, chunk_bytes=4096)
    gf = cache.open_group("1")
    first = gf.tensors[0]
    assert len(gf.chunks(first)) > 1
    raw = (folder / first.file).read_bytes()[first.offset : first.offset + first.length]
    gf.write(first, 0, raw[:4096])  # one chunk, then a "crash"
    with gf.journal.open("a") as f:
        f.write("d model.layers.1.cut-in-the-midd")  # a line cut by the crash
    again = cache.open_group("1")
    assert again.done == {first.name: {0}} and len(again.chunks(first)) == -(-first.length // 4096) - 1
    for index, length in again.chunks(first):
        bad = bytes(length)  # zeros: a provider lying
        again.write(first, index, bad)
    assert not again.verify(first) and first.name not in again.done  # forgotten: fetched again from scratch
    for group in manifest.groups_for_span(0, 4):
        fill_from_folder(cache, [group], folder)
    ours = Checkpoint(cache.root)
    assert ours.model_id() == manifest.model_id  # the pinned manifest: the same model id as the full folder
    fetched, original = ours.load_span(1, 3), Checkpoint(folder).load_span(1, 3)
    for (name, a), (_, b) in zip(fetched.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not list(cache.root.glob("*.partial")) and not list(cache.root.glob("*.journal"))


def test_the_disk_quota_evicts_unused_groups_or_refuses_clearly(folder: Path, tmp_path: Path) -> None:
    manifest = load_manifest(folder)
    span = manifest.groups_for_span(0, 2)
    cache = ModelCache(tmp_path / "cache", manifest, max_disk_bytes=1000)
    with pytest.raises(DiskQuota, match="--max-disk"):
        cache.check_quota(span)
    roomy = ModelCache(tmp_path / "cache", manifest, max_disk_bytes=int(cache.bytes_of(span) * 1.2) + 8192)
    for group in manifest.groups_for_span(2, 4):
        fill_from_folder(roomy, [group], folder)
    held = [g for g in manifest.groups_for_span(2, 4) if roomy.has_group(g)]
    roomy.check_quota(span)  # groups of 2:4 are evicted (as few as make room) for 0:2
    left = [g for g in held if roomy.has_group(g)]
    assert len(left) < len(held)
    assert roomy.bytes_of(left) + roomy.bytes_of(span) <= roomy.max_disk_bytes


def test_hub_files_are_verified_against_the_swarms_manifest(folder: Path, tmp_path: Path) -> None:
    manifest = load_manifest(folder)
    hub = object.__new__(HubModel)  # what the Hub said, without asking it
    hub.config, hub.weight_map = dict(manifest.config), None
    assert hub.matches(manifest) and hub.shard_files(["model.layers.0.self_attn.q_proj.weight"]) == [
        "model.safetensors"
    ]
    hub.config = {**hub.config, "rms_norm_eps": 0.5}
    assert not hub.matches(manifest)  # another model under the same layout
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    entry = manifest.tensor("model.layers.2.self_attn.o_proj.weight")
    assert entry is not None
    data = bytearray((tampered / entry.file).read_bytes())
    data[entry.offset + 3] ^= 0x10
    (tampered / entry.file).write_bytes(bytes(data))
    cache = ModelCache(tmp_path / "cache", manifest)
    with pytest.raises(BadWeights, match="o_proj"):
        fill_from_folder(cache, ["2"], tampered)
    assert not cache.has_group("2")


def test_an_unreachable_hub_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="unreachable"):
        HubModel("moemesh-tests/no-such-model", cache_dir=tmp_path)


def test_a_peer_may_keep_only_its_spans_shards_once_hashed(folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(folder / name, sharded / name)
    tensors = load_file(str(folder / "model.safetensors"))
    first = {n: t for n, t in tensors.items() if group_of(n) in ("embed", "0", "1")}
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": {
        n: t for n, t in tensors.items() if n not in first}}  # fmt: skip
    for file, part in files.items():
        save_file(part, str(sharded / file))
    index = {"weight_map": {n: file for file, part in files.items() for n in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    model_id = Checkpoint(sharded).model_id()
    (sharded / "model-00002-of-00002.safetensors").unlink()  # this peer serves 0:2 only
    assert Checkpoint(sharded).model_id() == model_id  # still the whole model's id
    span = Checkpoint(sharded).load_span(0, 2)
    assert span.embed_tokens is not None
    assert folder_holding(sharded, load_manifest(sharded)).groups == ("0", "1", "embed")
    (sharded / CACHE_NAME).unlink()
    with pytest.raises(CheckpointError, match="cannot be hashed"):
        load_manifest(sharded)


def test_the_manifest_command_and_bad_model_arguments(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main

    out = tmp_path / "manifest.json"
    assert main(["manifest", str(folder), "--out", str(out)]) == 0
    model_id = load_manifest(folder).model_id
    assert f"model id {model_id}" in capsys.readouterr().out
    assert Manifest.from_bytes(out.read_bytes()).model_id == model_id
    assert main(["manifest", str(tmp_path / "nowhere")]) == 2
    assert main(["daemon", "--model", "not/a/model/id", "--layers", "0:2"]) == 2
    assert "nor a model id (24 hex digits)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["daemon", "--model", model_id, "--layers", "0:2", "--max-disk", "-1"])
    assert refused.value.code == 2 and "--max-disk: -1 GB must be positive" in capsys.readouterr().err


class _FakeStream:
    """Bytes in, bytes out, as a libp2p stream would carry them."""

    class _Conn:
        peer_id = "fake-peer"

    muxed_conn = _Conn()

    def __init__(self, incoming: bytes) -> None:
        self.incoming, self.outgoing = incoming, b""
        self.closed = self.was_reset = False

    async def read(self, n: int) -> bytes:
        data, self.incoming = self.incoming[:n], self.incoming[n:]
        return data

    async def write(self, data: bytes) -> None:
        self.outgoing += data

    async def close(self) -> None:
        self.closed = True

    async def reset(self) -> None:
        self.was_reset = True


def test_a_hostile_stream_is_reset_and_a_good_one_answered(folder: Path) -> None:
    from node.mesh.weights import MAX_REQUEST_BYTES

    manifest = load_manifest(folder)
    holding = folder_holding(folder, manifest)
    server = WeightsServer(None, WeightsConfig(), lambda: holding)  # type: ignore[arg-type]
    oversized = (MAX_REQUEST_BYTES + 1).to_bytes(4, "big") + b"x" * 64
    for hostile in (oversized, b"\x00\x00\x00\x10short"):  # over the limit; cut in the middle
        stream = _FakeStream(hostile)
        trio.run(server.handle, stream)
        assert stream.was_reset and stream.outgoing == b""
    request = WeightsRequest(manifest=ManifestRequest(model_id=manifest.model_id)).SerializeToString()
    good = _FakeStream(len(request).to_bytes(4, "big") + request)  # then the peer closes
    trio.run(server.handle, good)
    assert good.closed and not good.was_reset and server.active == 0
    answer = WeightsResponse.FromString(good.outgoing[4:])
    assert Manifest.from_bytes(answer.manifest).model_id == manifest.model_id
