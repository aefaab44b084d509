"""A quantized span's decode step in one C call (kernels.fused): the op-by-op path's bits (int8, int4, bf16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels import SpanModel, fused, native
from kernels.cache import KVCache
from shards import Checkpoint

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels are not built here (no compiler)")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE whose every layer the one call takes (per-head q/k norms, experts of 64)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(3)
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)  # decisive routing
            elif name.endswith("norm.weight"):
                p.normal_(1, 0.3)  # norms that differ from each other (q's and k's too)
    folder = tmp_path_factory.mktemp("qwen3-fused")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def models(tiny_models: dict[str, Path], qwen3: Path) -> dict[str, Path]:
    return {"mixtral": tiny_models["mixtral"], "qwen3_moe": qwen3}


def _span(
    folder: Path, mode: str, dtype: torch.dtype = torch.bfloat16, start: int = 0, end: int | None = None
) -> SpanModel:
    checkpoint = Checkpoint(folder)
    return checkpoint.load_span(start, end or checkpoint.config.num_layers, dtype=dtype, quantize=mode)


def _op_by_op(span: SpanModel, monkeypatch: pytest.MonkeyPatch) -> SpanModel:
    monkeypatch.setattr(span, "_fused_decode", lambda first, last: None)
    return span


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of each one-call step that ran (not declined)."""
    ran: list[int] = []
    real = fused.FusedDecode.__call__

    def counted(self: fused.FusedDecode, h: torch.Tensor, *args: object) -> torch.Tensor | None:
        y = real(self, h, *args)  # type: ignore[arg-type]
        if y is not None:
            ran.append(h.shape[0])
        return y

    monkeypatch.setattr(fused.FusedDecode, "__call__", counted)
    return ran


def _same_cache(a: KVCache, b: KVCache) -> bool:
    n = a.length
    return a.length == b.length and all(
        torch.equal(x[:, :, :n], y[:, :, :n]) for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True)
    )


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_one_call_decode_gives_the_op_by_op_bits(
    models: dict[str, Path], family: str, mode: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, slow = _span(models[family], mode, dtype), _op_by_op(_span(models[family], mode, dtype), monkeypatch)
    ran = _calls(monkeypatch)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    a, b = fast.new_cache(12), slow.new_cache(12)
    assert torch.equal(fast(ids[:, :5], a, 0), slow(ids[:, :5], b, 0))  # prefill: op by op in both
    for position in range(5, 9):  # decode: one call against op by op
        want = slow(ids[:, position : position + 1], b, position)
        got = fast(ids[:, position : position + 1], a, position)
        assert torch.equal(got, want), f"step at {position}"
        assert _same_cache(a, b)
    assert ran == [1, 1, 1, 1]


def test_batched_sessions_at_different_positions_in_one_call(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _span(models["qwen3_moe"], "int4")
    slow = _op_by_op(_span(models["qwen3_moe"], "int4"), monkeypatch)
    ran = _calls(monkeypatch)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (1, n), generator=g) for n in (3, 6, 1)]
    caches = {span: [span.new_cache(10) for _ in prompts] for span in (fast, slow)}
    for span in (fast, slow):
        for prompt, cache in zip(prompts, caches[span], strict=True):
            span(prompt, cache, 0)
    step = torch.randint(0, 256, (3, 1), generator=g)
    positions = [p.shape[1] for p in prompts]
    lone_caches = [fast.new_cache(10) for _ in prompts]
    lone = []
    for prompt, cache, token in zip(prompts, lone_caches, step, strict=True):
        fast(prompt, cache, 0)
        lone.append(fast(token[None], cache, prompt.shape[1]))
    got = fast.decode(step, caches[fast], positions)
    assert torch.equal(got, slow.decode(step, caches[slow], positions))
    assert torch.equal(got, torch.cat(lone))  # a row's bits do not depend on the rows beside it
    assert all(_same_cache(x, y) for x, y in zip(caches[fast], caches[slow], strict=True))
    assert ran == [1, 1, 1, 1, 1, 3]  # the one-token prompt too, then lone steps and the batched one


