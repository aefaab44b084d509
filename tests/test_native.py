"""The C kernels (kernels/native.py, kernels/qgemv.c): decode-sized int8/int4/bf16-weight matmuls,
RMSNorm, a MoE layer's quantized experts and a decode step's attention."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kernels import clib, native
from kernels.measure import relative_error
from kernels.quant import (
    Bf16Weight,
    Int4Weight,
    Int8Weight,
    dequantize,
    linear,
    linear_fast,
    linear_reference,
    quantize,
)

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler here: torch's kernels run instead")

# Both sum in fp32 after one dequantization; they differ only in the order of the sums.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
SHAPES = [(160, 96), (64, 1024), (4099, 64), (96, 37), (192, 128), (5632, 256), (96, 64), (352, 160)]


def _gemv(x: torch.Tensor, q: object) -> torch.Tensor:
    return _run(native.library(), x, q)


def _run(lib: object, x: torch.Tensor, q: object) -> torch.Tensor:
    """The C matmul of `q`'s kind in the library `lib`."""
    run = native._bf16 if isinstance(q, Bf16Weight) else native._int8 if isinstance(q, Int8Weight) else native._int4
    y = run(lib, x, q)  # type: ignore[arg-type]
    assert y is not None
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_kernels_match_the_dequantize_then_matmul_reference(mode: str, dtype: torch.dtype, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    x = torch.randn(2, 3, k, generator=g).to(dtype)
    q = quantize(w, mode)  # int4 falls back to int8 where K is not a multiple of the group
    got, want = _gemv(x, q), linear_reference(x, q)
    assert got.shape == want.shape == (2, 3, n) and got.dtype == dtype
    assert relative_error(want, got) <= TOLERANCE[dtype]
    if dtype != torch.float32:  # rounded to the dtype once: at most one step apart anywhere
        step = want.float().abs().clamp(min=1e-3) * (2**-7 if dtype == torch.bfloat16 else 2**-10)
        if mode == "int4" and dtype == torch.bfloat16 and isinstance(q, Int4Weight):
            step = step + _integer_x_bound(x, q)
        assert bool(((got.float() - want.float()).abs() <= step * 1.01 + 1e-6).all())


def _integer_x_bound(x: torch.Tensor, q: Int4Weight) -> torch.Tensor:
    """How far int4's integer path for bf16 x (qgemv.c, int4_block_int) may move an output: each
    x rounded to a multiple of 2^e with its group's largest |x| below 2^(e+14), so off by at most
    that largest |x| times 2^-14, times the |w| it meets."""
    k, n = x.shape[-1], q.shape[0]
    top = x.float().reshape(*x.shape[:-1], k // q.group, q.group).abs().amax(-1)  # [..., groups]
    w = dequantize(q).abs().reshape(n, k // q.group, q.group).sum(-1)  # [N, groups]
    return (top * 2**-14) @ w.T  # [..., N]


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_a_rows_bits_do_not_depend_on_its_batch_or_the_thread_count(mode: str) -> None:
    g = torch.Generator().manual_seed(5)
    q = quantize(torch.randn(1000, 512, generator=g).to(torch.bfloat16), mode)
    x = torch.randn(7, 512, generator=g).to(torch.bfloat16)
    batch = _gemv(x, q)
    for i in range(7):
        assert torch.equal(_gemv(x[i : i + 1], q), batch[i : i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_gemv(x, q), batch)
    finally:
        torch.set_num_threads(threads)


def test_infinities_and_nans_come_out_as_torch_rounds_them() -> None:
    ones = quantize(torch.ones(64, 32, dtype=torch.bfloat16), "int8")
    for value in (float("inf"), float("-inf")):
        y = _gemv(torch.full((1, 32), value, dtype=torch.bfloat16), ones)
        assert torch.equal(y, torch.full((1, 64), value, dtype=torch.bfloat16))
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    x[0, 3] = float("nan")
    assert bool(_gemv(x, ones).isnan().all())
    assert torch.equal(_gemv(torch.zeros(1, 32, dtype=torch.bfloat16), ones), torch.zeros(1, 64, dtype=torch.bfloat16))


def _gemv_of(mode: str) -> object:
    return {"int8": native.int8_gemv, "int4": native.int4_gemv, "bf16": native.bf16_gemv}[mode]


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_decode_calls_take_the_c_kernels_and_prefill_takes_torchs(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    q = quantize(torch.randn(192, 128, generator=g).to(torch.bfloat16), mode)
    decode, prefill = torch.randn(1, 128, generator=g), torch.randn(native.MAX_ROWS + 1, 128, generator=g)
    expected = _gemv(decode.to(torch.bfloat16), q)
    calls: list[int] = []
    for name in ("int8_gemv", "int4_gemv", "bf16_gemv"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda x, w, real=real: calls.append(x.shape[-2]) or real(x, w))
    assert torch.equal(linear(decode.to(torch.bfloat16), q), expected)
    linear_fast(prefill.to(torch.bfloat16), q)
    assert calls == [1]  # the prefill went to torch's kernel
    assert _gemv_of(mode)(decode, q) is None  # type: ignore[operator]  # fp32 x, bf16 scales (bf16: a span of bf16 compute)


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_a_quantized_projection_decodes_straight_on_the_c_kernel(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.qspan import QuantLinear

    g = torch.Generator().manual_seed(12)
    q = quantize(torch.randn(192, 128, generator=g).to(torch.bfloat16), mode)
    bias = torch.randn(192, generator=g).to(torch.bfloat16)
    projection = QuantLinear(q, bias)  # type: ignore[arg-type]
    decode, prefill = (torch.randn(1, t, 128, generator=g).to(torch.bfloat16) for t in (1, native.MAX_ROWS + 1))
    rows: list[int] = []
    real = native.gemv
    monkeypatch.setattr(native, "gemv", lambda x, *w: rows.append(x.shape[-2]) or real(x, *w))
    assert torch.equal(projection(decode), linear(decode, q) + bias)  # the same kernel, without the dispatch
    torch.testing.assert_close(projection(prefill), linear(prefill, q) + bias)
    assert rows == [1]  # the prefill went the way of linear (torch's kernel)


def _fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path))
    native._library.cache_clear()
    native.available.cache_clear()


@pytest.fixture
def rebuilt() -> object:
    yield
    native._library.cache_clear()
    native.available.cache_clear()


def test_the_library_is_built_once_into_the_cache_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebuilt: object
) -> None:
    _fresh(monkeypatch, tmp_path)
    assert native.available()
    built = list((tmp_path / "kernels").glob("qgemv-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setattr(clib, "build", lambda *_: pytest.fail("rebuilt a library that was in the cache"))
    assert native.available() and built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("how", ["env", "no compiler", "broken compiler"])
def test_without_the_library_torchs_kernels_run(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, rebuilt: object
) -> None:
    _fresh(monkeypatch, tmp_path)
    if how == "env":
        monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    elif how == "no compiler":
        monkeypatch.setattr(clib, "compiler", lambda: None)
    else:
        monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.INFO, logger="kernels.native"):
        assert not native.available()
    if how == "broken compiler":
        assert "torch's kernels run instead" in caplog.text
    q = quantize(torch.randn(64, 64).to(torch.bfloat16), "int8")
    x = torch.randn(1, 64).to(torch.bfloat16)
    assert native.int8_gemv(x, q) is None
    assert torch.equal(linear_fast(x, q), torch._weight_int8pack_mm(x, q.codes, q.scales))


def test_a_library_that_disagrees_with_the_reference_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebuilt: object
) -> None:
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setattr(native, "_int4", lambda lib, x, w: torch.zeros(*x.shape[:-1], w.packed.shape[0], dtype=x.dtype))
    assert not native.available()


@pytest.mark.parametrize("kernel", ["_moe", "_attend", "_route"])
def test_a_library_whose_moe_attention_or_routing_disagrees_is_not_used(
    kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebuilt: object
) -> None:
    _fresh(monkeypatch, tmp_path)
    real = getattr(native, kernel)

    def wrong(*args: object) -> object:
        y = real(*args)
        return tuple(map(torch.zeros_like, y)) if isinstance(y, tuple) else torch.zeros_like(y)

    monkeypatch.setattr(native, kernel, wrong)
    assert not native.available()


@pytest.mark.parametrize(("flag", "without"), [("avx512f", ("-mno-avx512f",)), ("avx2", ("-mno-avx512f", "-mno-avx2"))])
def test_the_simd_paths_give_the_portable_loops_bits(flag: str, without: tuple[str, ...], tmp_path: Path) -> None:
    if flag not in clib.cpu_flags().split():
        pytest.skip(f"this CPU has no {flag}: its paths are not built here")
    cc = clib.compiler()
    assert cc is not None
    portable = tmp_path / "portable.so"
    clib.build(cc, portable, without)  # the same source as a CPU without them builds it
    lib = clib.load(portable)
    g = torch.Generator().manual_seed(9)
    for n, k in ((4096, 512), (192, 96), (100, 64), (160, 64)):
        for dtype in (torch.bfloat16, torch.float32):
            w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(3, k, generator=g).to(dtype)
            for mode in ("int8", "int4", "bf16"):
                q = quantize(w, mode)
                assert torch.equal(_run(lib, x, q), _gemv(x, q)), (mode, dtype, n, k)
    for mode in ("int8", "int4", "bf16"):
        gate_up, down = _stacks(mode, torch.bfloat16, 6, 160, 96, g)
        x = torch.randn(3, 160, generator=g).bfloat16()
        ids, weights = _routing(3, 6, 2, g)
        assert torch.equal(native._moe(lib, x, ids, weights, gate_up, down), native.moe(x, ids, weights, gate_up, down))  # type: ignore[arg-type]
    q, k, v = (torch.randn(1, h, s, 40, generator=g).bfloat16() for h, s in ((8, 1), (2, 33), (2, 33)))
    sinks = torch.randn(8, generator=g)
    assert torch.equal(native._attend(lib, q, k, v, 0.1, sinks), native.attend(q, k, v, 0.1, sinks))  # type: ignore[arg-type]
    x, w = torch.randn(3, 100, generator=g).bfloat16(), torch.randn(60, 100, generator=g).bfloat16()
    for a, b in zip(native._route(lib, x, w, 4, True, False), native.route(x, w, 4, True, False), strict=True):  # type: ignore[arg-type]
        assert torch.equal(a, b)
    q, k = torch.randn(2, 1, 8, 40, generator=g).bfloat16(), torch.randn(2, 1, 2, 40, generator=g).bfloat16()
    cos, sin = torch.randn(2, 1, 40, generator=g).bfloat16(), torch.randn(2, 1, 40, generator=g).bfloat16()
    q2, k2 = q.clone(), k.clone()
    assert native._rope(lib, q, k, cos, sin) and native.rope(q2, k2, cos, sin)
    assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cast_after_weight", [False, True])
def test_rmsnorm_in_one_call_matches_the_modules_ops(dtype: torch.dtype, cast_after_weight: bool) -> None:
    from kernels.layers import RMSNorm

    g = torch.Generator().manual_seed(7)
    for h in (1000, 64, 37):
        norm = RMSNorm(h, 1e-5, cast_after_weight)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(h, generator=g))
        if not cast_after_weight:
            norm.weight.data = norm.weight.data.to(dtype)  # GPT-OSS keeps fp32 weights and casts after them
        x = (torch.randn(2, 5, h, generator=g) * 3).to(dtype)
        want = norm(x)
        norm.exact = False
        got = norm(x)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-5)
        if dtype != torch.float32:  # the same roundings: equal but where fp32 sums tie differently
            assert (got == want).float().mean() > 0.99
        strided = x.transpose(0, 1)  # not contiguous: the module's own ops, the same numbers
        torch.testing.assert_close(
            norm(strided), want.transpose(0, 1), rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-5
        )
    assert native.rmsnorm(x, torch.ones(h, dtype=torch.float64), 1e-5, True) is None  # a dtype the C file lacks


def test_a_library_whose_rmsnorm_disagrees_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebuilt: object
) -> None:
    _fresh(monkeypatch, tmp_path)
    real = clib.load

    def broken(path: Path) -> object:
        lib = real(path)

        class Wrong:  # the matmuls as built, an RMSNorm that writes nothing
            moemesh_int8_gemv = lib.moemesh_int8_gemv
            moemesh_int4_gemv = lib.moemesh_int4_gemv
            moemesh_bf16_gemv = lib.moemesh_bf16_gemv
            moemesh_dequantize = lib.moemesh_dequantize

            @staticmethod
            def moemesh_rmsnorm(*args: object) -> int:
                return 0

        return Wrong()

    monkeypatch.setattr(clib, "load", broken)
    assert not native.available()


