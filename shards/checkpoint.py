"""Read a Hugging Face safetensors checkpoint: its identity and a span's weights (its
architecture, config.json translated: `shards.hfconfig`).

Only the tensors of the requested span are read (safetensors memory-maps each file and
copies out the named tensors). Checkpoints store experts one by one
(``experts.{e}.w1/w3/w2`` for Mixtral, ``experts.{e}.gate_proj/up_proj/down_proj`` for
Qwen3-MoE); they are fused here into ``gate_up [E, 2I, H]`` and ``down [E, H, I]``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kernels import QUANT_MODES, SpanModel, UnsupportedModelError, pack_span, quantize_span, split_span
from shards.errors import CheckpointError, SpanSpecError
from shards.hfconfig import compute_dtype_of, embedding_dtype, model_config_from_hf
from shards.manifest import load_manifest

__all__ = ["Checkpoint"]


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class _Source:
    """How one of our parameters is made from checkpoint tensors."""

    names: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


def _one(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


class Checkpoint:
    """A local Hugging Face checkpoint folder: config.json plus one or more .safetensors files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json (expected a Hugging Face checkpoint folder)")
        try:
            self.hf_config: dict[str, Any] = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_path}: unreadable ({e})") from None
        self.config = model_config_from_hf(self.hf_config)
        self._files = self._index()
        self._model_id: str | None = None
        self._family = self.config.family
        quant = self.hf_config.get("quantization_config") or {}
        self._quant_method: str | None = quant.get("quant_method")
        block = quant.get("weight_block_size")
        self._block_size: tuple[int, int] | None = (int(block[0]), int(block[1])) if block else None

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def _index(self) -> dict[str, Path]:
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no .safetensors files")
        index: dict[str, Path] = {}
        for file in files:
            for name in _safetensors_header(file):
                index[name] = file
        return index

    def model_id(self) -> str:
        """The hash of the model's manifest (`shards.manifest`): config, tokenizer files and every
        tensor's layout and sha256. Cached in the folder, so only the first call reads the weights;
        a folder assembled from fetched tensors carries the manifest of the whole model."""
        if self._model_id is None:
            self._model_id = load_manifest(self.path).model_id
        return self._model_id

    def _moe_sources(self, layer: int) -> dict[str, _Source]:
        """Our MoE block's parameters (router, gate_up, down, ...) from the family's checkpoint names."""
        cfg, family, files = self.config, self._family, self._files
        e_count = cfg.num_experts
        mlp = f"model.layers.{layer}.mlp"
        if family == "gpt_oss":
            experts = f"{mlp}.experts"
            sources = {
                "router": _Source((f"{mlp}.router.weight",), _one),
                "router_bias": _Source((f"{mlp}.router.bias",), _one),
                "gate_up_bias": _Source((f"{experts}.gate_up_proj_bias",), _one),
                "down_bias": _Source((f"{experts}.down_proj_bias",), _one),
            }
            for ours, theirs in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                if f"{experts}.{theirs}_blocks" in files:  # MXFP4: [E, out, in/32, 16] nibbles + [E, out, in/32]
                    sources[ours] = _Source((f"{experts}.{theirs}_blocks", f"{experts}.{theirs}_scales"), _mxfp4)
                else:
                    sources[ours] = _Source((f"{experts}.{theirs}",), _one)
            return sources
        if family == "granitemoe":
            base = f"model.layers.{layer}.block_sparse_moe"
            return {
                "router": _Source((f"{base}.router.layer.weight",), _one),
                "gate_up": _Source((f"{base}.input_linear.weight",), _one),
                "down": _Source((f"{base}.output_linear.weight",), _one),
            }
        if family == "mixtral":
            base = f"model.layers.{layer}.block_sparse_moe"
            gate, up, down = "w1", "w3", "w2"
        else:
            base = mlp
            gate, up, down = "gate_proj", "up_proj", "down_proj"
        router = f"{base}.gate.weight"
        sources = {}
        if cfg.shared_expert_size:
            shared = f"{base}.shared_experts" if family.startswith("deepseek") else f"{base}.shared_expert"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                sources[f"shared.{proj}.weight"] = _Source((f"{shared}.{proj}.weight",), _one)
        if cfg.shared_expert_gate:
            sources["shared_gate.weight"] = _Source((f"{base}.shared_expert_gate.weight",), _one)
        if cfg.router == "sigmoid_group":
            sources["score_bias"] = _Source((f"{base}.gate.e_score_correction_bias",), _one)
        fused = f"{mlp}.experts"
        if f"{fused}.gate_up_proj" in files:  # already fused by transformers 5
            router = router if router in files else f"{mlp}.gate.weight"
            return sources | {
                "router": _Source((router,), _one),
                "gate_up": _Source((f"{fused}.gate_up_proj",), _one),
                "down": _Source((f"{fused}.down_proj",), _one),
            }
        gates = tuple(f"{base}.experts.{e}.{gate}.weight" for e in range(e_count))
        ups = tuple(f"{base}.experts.{e}.{up}.weight" for e in range(e_count))
        downs = tuple(f"{base}.experts.{e}.{down}.weight" for e in range(e_count))

        def fuse_gate_up(ts: list[torch.Tensor]) -> torch.Tensor:  # E x [I, H] gates, then E x [I, H] ups
            return torch.stack([torch.cat(pair) for pair in zip(ts[:e_count], ts[e_count:], strict=True)])

        return sources | {
            "router": _Source((router,), _one),
            "gate_up": _Source(gates + ups, fuse_gate_up),
            "down": _Source(downs, torch.stack),
        }

    def _sources(self, span: SpanModel) -> dict[str, _Source]:
        """Map every parameter of `span` to the checkpoint tensors it is built from."""
        cfg = self.config
        sources: dict[str, _Source] = {}
        for local, layer in enumerate(range(span.start, span.end)):
            ours = f"layers.{local}."
            moe = self._moe_sources(layer) if cfg.is_moe_layer(layer) else {}
            for name, _ in span.layers[local].named_parameters():
                if name.startswith("mlp.") and moe:
                    sources[ours + name] = moe[name.removeprefix("mlp.")]
                else:
                    sources[ours + name] = _Source((f"model.layers.{layer}.{name}",), _one)
        if span.embed_tokens is not None:
            sources["embed_tokens.weight"] = _Source(("model.embed_tokens.weight",), _one)
        if span.norm is not None:
            sources["norm.weight"] = _Source(("model.norm.weight",), _one)
            head = "lm_head.weight"
            if cfg.tie_word_embeddings or head not in self._files:
                head = "model.embed_tokens.weight"
            sources["lm_head.weight"] = _Source((head,), _one)
        return sources

    def _read(self, names: tuple[str, ...]) -> Iterator[torch.Tensor]:
        """The named tensors; block-scaled FP8 weights come out dequantized to fp32."""
        handles: dict[Path, Any] = {}

        def get(name: str) -> torch.Tensor:
            file = self._files.get(name)
            if file is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            tensor: torch.Tensor = handles[file].get_tensor(name)
            return tensor

        for name in names:
            tensor = get(name)
            if tensor.dtype in _FP8:
                if self._quant_method != "fp8":
                    raise UnsupportedModelError(
                        f"not supported: float8 tensor {name!r} without an fp8 quantization_config"
                    )
                tensor = _dequantize_fp8(tensor, get(f"{name}_scale_inv"), self._block_size, name)
            yield tensor

    @property
    def compute_dtype(self) -> torch.dtype:
        """The one dtype a span is served in when none is asked for: the config's, else the embedding's."""
        embed = "model.embed_tokens.weight"
        if embed in self._files and self._files[embed].is_file():
            return compute_dtype_of(self.hf_config, lambda: _safetensors_header(self._files[embed])[embed]["dtype"])
        # a folder holding only a middle span: the manifest knows the embedding
        return compute_dtype_of(self.hf_config, lambda: embedding_dtype(load_manifest(self.path)))

    def load_span(
        self,
        start: int,
        end: int,
        dtype: torch.dtype | None = None,
        quantize: str = "none",
        progress: Callable[[int, int], None] | None = None,
        pack: bool = True,
    ) -> SpanModel:
        """Build layers [start, end) with their weights, reading only the tensors they need.

        Every tensor is cast to one compute dtype (`dtype`, else `compute_dtype`), quantized
        ones dequantized first, except those transformers itself keeps in fp32. `quantize`
        ("none" | "bf16" | "int8" | "int4", see `kernels.quant`) is applied once loaded; then bf16
        weights are packed for the CPU's matmuls (`kernels.packed`) and big fp32 ones split over its
        threads (`kernels.gemv`) unless `pack` is false
        (a span to be moved to another device). `progress(done, total)` is called after each
        parameter is read; an exception it raises ends the load.
        """
        if not 0 <= start < end <= self.config.num_layers:
            raise SpanSpecError(
                f"layers {start}:{end} are not inside the model's {self.config.num_layers} layers"
                f" (valid: 0 <= START < END <= {self.config.num_layers})"
            )
        if quantize not in QUANT_MODES:
            raise ValueError(f"unknown quantization {quantize!r} (known: {', '.join(QUANT_MODES)})")
        cfg = self.config
        compute = dtype or self.compute_dtype
        keep32 = cfg.fp32_params + (cfg.fp32_params_under_fp16 if compute == torch.float16 else ())
        with torch.device("meta"):
            span = SpanModel(cfg, start, end)
        state: dict[str, torch.Tensor] = {}
        expected = dict(span.named_parameters())
        sources = self._sources(span)
        for done, (name, source) in enumerate(sources.items(), 1):
            tensor = source.combine(list(self._read(source.names)))
            want = list(expected[name].shape)
            if list(tensor.shape) != want:
                raise CheckpointError(f"{self.path}: {name} has shape {list(tensor.shape)}, the config implies {want}")
            state[name] = tensor.to(torch.float32 if name.endswith(keep32) else compute)
            if progress is not None:
                progress(done, len(sources))
        span.load_state_dict(state, assign=True, strict=True)
        span.rotary = type(span.rotary)(cfg.rope, complex_pairs=cfg.rope_style == "complex")  # real buffer, fp32
        state.clear()  # the span holds the only reference: quantizing then frees each weight
        quantize_span(span, quantize)
        if pack:
            pack_span(span)
            split_span(span)
        return span.eval()


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _dequantize_fp8(
    weight: torch.Tensor,  # [..., N, K] float8
    scale_inv: torch.Tensor,  # [..., ceil(N / bn), ceil(K / bk)] (or one scale)
    block: tuple[int, int] | None,
    name: str,
) -> torch.Tensor:  # [..., N, K] fp32: weight * its block's scale, as transformers' Fp8Dequantize
    w = weight.to(torch.float32)
    s = scale_inv.to(torch.float32)
    if block is None or s.numel() == 1:
        return w * s
    n, k = w.shape[-2:]
    bn, bk = block
    if s.shape[-2:] != (-(-n // bn), -(-k // bk)):
        raise CheckpointError(f"{name}: scales {list(s.shape)} do not tile {[n, k]} in blocks of {[bn, bk]}")
    s = s.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return w * s


def _mxfp4(ts: list[torch.Tensor]) -> torch.Tensor:
    """GPT-OSS MXFP4 experts: [E, out, G, 16] bytes (two e2m1 nibbles, low first) and [E, out, G] e8m0
    exponents -> [E, in, out] fp32 (transposed for ``x @ W``), as transformers' convert_moe_packed_tensors."""
    blocks, scales = ts[0].to(torch.uint8), ts[1].to(torch.int32) - 127
    if blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"mxfp4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32)
    *prefix, groups, width = blocks.shape
    out = torch.empty(*prefix, groups, width * 2, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).to(torch.int)]
    out[..., 1::2] = lut[(blocks >> 4).to(torch.int)]
    out = torch.ldexp(out, scales[..., None])
    return out.reshape(*prefix, groups * width * 2).transpose(1, 2).contiguous()
