"""Weight-only quantization: packing, the fast kernels against their reference, quantized spans."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES

from kernels import (
    Int4Weight,
    Int8Weight,
    QuantLinear,
    QuantTensor,
    dequantize,
    experts_grouped,
    experts_reference,
    layer_errors,
    linear,
    linear_fast,
    linear_reference,
    native,
    quantize,
    quantize_span,
    relative_error,
    route,
    weight_bytes_per_token,
)
from kernels.attention import attention_decode_fp32, attention_sdpa
from kernels.layers import Attention, LatentAttention, MoEBlock, RMSNorm
from kernels.moe import linear_fp32
from kernels.quant import _int4_layout_ok, pack_int4, unpack_int4
from shards import Checkpoint

# Tolerances of the packed kernels against the reference: both dequantize in fp32, but the
# kernels sum in another order (and may keep partial sums in fp32 before the one rounding).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}


@pytest.mark.parametrize(("n", "k"), [(64, 32), (96, 64), (48, 32), (16, 64), (320, 96)])
def test_int4_packing_is_torchs_cpu_layout_and_unpacks(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (3, n, k), generator=g, dtype=torch.int32)  # a stack of 3 experts
    packed = pack_int4(q)
    assert packed.shape == (3, n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed).int(), q)
    if not _int4_layout_ok():
        pytest.skip("this torch build's int4 CPU packer uses another layout: the reference path runs instead")
    for e in range(3):
        assert torch.equal(packed[e], torch._convert_weight_to_int4pack_for_cpu(q[e], 1))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantization_error_is_within_half_a_step(mode: str) -> None:
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(1))
    q = quantize(w, mode)
    error = (dequantize(q) - w).abs()  # [N, K]
    if isinstance(q, Int8Weight):
        step = q.scales.float()[:, None]  # [N, 1]
    else:
        assert isinstance(q, Int4Weight)
        step = q.scale_zeros[..., 0].float().t().repeat_interleave(q.group, dim=1)  # [N, K]
    assert bool((error <= step / 2 * (1 + 1e-5) + 1e-6).all())
    assert relative_error(w, dequantize(q)) < (0.01 if mode == "int8" else 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("rows", [1, 7])
def test_fast_kernels_match_the_dequantize_then_matmul_reference(mode: str, dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(192, 128, generator=g) / 128**0.5).to(dtype)
    x = torch.randn(2, rows, 128, generator=g).to(dtype)
    q = quantize(w, mode)
    fast, ref = linear_fast(x, q), linear_reference(x, q)
    assert fast.shape == ref.shape == (2, rows, 192) and fast.dtype == ref.dtype == dtype
    torch.testing.assert_close(fast, ref, **TOLERANCE[dtype])
    assert torch.equal(linear(x, q), fast)  # the dispatcher takes the fast path on the CPU
    assert torch.equal(linear(x, w), F.linear(x, w))  # and passes plain weights to F.linear


def test_bf16_weights_are_the_rounded_weights_and_keep_through_dtype_casts() -> None:
    from kernels.quant import Bf16Weight

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    q = quantize(w, "bf16")
    assert isinstance(q, Bf16Weight) and q.bits.dtype == torch.int16 and q.scales.dtype == torch.float32
    assert torch.equal(dequantize(q), w.to(torch.bfloat16).float())  # round to nearest even, once
    layer = QuantLinear(q, None)
    layer.half()  # the compute dtype moves; the weight's bits do not
    assert layer.weight.scales.dtype == torch.float16 and torch.equal(layer.weight.data, q.bits)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3)).half()
    torch.testing.assert_close(layer(x), linear_reference(x, q), rtol=2e-3, atol=2e-3)


def test_int4_falls_back_to_int8_where_the_group_does_not_fit() -> None:
    assert isinstance(quantize(torch.randn(64, 48), "int4"), Int8Weight)  # K = 48: no group of 32
    assert isinstance(quantize(torch.randn(64, 64), "int4"), Int4Weight)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(torch.randn(4, 4), "int3")


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_quantized_experts_grouped_match_the_reference_exactly(mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 64, generator=g)
    gate_up, down = torch.randn(8, 2 * 32, 64, generator=g), torch.randn(8, 64, 32, generator=g)
    weights, ids = route(x, torch.randn(8, 64, generator=g), 2, normalize=True, weights_in_model_dtype=False)
    qg, qd = quantize(gate_up, mode), quantize(down, mode)
    fast = experts_grouped(x, ids, weights, qg, qd, F.silu)
    assert torch.equal(fast, experts_reference(x, ids, weights, qg, qd, F.silu))
    plain = experts_reference(x, ids, weights, dequantize(qg), dequantize(qd), F.silu)  # the codes' meaning
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_spans_split_in_two_match_one_quantized_span_exactly(
    family: str, mode: str, tiny_models: dict[str, Path]
) -> None:
    checkpoint = Checkpoint(tiny_models[family])
    whole = checkpoint.load_span(0, 4, quantize=mode)
    parts = [checkpoint.load_span(0, 2, quantize=mode), checkpoint.load_span(2, 4, quantize=mode)]
    assert whole.quantization == mode and all(p.quantization == mode for p in parts)
    assert not any(isinstance(m, torch.nn.Linear) for m in whole.modules())  # every projection, the head too
    assert any(isinstance(m, QuantLinear) for m in whole.modules())
    if family != "llama":
        assert any(isinstance(m, QuantTensor) for m in whole.modules())  # the fused experts
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(11))
    whole_cache, caches = whole.new_cache(32), [p.new_cache(32) for p in parts]
    position = 0
    for chunk in (ids[:, :5], ids[:, 5:10], ids[:, 10:11], ids[:, 11:]):  # prefill, chunked prefill, decode
        expected = whole(chunk, whole_cache, position)
        h = chunk
        for part, cache in zip(parts, caches, strict=True):
            h = part(h, cache, position)
        position += chunk.shape[1]
        assert torch.equal(h, expected), f"max abs diff {(h - expected).abs().max()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_span_stays_close_to_full_precision(family: str, tiny_models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(tiny_models[family])
    full = checkpoint.load_span(0, 4)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    errors = {mode: layer_errors(full, checkpoint.load_span(0, 4, quantize=mode), ids) for mode in ("int8", "int4")}
    assert len(errors["int8"]) == len(errors["int4"]) == 4
    assert max(errors["int8"]) < 0.05 and max(errors["int4"]) < 0.5
    assert sum(errors["int8"]) < sum(errors["int4"])


def test_bf16_quantized_span_decodes_in_batches(tiny_models: dict[str, Path]) -> None:
    span = Checkpoint(tiny_models["mixtral"]).load_span(0, 4, dtype=torch.bfloat16, quantize="int4")
    caches = [span.new_cache(8) for _ in range(2)]
    for cache, token in zip(caches, (3, 5), strict=True):
        span(torch.tensor([[token]]), cache, 0)
    logits = span.decode(torch.tensor([[7], [9]]), caches, [1, 1])
    assert logits.shape == (2, 1, 256) and logits.dtype == torch.bfloat16 and bool(logits.isfinite().all())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_quantized_spans_decode_attention_in_fp32_and_full_precision_ones_do_not(
    family: str, tiny_models: dict[str, Path], variant_models: dict[str, Path]
) -> None:
    checkpoint = Checkpoint(variant_models.get(family) or tiny_models[family])
    plain, quantized = (checkpoint.load_span(0, 2, dtype=torch.bfloat16, quantize=m) for m in ("none", "int8"))
    kinds = lambda span, *types: [m for m in span.modules() if isinstance(m, types)]  # noqa: E731
    attentions = lambda span: kinds(span, Attention, LatentAttention)  # noqa: E731
    assert len(attentions(plain)) == len(plain.layers)
    assert all(m.exact for m in attentions(plain))  # bound to transformers' bits
    assert not any(m.exact for m in attentions(quantized))
    norms = lambda span: kinds(span, RMSNorm)  # noqa: E731
    assert norms(plain) and all(m.exact for m in norms(plain))
    assert not any(m.exact for m in norms(quantized))  # one C call each (kernels.native.rmsnorm)
    blocks = lambda span: kinds(span, MoEBlock)  # noqa: E731
    assert all(m.exact for m in blocks(plain)) and not any(m.exact for m in blocks(quantized))
    assert blocks(plain) or family == "llama"
    x, w, b = (
        torch.randn(*shape, generator=torch.Generator().manual_seed(5)).bfloat16() for shape in ((3, 64), (8, 64), (8,))
    )
    for bias in (None, b):
        fast = linear_fp32(x, w, bias)
        assert fast.dtype == torch.bfloat16
        torch.testing.assert_close(fast, F.linear(x, w, bias), rtol=1.6e-2, atol=2e-2)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 8, 1, 16, generator=g).bfloat16()
    k, v = torch.randn(1, 2, 9, 16, generator=g).bfloat16(), torch.randn(1, 2, 9, 16, generator=g).bfloat16()
    fast = attention_decode_fp32(q, k, v, 0.25)  # in fp32 (in C where built), rounded once
    torch.testing.assert_close(
        fast.float(), attention_sdpa(q.float(), k.float(), v.float(), 0.25), rtol=2**-8, atol=1e-6
    )
    torch.testing.assert_close(fast, attention_sdpa(q, k, v, 0.25), rtol=1.6e-2, atol=1e-2)
    prefill = torch.randn(1, 8, 3, 16, generator=g).bfloat16()  # more than one query: sdpa as it is
    assert torch.equal(attention_decode_fp32(prefill, k, v, 0.25, 0), attention_sdpa(prefill, k, v, 0.25, 0))
    ids = torch.randint(0, 256, (1, 6), generator=g)
    cache = quantized.new_cache(8)
    quantized(ids[:, :5], cache, 0)
    assert bool(quantized(ids[:, 5:], cache, 5).isfinite().all())


def test_weight_bytes_per_token_shrink_with_quantization(tiny_models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(tiny_models["mixtral"])
    cfg = checkpoint.config
    full = checkpoint.load_span(0, 4, dtype=torch.bfloat16)
    h, i, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k
    attention = 2 * h * h + 2 * h * cfg.num_kv_heads * cfg.head_dim
    per_layer = attention + e * h + 3 * h * i * k + 2 * h  # projections, router, top-k experts, norms
    expected = 2 * (cfg.num_layers * per_layer + h + h + cfg.vocab_size * h)  # + an embedding row, norm, head
    assert weight_bytes_per_token(full) == expected
    sizes = {
        mode: weight_bytes_per_token(checkpoint.load_span(0, 4, dtype=torch.bfloat16, quantize=mode))
        for mode in ("bf16", "int8", "int4")
    }
    assert sizes["bf16"] == expected  # a bf16 checkpoint's own weights, without scales
    assert 0.5 < sizes["int8"] / expected < 0.6 and sizes["int4"] < sizes["int8"]


def test_load_span_refuses_an_unknown_quantization(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown quantization"):
        Checkpoint(tiny_models["llama"]).load_span(0, 1, quantize="fp4")
    span = Checkpoint(tiny_models["llama"]).load_span(0, 1)
    quantize_span(span, "none")
    assert span.quantization == "none" and any(isinstance(m, torch.nn.Linear) for m in span.modules())


@pytest.fixture(scope="module")
def more_families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from conftest import build_tiny

    root = tmp_path_factory.mktemp("quant-families")
    names = ("deepseek_v3", "gpt_oss", "qwen2_moe", "olmoe", "granitemoe", "mixtral-swa")
    return {name: build_tiny(name, root / name) for name in names}


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen2_moe", "olmoe", "granitemoe", "mixtral-swa"])
def test_every_family_quantizes_and_its_split_matches_the_whole(
    family: str, mode: str, more_families: dict[str, Path]
) -> None:
    """MLA's latent projections, GPT-OSS's transposed experts, shared experts, windows: all load
    quantized (int4 falling back to int8 where the kernel does not take a shape) and split exactly."""
    checkpoint = Checkpoint(more_families[family])
    n = checkpoint.config.num_layers
    whole = checkpoint.load_span(0, n, torch.float32, quantize=mode)
    parts = [
        checkpoint.load_span(0, 1, torch.float32, quantize=mode),
        checkpoint.load_span(1, n, torch.float32, quantize=mode),
    ]
    assert any(isinstance(m, QuantLinear) for m in whole.modules())
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(3))
    whole_cache, caches = whole.new_cache(32), [p.new_cache(32) for p in parts]
    position = 0
    for chunk in (ids[:, :5], ids[:, 5:8], ids[:, 8:]):
        expected = whole(chunk, whole_cache, position)
        h = chunk
        for part, cache in zip(parts, caches, strict=True):
            h = part(h, cache, position)
        position += chunk.shape[1]
        assert torch.isfinite(expected).all() and torch.equal(h, expected)


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_prefill_takes_the_path_that_was_timed_fastest(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import kernels.quant as kq

    g = torch.Generator().manual_seed(4)
    q = quantize(torch.randn(64, 64, generator=g).bfloat16(), mode)
    x = torch.randn(kq.DEQUANTIZED_ROWS + 8, 64, generator=g).bfloat16()  # prefill-sized: not the C kernels
    assert kq._prefill_path(mode, torch.bfloat16) in ("reference", "torch")
    torch_ok = mode != "int4" or kq._int4_layout_ok()
    assert isinstance(kq._dequantized_prefill(mode, torch.bfloat16), bool)
    monkeypatch.setattr(kq, "_dequantized_prefill", lambda kind, dtype: False)
    monkeypatch.setattr(kq, "_prefill_path", lambda kind, dtype: "reference")
    assert torch.equal(kq.linear_fast(x, q), kq.linear_reference(x, q))
    monkeypatch.setattr(kq, "_prefill_path", lambda kind, dtype: "torch")
    torch.testing.assert_close(kq.linear_fast(x, q), kq.linear_reference(x, q), **TOLERANCE[torch.bfloat16])
    if mode != "int4" or kq._int4_layout_ok():
        assert torch.equal(kq.linear_fast(x, q), kq._torch_prefill(x, q))
    if mode != "bf16" and native.available():
        monkeypatch.setattr(kq, "_dequantized_prefill", lambda kind, dtype: True)
        monkeypatch.setattr(kq, "_prefill_path", lambda kind, dtype: "torch" if torch_ok else "reference")
        fast = kq.linear_fast(x, q)
        assert torch.equal(fast, F.linear(x, dequantize(q, torch.bfloat16)))  # the reference's weight, in bf16
        # that weight is rounded to bf16 once (2^-9 relative), as an unquantized bf16 span's is: its error
        # is bf16's (measured 0.25 % here), not within the fp32-sum tolerance of torch's kernels
        assert relative_error(kq.linear_reference(x, q), fast) < 8e-3
        few = x[: kq.DEQUANTIZED_ROWS - 1]  # too few rows to pay for writing the weight out: the next best
        assert torch.equal(kq.linear_fast(few, q), (kq._torch_prefill if torch_ok else kq.linear_reference)(few, q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(96, 64), (200, 128), (2 * 64 + 6, 96)])  # int4: whole blocks, a tail, both
def test_native_dequantize_gives_the_reference_weight(mode: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    if not native.available():
        pytest.skip("the C kernels are not built here")
    w = quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(5)).to(dtype), mode)
    mine = native.dequantize(w)
    assert mine is not None and mine.shape == shape and torch.equal(mine, dequantize(w, dtype))