def test_a_library_whose_dequantizer_disagrees_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebuilt: object
) -> None:
    _fresh(monkeypatch, tmp_path)
    real = clib.load

    class Wrong:  # every kernel as built but the dequantizer, which writes nothing
        def __init__(self, lib: object) -> None:
            self.lib = lib

        def __getattr__(self, name: str) -> object:
            return getattr(self.lib, name)

        @staticmethod
        def moemesh_dequantize(*args: object) -> int:
            return 0

    monkeypatch.setattr(clib, "load", lambda path: Wrong(real(path)))
    assert not native.available()


# ---- a MoE layer's quantized experts in one call (native.moe) ------------------------------

EXPERT_SHAPES = [(4, 64, 64), (8, 96, 160), (6, 160, 96)]  # (experts, hidden, intermediate): tails in both


def _stacks(mode: str, dtype: torch.dtype, e: int, h: int, i: int, g: torch.Generator) -> tuple[object, object]:
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(dtype)
    down = (torch.randn(e, h, i, generator=g) / i**0.5).to(dtype)
    return quantize(gate_up, mode), quantize(down, mode)


def _routing(m: int, e: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)])
    return ids, torch.softmax(torch.randn(m, k, generator=g), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
@pytest.mark.parametrize(("e", "h", "i"), EXPERT_SHAPES)
def test_moe_in_one_call_matches_the_reference_experts(mode: str, dtype: torch.dtype, e: int, h: int, i: int) -> None:
    import torch.nn.functional as F

    from kernels.moe import experts_reference
    from kernels.quant import dequantize

    g = torch.Generator().manual_seed(e * h + i)
    gate_up, down = _stacks(mode, dtype, e, h, i, g)
    for m, k in ((1, 2), (5, 2), (native.MAX_ROWS, 3)):
        x = torch.randn(m, h, generator=g).to(dtype)
        ids, weights = _routing(m, e, k, g)
        got = native.moe(x, ids, weights, gate_up, down)  # type: ignore[arg-type]
        assert got is not None and got.shape == (m, h) and got.dtype == dtype
        want = experts_reference(x.float(), ids, weights, dequantize(gate_up), dequantize(down), F.silu)  # type: ignore[arg-type]
        # fp32 sums of one dequantization; bf16/fp16 round h, each expert's output and each sum
        assert (
            relative_error(want, got.float()) <= {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        )


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_a_tokens_moe_bits_do_not_depend_on_its_batch_or_the_thread_count(mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    gate_up, down = _stacks(mode, torch.bfloat16, 8, 256, 512, g)
    x = torch.randn(7, 256, generator=g).bfloat16()
    ids, weights = _routing(7, 8, 2, g)
    ids[3] = ids[1]  # two tokens on the same experts: an expert's rows are batched
    batch = native.moe(x, ids, weights, gate_up, down)  # type: ignore[arg-type]
    assert batch is not None
    for i in range(7):
        assert torch.equal(
            native.moe(x[i : i + 1], ids[i : i + 1], weights[i : i + 1], gate_up, down), batch[i : i + 1]
        )  # type: ignore[arg-type]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.moe(x, ids, weights, gate_up, down), batch)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)


def test_moe_in_one_call_declines_what_it_does_not_take() -> None:
    g = torch.Generator().manual_seed(4)
    gate_up, down = _stacks("int8", torch.bfloat16, 4, 64, 64, g)
    x = torch.randn(2, 64, generator=g).bfloat16()
    ids, weights = _routing(2, 4, 2, g)
    assert native.moe(x, ids, weights, gate_up, down) is not None  # type: ignore[arg-type]
    many = torch.randn(native.MAX_ROWS + 1, 64, generator=g).bfloat16()
    assert native.moe(many, *_routing(native.MAX_ROWS + 1, 4, 2, g), gate_up, down) is None  # type: ignore[arg-type]
    assert native.moe(x.float(), ids, weights, gate_up, down) is None  # type: ignore[arg-type]  # not the scales' dtype
    int4_up, _ = _stacks("int4", torch.bfloat16, 4, 64, 64, g)
    assert native.moe(x, ids, weights, int4_up, down) is None  # type: ignore[arg-type]  # unlike stacks
    bad = ids.clone()
    bad[0, 0] = 4  # no such expert: refused in C, not read out of bounds
    assert native.moe(x, bad, weights, gate_up, down) is None  # type: ignore[arg-type]


# ---- a decode step's attention in one call (native.attend) ---------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(8, 2, 64), (4, 4, 40), (6, 1, 128)])
def test_attention_in_one_call_matches_the_reference(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    from kernels.attention import attention_reference, attention_sinks

    g = torch.Generator().manual_seed(hq * d)
    for s in (1, 17, 300):
        q = torch.randn(1, hq, 1, d, generator=g).to(dtype)
        cache = torch.randn(2, 1, hkv, s + 5, d, generator=g).to(dtype)  # a cache with room to spare
        k, v = cache[0, :, :, :s], cache[1, :, :, :s]  # views, as the cache hands them over
        sinks = torch.randn(hq, generator=g)
        for want, got in (
            (attention_reference(q.float(), k.float(), v.float(), d**-0.5), native.attend(q, k, v, d**-0.5)),
            (attention_sinks(q.float(), k.float(), v.float(), d**-0.5, sinks), native.attend(q, k, v, d**-0.5, sinks)),
        ):
            assert got is not None and got.shape == (1, hq, 1, d) and got.dtype == dtype
            tolerance = 2**-8 if dtype == torch.bfloat16 else 2**-11 if dtype == torch.float16 else 1e-6
            torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=1e-6)


def test_attention_in_one_call_is_thread_invariant_and_declines_what_it_does_not_take() -> None:
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, h, s, 64, generator=g).bfloat16() for h, s in ((16, 1), (4, 200), (4, 200)))
    one = native.attend(q, k, v, 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.attend(q, k, v, 0.125), one)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    assert native.attend(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), 0.125) is None
    assert native.attend(torch.randn(1, 16, 2, 64).bfloat16(), k, v, 0.125) is None  # two query tokens
    assert native.attend(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, 0.125) is None  # strided positions
    assert native.attend(q.double(), k.double(), v.double(), 0.125) is None


