"""Span specs and the checkpoint loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import shards.checkpoint
from shards import (
    Checkpoint,
    CheckpointError,
    SpanSpec,
    SpanSpecError,
    UnsupportedModelError,
    parse_layers,
    split_evenly,
)


def test_parse_layers() -> None:
    assert parse_layers("0:8") == (0, 8)
    assert parse_layers("4:", total_layers=12) == (4, 12)
    assert parse_layers(":", total_layers=12) == (0, 12)
    for bad in ("8", "a:b", "5:5", "-1:3", "6:2"):
        with pytest.raises(SpanSpecError):
            parse_layers(bad, 12)
    with pytest.raises(SpanSpecError, match="run past the model's 12 layers"):
        parse_layers("0:13", 12)


def test_split_evenly_covers_every_layer() -> None:
    for total in (1, 4, 30, 31):
        for parts in range(1, min(total, 7) + 1):
            spans = split_evenly(total, parts)
            assert spans[0][0] == 0 and spans[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            sizes = [e - s for s, e in spans]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(SpanSpecError):
        split_evenly(3, 4)


def test_span_spec() -> None:
    spec = SpanSpec("abc", 2, 5)
    assert spec.num_layers == 3 and str(spec) == "2:5"
    with pytest.raises(SpanSpecError):
        SpanSpec("abc", 3, 3)
    with pytest.raises(SpanSpecError):
        spec.check_within(4)


def test_loader_reads_only_the_span_tensors(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real = shards.checkpoint.safe_open

    class Recording:
        def __init__(self, path: str, framework: str) -> None:
            self.inner = real(path, framework=framework)

        def get_tensor(self, name: str) -> Any:
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(shards.checkpoint, "safe_open", Recording)
    span = Checkpoint(tiny_models["mixtral"]).load_span(1, 3)
    assert span.embed_tokens is None and span.lm_head is None
    assert read and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in read)
    read.clear()
    Checkpoint(tiny_models["mixtral"]).load_span(3, 4)
    assert {"model.norm.weight", "lm_head.weight"} <= set(read)
    assert not any(n.startswith(("model.layers.0.", "model.layers.2.", "model.embed")) for n in read)


def _copy(folder: Path, tmp_path: Path, **config_changes: Any) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_unsupported_architectures_say_so(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="not supported: model_type 'gpt2'"):
        Checkpoint(_copy(tiny_models["llama"], tmp_path, model_type="gpt2"))
    with pytest.raises(UnsupportedModelError, match="not supported: hidden_act"):
        Checkpoint(_copy(tiny_models["mixtral"], tmp_path / "a", hidden_act="gelu"))
    with pytest.raises(UnsupportedModelError, match="not supported: rope_type 'longrope'"):
        Checkpoint(
            _copy(tiny_models["llama"], tmp_path / "c", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
        )


def test_broken_checkpoints_get_clear_errors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)
    bad = _copy(tiny_models["mixtral"], tmp_path / "x", hidden_size=48)
    with pytest.raises(CheckpointError, match="has shape"):
        Checkpoint(bad).load_span(0, 1)
    with pytest.raises(SpanSpecError, match="not inside"):
        Checkpoint(tiny_models["mixtral"]).load_span(2, 9)


def test_model_id_is_content_derived(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    a = Checkpoint(tiny_models["mixtral"]).model_id()
    assert a == Checkpoint(tiny_models["mixtral"]).model_id()
    assert a != Checkpoint(tiny_models["qwen3_moe"]).model_id()
    assert a != Checkpoint(_copy(tiny_models["mixtral"], tmp_path, rms_norm_eps=1e-3)).model_id()


def test_loading_in_another_dtype(tiny_models: dict[str, Path]) -> None:
    span = Checkpoint(tiny_models["llama"]).load_span(0, 2, torch.bfloat16)
    assert span.dtype == torch.bfloat16 and span.rotary.inv_freq.dtype == torch.float32
    assert {p.dtype for p in span.parameters()} == {torch.bfloat16}
