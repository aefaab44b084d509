"""The serving engine in process: the scheduler's schedule/update contract, batches that fail
step by step, loading off the event loop, and the one lifecycle (signals, drain, grace)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.errors import InvalidRequest, OutOfRange
from node.serve.config import ServerConfig
from node.serve.engine import Engine, Session
from node.serve.lifecycle import Lifecycle
from node.serve.scheduler import Batch, BatchResult, Scheduler
from node.serve.throughput import measure_throughput
from protocol import make_tensor
from protocol.shard_pb2 import Tensor


def _ids(*tokens: int) -> Tensor:
    return make_tensor("int64", [1, len(tokens)], np.array(tokens, dtype=np.int64).tobytes())


def _session(name: str, layers: tuple[int, int] = (0, 2)) -> Session:
    return Session(name, layers[0], layers[1], cache=None)  # type: ignore[arg-type]  (the scheduler never reads it)


def _scheduler(sessions: dict[str, Session], batches: list[Batch]) -> Scheduler:
    async def execute(batch: Batch) -> BatchResult:  # a fake engine: echo each step's input
        batches.append(batch)
        return BatchResult(tuple(s.msg for s in batch.steps), batched=len(batch.steps) if batch.decode else 0)

    return Scheduler(ServerConfig(Path("unused"), 0, 2, max_batch=3), sessions, execute)


def test_one_token_steps_over_the_same_layers_batch_and_a_prefill_runs_alone() -> None:
    a, b, c, d = (_session(n) for n in "abcd")
    e = _session("e", (0, 1))
    sessions = {s.id: s for s in (a, b, c, d, e)}
    batches: list[Batch] = []

    async def main() -> list[Any]:
        scheduler = _scheduler(sessions, batches)
        runner = asyncio.create_task(scheduler.run())
        futures = [
            scheduler.submit(d, 0, _ids(1, 2, 3, 4), False),  # a prefill chunk: alone
            scheduler.submit(a, 0, _ids(5), False),
            scheduler.submit(e, 0, _ids(6), False),  # other layers: another batch
            scheduler.submit(b, 0, _ids(7), False),
            scheduler.submit(a, 1, _ids(8), False),  # a's next step: not in the batch of its first
            scheduler.submit(c, 0, _ids(9), False),
            scheduler.submit(d, 4, _ids(10), False),  # over max_batch=3: the next batch
        ]
        results = await asyncio.gather(*futures)
        runner.cancel()
        return results

    results = asyncio.run(main())
    assert [list(r.data) for r in results] == [
        list(_ids(*t).data) for t in ([1, 2, 3, 4], [5], [6], [7], [8], [9], [10])
    ]
    assert [(tuple(s.session.id for s in b.steps), b.layers, b.decode) for b in batches] == [
        (("d",), (0, 2), False),
        (("a", "b", "c"), (0, 2), True),
        (("e",), (0, 1), True),
        (("a", "d"), (0, 2), True),
    ]
    assert all(s.decoding for s in (a, b, c, d, e)) and all(s.last_done > 0 for s in sessions.values())


def test_update_settles_each_step_with_its_own_outcome() -> None:
    async def main() -> None:
        batches: list[Batch] = []
        a, b, c = _session("a"), _session("b"), _session("c")
        scheduler = _scheduler({s.id: s for s in (a, b, c)}, batches)
        ok, bad, gone = (scheduler.submit(s, 0, _ids(1), False) for s in (a, b, c))
        gone.cancel()  # its caller went away: not scheduled
        batch = scheduler.schedule()
        assert batch is not None and [s.session.id for s in batch.steps] == ["a", "b"] and batch.decode
        refused = InvalidRequest("no")
        scheduler.update(batch, BatchResult((_ids(2), refused), batched=2), started=1.0, finished=1.5)
        assert (await ok).data == _ids(2).data
        with pytest.raises(InvalidRequest):
            await bad
        assert scheduler.batched_steps == 2 and scheduler.queued == 0 and a.last_done == b.last_done == 1.5
        # a batch that failed as a whole (a bug) fails every step with that error
        first, second = scheduler.submit(a, 1, _ids(3), False), scheduler.submit(b, 1, _ids(3), False)
        batch = scheduler.schedule()
        assert batch is not None
        scheduler.update(batch, BatchResult(error=RuntimeError("bug")), started=2.0, finished=2.1)
        for future in (first, second):
            with pytest.raises(RuntimeError, match="bug"):
                await future

    asyncio.run(main())


def _config(model: Path, **kw: Any) -> ServerConfig:
    return ServerConfig(model, 0, 4, **kw)


def test_a_bad_step_fails_alone_and_the_good_ones_run_batched(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    async def main() -> None:
        engine = await Engine.load(_config(tiny_models["llama"], default_length=4))
        try:
            a, b, c = [await engine.open("", 0, 4, 0) for _ in range(3)]
            results = await asyncio.gather(
                engine.step(a, 0, _ids(1), True),
                engine.step(b, 3, _ids(2), True),  # position 3 of an empty cache
                engine.step(c, 0, _ids(3), True),
                return_exceptions=True,
            )
            assert isinstance(results[1], InvalidRequest), results[1]
            assert [list(r.shape) for r in (results[0], results[2])] == [[1, 1, 256]] * 2  # logits
            assert engine.batched_steps == 2
            for position in range(1, 4):  # a session past its max length: refused, still alone
                await engine.step(a, position, _ids(4), True)
            with pytest.raises(OutOfRange):
                await engine.step(a, 4, _ids(4), True)
            assert await measure_throughput(engine, tmp_path) > 0  # measured on the compute thread, cached
        finally:
            await engine.aclose()

    asyncio.run(main())
    assert [p.name for p in tmp_path.iterdir()] == ["throughput.json"]  # written atomically: no temporary left


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral-swa"])
def test_the_kv_budget_reserves_what_a_sessions_cache_really_holds(family: str, tmp_path: Path) -> None:
    """MLA caches a latent, a sliding layer only its window: neither is heads x head_dim x length."""
    from conftest import build_tiny

    model = build_tiny(family, tmp_path / family)

    async def main() -> None:
        engine = await Engine.load(ServerConfig(model, 0, 2, kv_budget_bytes=1 << 24))
        try:
            session = await engine.open("", 0, 2, 64)
            assert engine.config.kv_budget_bytes - engine.kv_free_bytes == session.cache.nbytes
            engine.close(session)
            assert engine.kv_free_bytes == engine.config.kv_budget_bytes
        finally:
            await engine.aclose()

    asyncio.run(main())


def test_loading_a_span_does_not_block_the_event_loop(tiny_models: dict[str, Path]) -> None:
    loaded_on: list[str] = []

    def slow_progress(message: str) -> None:  # called on the compute thread while it loads
        loaded_on.append(threading.current_thread().name)
        time.sleep(0.5)

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        engine = await Engine.load(_config(tiny_models["llama"]), progress=slow_progress)
        task.cancel()
        await engine.aclose()
        return ticks

    ticks = asyncio.run(main())
    assert loaded_on and loaded_on[0].startswith("moemesh-compute")
    assert ticks >= 20, f"the loop ticked only {ticks} times during a 0.5 s load"


class _FakeEngine:
    """Just what Lifecycle.drain touches: `moving` and `drain`, which waits for `moving`."""

    def __init__(self) -> None:
        self.moving = asyncio.Event()
        self.graces: list[float | None] = []

    async def drain(self, grace_s: float | None = None) -> None:
        self.graces.append(grace_s)
        await self.moving.wait()


def test_first_signal_stops_and_a_second_tells_sessions_to_move() -> None:
    async def main() -> None:
        with Lifecycle(grace_s=7.0) as lifecycle:
            engine = _FakeEngine()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(lifecycle.stop_requested(), 5)
            assert lifecycle.stopping
            draining = asyncio.create_task(lifecycle.drain(engine))  # type: ignore[arg-type]
            await asyncio.sleep(0.05)
            assert not draining.done() and engine.graces == [7.0]
            os.kill(os.getpid(), signal.SIGINT)  # the second signal: move now
            await asyncio.wait_for(draining, 5)
            later = _FakeEngine()  # an engine drained after the hurry moves at once too
            await asyncio.wait_for(lifecycle.drain(later), 5)  # type: ignore[arg-type]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    asyncio.run(main())


def test_serve_exports_its_names_and_imports_no_torch_until_used() -> None:
    import subprocess
    import sys

    code = (
        "import sys, node.serve as s\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert all(getattr(s, name) is not None for name in s.__all__)\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_throughput_is_cached_per_kernel_layout() -> None:
    """A figure measured on plain weights is not a packed or split span's (they decode faster)."""
    from torch import nn

    from kernels import SplitLinear
    from node.serve.throughput import kernels_key

    plain = nn.Sequential(nn.Linear(4, 4))
    assert kernels_key(plain) == ""  # type: ignore[arg-type]
    split = nn.Sequential(SplitLinear(4, 4))
    assert kernels_key(split) == "|split"  # type: ignore[arg-type]
    split.packed = True  # type: ignore[assignment]  # what kernels.pack_span marks
    assert kernels_key(split) == "|packed|split"  # type: ignore[arg-type]