def test_quantized_spans_take_the_one_call_moe_attention_rotary_and_routing_at_decode(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shards import Checkpoint

    span = Checkpoint(tiny_models["mixtral"]).load_span(0, 4, dtype=torch.bfloat16, quantize="int4")
    monkeypatch.setattr(span, "_fused_decode", lambda first, last: None)  # op by op (tests/test_fused.py: in one call)
    calls = {"moe": 0, "attend": 0, "rope": 0, "route": 0}
    for name in calls:
        real = getattr(native, name)

        def counted(*args: object, _real: object = real, _name: str = name) -> object:
            calls[_name] += 1
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(native, name, counted)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(8))
    cache = span.new_cache(8)
    span(ids[:, :5], cache, 0)
    calls.update(moe=0, attend=0, rope=0, route=0)
    fast = span(ids[:, 5:], cache, 5)
    assert calls == {"moe": 4, "attend": 4, "rope": 4, "route": 4}  # one of each per layer
    for name in ("moe", "attend", "route"):
        monkeypatch.setattr(native, name, lambda *args: None)
    monkeypatch.setattr(native, "rope", lambda *args: False)
    plain = span(ids[:, 5:], cache, 5)  # the same step on torch's ops
    assert relative_error(plain, fast) < 2e-2
    assert bool(fast.isfinite().all())


