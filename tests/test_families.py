"""Every family and feature beyond the first three reproduces transformers exactly.

Each variant of `conftest.VARIANTS` (rope scaling types, sliding windows, OLMoE, Qwen2-MoE,
Granite-MoE, DeepSeek-V3, GPT-OSS) is split into 2 and 3 spans in one process and compared
with transformers 5.24 (eager experts) under the same chunking: prefill, chunked prefill and
decode steps, past every sliding window. FP8 and MXFP4 checkpoints are written in their real
layouts and compared with transformers' own dequantized model of the same folder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES, VARIANTS, build_tiny, load_reference
from safetensors.torch import load_file, save_file

from kernels import CacheError, KVCache
from shards import Checkpoint, UnsupportedModelError
from shards.hfconfig import FAMILY_DEFAULTS, model_config_from_hf

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = [(0, 5), (5, 11), (11, 12), (12, 13), (13, 20), (20, 21), (21, 22), (22, 26)]  # windows are 4 or 5
SPLITS = {2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}


def _compare(ref: Any, checkpoint: Checkpoint, split: list[tuple[int, int]], dtype: torch.dtype) -> float:
    """Max abs diff of our spans' logits against transformers', chunk by chunk."""
    from transformers.cache_utils import DynamicCache

    spans = [checkpoint.load_span(a, b, dtype) for a, b in split]
    caches = [s.new_cache(64) for s in spans]
    ids = torch.randint(0, 256, (1, CHUNKS[-1][1]), generator=torch.Generator().manual_seed(7))
    ref_cache = DynamicCache(config=ref.config)
    worst = 0.0
    for a, b in CHUNKS:
        with torch.no_grad():
            expected = ref(input_ids=ids[:, a:b], past_key_values=ref_cache, use_cache=True).logits
        h = ids[:, a:b]
        for span, cache in zip(spans, caches, strict=True):
            h = span(h, cache, a)
        assert h.dtype == expected.dtype == dtype
        worst = max(worst, (h.float() - expected.float()).abs().max().item())
    return worst


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_reproduce_transformers_exactly(name: str, parts: int, variant_models: dict[str, Path]) -> None:
    folder = variant_models[name]
    assert _compare(load_reference(folder), Checkpoint(folder), SPLITS[parts], torch.float32) == 0.0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_greedy_tokens_match_transformers(name: str, variant_models: dict[str, Path]) -> None:
    folder = variant_models[name]
    ref = load_reference(folder)
    checkpoint = Checkpoint(folder)
    spans = [checkpoint.load_span(a, b) for a, b in SPLITS[3]]
    caches = [s.new_cache(32) for s in spans]
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14, do_sample=False)
    expected = out[0, prompt.shape[1] :].tolist()
    ours: list[int] = []
    x, position = prompt, 0
    while len(ours) < len(expected):
        h = x
        for span, cache in zip(spans, caches, strict=True):
            h = span(h, cache, position, last_only=True)
        position += x.shape[1]
        ours.append(int(h[0, -1].argmax()))
        x = torch.tensor([[ours[-1]]])
    assert ours == expected


@pytest.mark.parametrize("name", [*FAMILIES, *VARIANTS])
def test_bf16_served_as_bf16_matches_transformers_bf16(
    name: str, tiny_models: dict[str, Path], variant_models: dict[str, Path]
) -> None:
    folder = variant_models.get(name) or tiny_models[name]
    ref = load_reference(folder, dtype=torch.bfloat16)
    assert _compare(ref, Checkpoint(folder), SPLITS[2], torch.bfloat16) == 0.0


def test_default_experts_implementation_matches_up_to_rounding(tiny_models: dict[str, Path]) -> None:
    """The README's number: against transformers' default experts (not eager) fp32 agrees to ~1e-6."""
    from transformers import AutoModelForCausalLM

    folder = tiny_models["qwen3_moe"]
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert _compare(ref, Checkpoint(folder), SPLITS[2], torch.float32) < 1e-5


@pytest.mark.parametrize("name", [*FAMILIES, *VARIANTS])
def test_cache_bytes_is_what_new_cache_allocates(
    name: str, tiny_models: dict[str, Path], variant_models: dict[str, Path]
) -> None:
    checkpoint = Checkpoint(variant_models.get(name) or tiny_models[name])
    span = checkpoint.load_span(1, 4, torch.bfloat16)
    for length, layers in ((1, (0, 3)), (3, (1, 2)), (40, (0, 3)), (40, (2, 3))):
        assert span.cache_bytes(length, layers) == span.new_cache(length, layers=layers).nbytes


def test_sliding_layers_keep_only_their_window_and_refuse_to_rewind_past_it(variant_models: dict[str, Path]) -> None:
    span = Checkpoint(variant_models["gpt_oss"]).load_span(0, 2)  # layer 0 slides (window 4), layer 1 does not
    cache = span.new_cache(64)
    assert [k.shape[2] for k in cache.keys] == [3, 64]
    span(torch.tensor([[1, 2, 3]]), cache, 0)
    span(torch.tensor([[4]]), cache, 2)  # rewinding inside the window is fine
    span(torch.tensor([[5, 6]]), cache, 3)
    with pytest.raises(CacheError, match="cannot rewind"):
        cache.check_step(2, 1)
    mla = Checkpoint(variant_models["deepseek_v3"]).load_span(0, 2).new_cache(10)
    assert [tuple(k.shape) for k in mla.keys] == [(1, 1, 10, 16)] * 2  # the kv latent (kv_lora_rank 16)
    assert [tuple(v.shape) for v in mla.values] == [(1, 1, 10, 8)] * 2  # the shared rotary key
    assert mla.nbytes < KVCache.bytes_for(2, 4, 24, 10, torch.float32)


def test_family_defaults_are_transformers_config_defaults() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for family, ours in FAMILY_DEFAULTS.items():
        cls = CONFIG_MAPPING[family]
        theirs = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        theirs["rope_theta"] = cls.default_theta
        for key, value in ours.items():
            if key in theirs:
                assert theirs[key] == value, f"{family}.{key}: transformers says {theirs[key]!r}, we say {value!r}"


def test_missing_keys_take_the_family_default() -> None:
    minimal = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=96)
    assert model_config_from_hf(dict(minimal, model_type="mixtral")).rms_norm_eps == 1e-5
    assert model_config_from_hf(dict(minimal, model_type="mixtral")).rope.theta == 1e6
    assert model_config_from_hf(dict(minimal, model_type="qwen3_moe")).rms_norm_eps == 1e-6
    gpt_oss = model_config_from_hf(dict(minimal, model_type="gpt_oss"))
    assert gpt_oss.rope.rope_type == "yarn" and gpt_oss.rope.factor == 32.0 and gpt_oss.sliding_layers == (0,)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_other_quantizations_are_refused_in_one_line(method: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "q"
    shutil.copytree(tiny_models["qwen3_moe"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method}}))
    with pytest.raises(UnsupportedModelError, match=f"^not supported: quantization '{method}'"):
        Checkpoint(folder)
    if method == "gptq":  # and the CLI says it in one line, exit 2
        result = subprocess.run(
            [sys.executable, "-m", "node", "serve", "--model", str(folder), "--layers", "0:1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and "not supported: quantization 'gptq'" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- checkpoint formats --------------------------------------------------------------------


def _to_fp8(folder: Path, out: Path, block: int) -> Path:
    """Rewrite `folder` as a block-scaled FP8 checkpoint (the DeepSeek-V3 / Qwen3 FP8 layout):
    every projection weight as float8_e4m3fn plus `weight_scale_inv` [ceil(N/b), ceil(K/b)] fp32,
    embeddings, norms, routers and the head left in bf16."""
    shutil.copytree(folder, out)
    tensors = load_file(str(out / "model.safetensors"))
    written: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        quantize = name.endswith("proj.weight") or name.endswith(("w1.weight", "w2.weight", "w3.weight"))
        if not quantize or "embed" in name or w.dim() != 2:
            written[name] = w.to(torch.bfloat16)
            continue
        n, k = w.shape
        padded = torch.zeros(-(-n // block) * block, -(-k // block) * block)
        padded[:n, :k] = w
        tiles = padded.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [N/b, b, K/b, b]
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [N/b, K/b]
        full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
        written[name] = (w / full).to(torch.float8_e4m3fn)
        written[f"{name}_scale_inv"] = scale.float()
    save_file(written, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def _fp8_reference(w: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """The format's definition: w = fp8 value * the scale of its [block x block] tile."""
    n, k = w.shape
    return w.float() * scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_checkpoints_are_dequantized_exactly(
    family: str, dtype: torch.dtype, tiny_models: dict[str, Path], variant_models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    source = tiny_models.get(family) or variant_models[family]
    folder = _to_fp8(source, tmp_path / f"{family}-fp8", block=16)
    checkpoint = Checkpoint(folder)
    assert checkpoint.compute_dtype == torch.bfloat16  # served in one dtype, not fp8 + bf16 + fp32
    span = checkpoint.load_span(0, 2)
    assert {p.dtype for n, p in span.named_parameters() if "router" not in n and "score_bias" not in n} == {
        torch.bfloat16
    }
    stored = load_file(str(folder / "model.safetensors"))
    q = "model.layers.1.self_attn.o_proj.weight"
    ours = checkpoint.load_span(1, 2, torch.float32).layers[0].self_attn.o_proj.weight
    assert torch.equal(ours, _fp8_reference(stored[q], stored[f"{q}_scale_inv"], 16))
    # transformers on CPU dequantizes the same folder itself: the model it builds is ours, bit for bit
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation="eager").eval()
    assert _compare(ref, checkpoint, SPLITS[2], dtype) == 0.0