def test_a_batch_in_one_cache_and_a_pipeline_of_spans(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """forward's rows in one cache (close to op by op, whose attention over a batch is torch's
    SDPA); spans [0, 1) then [1, 3) give the whole span's bits."""
    from kernels.measure import relative_error

    folder = models["qwen3_moe"]
    whole, head, tail = _span(folder, "int8"), _span(folder, "int8", end=1), _span(folder, "int8", start=1)
    slow = _op_by_op(_span(folder, "int8"), monkeypatch)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    ran = _calls(monkeypatch)
    caches = {span: span.new_cache(8, batch=2) for span in (whole, head, tail, slow)}
    hidden = head(ids[:, :4], caches[head], 0)
    tail(hidden, caches[tail], 0)
    whole(ids[:, :4], caches[whole], 0)
    slow(ids[:, :4], caches[slow], 0)
    got = whole(ids[:, 4:], caches[whole], 4)
    assert relative_error(slow(ids[:, 4:], caches[slow], 4), got) < 2e-2
    hidden = head(ids[:, 4:], caches[head], 4)
    kept = hidden.clone()
    assert torch.equal(tail(hidden, caches[tail], 4), got)
    assert torch.equal(hidden, kept)  # the one call works on its own copy of its input
    assert ran == [2, 2, 2]


def test_a_rows_bits_do_not_depend_on_the_thread_count(models: dict[str, Path]) -> None:
    span = _span(models["mixtral"], "int4")
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(5))
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            cache = span.new_cache(8)
            span(ids[:, :4], cache, 0)
            out.append(span(ids[:, 4:], cache, 4))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


def test_what_the_one_call_does_not_take_runs_op_by_op(
    tiny_models: dict[str, Path], models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _span(models["mixtral"], "none")._fused_decode(0, 4) is None  # exact spans: transformers' bits
    assert _span(tiny_models["llama"], "int8")._fused_decode(0, 4) is None  # dense MLPs
    assert _span(tiny_models["qwen3_moe"], "int8")._fused_decode(0, 4) is None  # one dense layer among them
    assert _span(tiny_models["qwen3_moe"], "int4")._fused_decode(0, 4) is None  # int4 gate/up, int8 down (48 wide)
    span = _span(models["mixtral"], "int4")
    plan = span._fused_decode(0, 4)
    assert plan is not None and span._fused_decode(0, 4) is plan  # planned once per layer range
    span.to(torch.float32)
    assert span._fused_decode(0, 4) is not plan  # .to() drops the plans (their pointers)

    span = _span(models["mixtral"], "int8")
    plan = span._fused_decode(0, 4)
    assert plan is not None
    rope = span.rotary(torch.tensor([[3]] * 9), torch.bfloat16)
    nine = [span.new_cache(8) for _ in range(9)]
    assert plan(torch.randn(9, 1, 64).bfloat16(), rope, nine, [3] * 9) is None  # more rows than MAX_ROWS
    one = span.new_cache(8)
    rope = span.rotary(torch.tensor([[3]]), torch.bfloat16)
    assert plan(torch.randn(1, 1, 64), rope, [one], [3]) is None  # another dtype
    assert plan(torch.randn(1, 2, 64).bfloat16(), rope, [one], [3]) is None  # two tokens
    assert plan(torch.randn(1, 1, 64).bfloat16(), rope, [span.new_cache(8, layers=(0, 2))], [3]) is None
    windowed = KVCache(4, 2, 16, 8, torch.bfloat16, windows=[None, 4, None, None])
    assert plan(torch.randn(1, 1, 64).bfloat16(), rope, [windowed], [3]) is None  # a ring of slots
    assert (
        plan(torch.randn(1, 1, 64).bfloat16(), rope, [KVCache(4, 2, 8, 8, torch.bfloat16)], [3]) is None
    )  # head width
    assert plan(torch.randn(1, 1, 64).bfloat16(), rope, [one], [8]) is None  # past the cache's slots
    assert plan(torch.randn(1, 1, 32).bfloat16(), rope, [one], [3]) is None  # another hidden size
    assert plan(torch.randn(1, 1, 64).bfloat16(), rope, [one], [3]) is not None  # and what it takes
    monkeypatch.setattr(native, "library", lambda: None)
    assert _span(models["mixtral"], "int4")._fused_decode(0, 4) is None  # no library here