def test_batched_decode_rows_of_a_quantized_span_equal_lone_decodes(tiny_models: dict[str, Path]) -> None:
    from shards import Checkpoint

    span = Checkpoint(tiny_models["mixtral"]).load_span(0, 4, dtype=torch.bfloat16, quantize="int8")
    prompts = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(9))
    caches = [span.new_cache(8) for _ in range(3)]
    lone = []
    for row, cache in zip(prompts, caches, strict=True):
        span(row[None, :3], cache, 0)
        lone.append(span(row[None, 3:], cache, 3))
    batched = span.decode(prompts[:, 3:], caches, [3, 3, 3])  # the same step again, the three sessions at once
    assert torch.equal(batched, torch.cat(lone))


# ---- rotary embedding and softmax routing in one call (native.rope, native.route) ----------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_in_one_call_matches_apply_rotary(dtype: torch.dtype) -> None:
    from kernels.rope import apply_rotary

    g = torch.Generator().manual_seed(10)
    for b, t, hq, hk, d in ((1, 1, 16, 4, 64), (2, 3, 4, 4, 10), (3, 1, 6, 2, 128)):
        q, k = torch.randn(b, t, hq, d, generator=g).to(dtype), torch.randn(b, t, hk, d, generator=g).to(dtype)
        angles = torch.rand(b, t, d // 2, generator=g) * 6
        cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
        want = apply_rotary(q.float().transpose(1, 2), k.float().transpose(1, 2), cos.float(), sin.float())
        got_q, got_k = q.clone(), k.clone()
        assert native.rope(got_q, got_k, cos, sin)
        tolerance = 2**-8 if dtype == torch.bfloat16 else 2**-11 if dtype == torch.float16 else 1e-6
        for got, ref in zip((got_q, got_k), want, strict=True):
            torch.testing.assert_close(got.transpose(1, 2).float(), ref, rtol=tolerance, atol=1e-6)
    shared = cos[:1]  # one row of angles for every row of q: the module's broadcast, not this kernel's
    untouched = q.clone()
    assert not native.rope(q, k, shared, sin[:1]) and torch.equal(q, untouched)
    assert not native.rope(q.transpose(0, 1), k, cos, sin)  # not contiguous


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("in_model_dtype", [True, False])
def test_routing_in_one_call_matches_the_softmax_router(normalize: bool, in_model_dtype: bool) -> None:
    from kernels.moe import route

    g = torch.Generator().manual_seed(11)
    for m, e, k, h in ((1, 8, 2, 1024), (5, 60, 4, 96), (native.MAX_ROWS, 4, 4, 37)):
        x, w = torch.randn(m, h, generator=g).bfloat16(), torch.randn(e, h, generator=g).bfloat16()
        got = native.route(x, w, k, normalize, in_model_dtype)
        assert got is not None
        weights, ids = got
        want_weights, want_ids = route(x.float(), w.float(), k, normalize, False)  # all in fp32
        assert torch.equal(ids, want_ids)
        assert weights.dtype == (torch.bfloat16 if in_model_dtype else torch.float32)
        torch.testing.assert_close(weights.float(), want_weights, rtol=2**-8 if in_model_dtype else 1e-5, atol=1e-6)
    assert native.route(torch.randn(native.MAX_ROWS + 1, 37).bfloat16(), w, 2, True, False) is None
    assert native.route(x.double(), w, 2, True, False) is None