def _to_mxfp4(folder: Path, out: Path) -> Path:
    """Rewrite GPT-OSS's experts as MXFP4 (the released layout): `*_blocks` [E, out, in/32, 16] bytes,
    two e2m1 values each (low nibble first), and `*_scales` [E, out, in/32] e8m0 exponents (bias 127)."""
    shutil.copytree(folder, out)
    tensors = load_file(str(out / "model.safetensors"))
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    written = {}
    for name, w in tensors.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            written[name] = w
            continue
        wt = w.transpose(1, 2)  # [E, out, in]
        groups = wt.unflatten(-1, (-1, 32))  # [E, out, G, 32]
        exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-126, 127)
        scaled = groups / torch.exp2(exponent)[..., None]
        nibble = (scaled.abs()[..., None] - values).abs().argmin(-1) | ((scaled < 0).to(torch.int64) << 3)
        pairs = nibble.unflatten(-1, (-1, 2))  # [E, out, G, 16, 2]
        written[f"{name}_blocks"] = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
        written[f"{name}_scales"] = (exponent + 127).to(torch.uint8)
    save_file(written, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_mxfp4_experts_are_dequantized_exactly(
    dtype: torch.dtype, variant_models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    folder = _to_mxfp4(variant_models["gpt_oss"], tmp_path / "gpt_oss-mxfp4")
    checkpoint = Checkpoint(folder)
    stored = load_file(str(folder / "model.safetensors"))
    blocks, scales = (
        stored["model.layers.0.mlp.experts.down_proj_blocks"],
        stored["model.layers.0.mlp.experts.down_proj_scales"],
    )
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    e, o, i = 1, 5, 21  # one weight by the format's definition: nibble i % 2 of byte i // 2 of group i // 32
    byte = int(blocks[e, o, i // 32, (i % 32) // 2])
    value = lut[(byte >> 4) if i % 2 else (byte & 0x0F)] * 2.0 ** (int(scales[e, o, i // 32]) - 127)
    down = checkpoint.load_span(0, 1, torch.float32).layers[0].mlp.down  # [E, I, H]
    assert down[e, i, o] == value
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation="eager").eval()
    assert _compare(ref, checkpoint, SPLITS[2], dtype) == 0.0


def test_fp8_tensors_without_their_quantization_config_are_refused(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = _to_fp8(tiny_models["qwen3_moe"], tmp_path / "fp8", block=16)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="not supported: float8 tensor"):
        Checkpoint(folder).load_span(0, 1)


def test_variants_build_offline(tmp_path: Path) -> None:
    """The tiny variants need nothing but transformers' config classes (no downloads)."""
    folder = build_tiny("granitemoe", tmp_path / "g")
    assert Checkpoint(folder).config.logits_scaling == 8.0


@pytest.mark.parametrize("name", ["gpt_oss", "deepseek_v3", "qwen2_moe", "mixtral-swa", "llama-dynamic"])
def test_batched_decode_matches_each_session_alone(name: str, variant_models: dict[str, Path]) -> None:
    """Continuous batching over sliding windows, latent caches, sinks and per-session dynamic rope."""
    checkpoint = Checkpoint(variant_models[name])
    head, tail = checkpoint.load_span(0, 2), checkpoint.load_span(2, 4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, n), generator=g) for n in (3, 9, 1, 15)]

    def prefill(ids: torch.Tensor) -> tuple[list[KVCache], torch.Tensor]:
        caches = [head.new_cache(32), tail.new_cache(32)]
        logits = tail(head(ids, caches[0], 0), caches[1], 0, last_only=True)
        return caches, logits[:, -1].argmax(-1, keepdim=True)

    alone, batched = [prefill(p) for p in prompts], [prefill(p) for p in prompts]
    for _ in range(6):  # past the windows (4 or 5) for every prompt
        expected = []
        for caches, token in alone:
            position = caches[0].length
            expected.append(tail(head(token, caches[0], position), caches[1], position)[:, -1])
        tokens = torch.cat([token for _, token in batched])  # [B, 1]
        positions = [caches[0].length for caches, _ in batched]
        hidden = head.decode(tokens, [c[0] for c, _ in batched], positions)
        logits = tail.decode(hidden, [c[1] for c, _ in batched], positions)[:, -1]  # [B, V]
        torch.testing.assert_close(logits, torch.cat(expected), rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), torch.cat(expected).argmax(-1))
        alone = [(c, e.argmax(-1, keepdim=True)) for (c, _), e in zip(alone, expected, strict=True)]
        batched = [(c, logits[i : i + 1].argmax(-1, keepdim=True)) for i, (c, _) in enumerate(batched)]


def test_mixed_dtype_checkpoints_are_served_in_one_dtype(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_models["mixtral"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    mixed = {n: t.to(torch.bfloat16) if i % 2 else t for i, (n, t) in enumerate(sorted(tensors.items()))}
    save_file(mixed, str(folder / "model.safetensors"))
    checkpoint = Checkpoint(folder)
    for dtype in (None, torch.bfloat16, torch.float32):
        span = checkpoint.load_span(0, 4, dtype)
        assert {p.dtype for p in span.parameters()} == {dtype or checkpoint.compute_dtype}
        logits = span(torch.tensor([[1, 2, 3]]), span.new_cache(4), 0)
        assert logits.dtype == (dtype or checkpoint.compute_dtype)


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss"])
def test_process_pipelines_reproduce_transformers(name: str, variant_models: dict[str, Path]) -> None:
    """Three serving processes on loopback: latent attention and sinks + sliding windows over the wire."""
    import numpy as np

    from node.client.client import Client
    from node.testing.launch import local_swarm

    folder = variant_models[name]
    ref = load_reference(folder)
    ids = torch.randint(0, 256, (1, CHUNKS[-1][1]), generator=torch.Generator().manual_seed(3))
    from transformers.cache_utils import DynamicCache

    ref_cache = DynamicCache(config=ref.config)
    with torch.no_grad():
        expected = [ref(input_ids=ids[:, a:b], past_key_values=ref_cache, use_cache=True).logits[0] for a, b in CHUNKS]
    prompt = ids[0, :9]
    with torch.no_grad():
        out = ref.generate(
            prompt[None], attention_mask=torch.ones(1, 9, dtype=torch.long), max_new_tokens=12, do_sample=False
        )
    with local_swarm(folder, SPLITS[3]) as servers, Client([s.address for s in servers]) as client:
        with client.session(32) as session:
            for (a, b), want in zip(CHUNKS, expected, strict=True):
                got = session.step(ids[0, a:b].tolist(), last_only=False)
                assert np.abs(got - want.numpy()).max() == 0.0
        ours = list(client.generate(prompt.tolist(), 12, stop_at_eos=False))
    assert ours == out[0, 9:].tolist()


@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_gpt_oss_experts_fast_path_matches_reference_bit_for_bit(tokens: int) -> None:
    from kernels import ClampedSwiGLU, experts_grouped, experts_reference, route_topk_softmax

    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 32, generator=g)
    gate_up, down = torch.randn(8, 32, 48, generator=g), torch.randn(8, 24, 32, generator=g)  # [E, H, 2I], [E, I, H]
    act = ClampedSwiGLU(torch.randn(8, 48, generator=g), torch.randn(8, 32, generator=g), 1.702, 7.0)
    weights, ids = route_topk_softmax(x, torch.randn(8, 32, generator=g), torch.randn(8, generator=g), 2, False)
    assert torch.equal(
        experts_reference(x, ids, weights, gate_up, down, act), experts_grouped(x, ids, weights, gate_up, down, act)
    )
