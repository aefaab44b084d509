"""Progress bars: drawn on a terminal (or when forced), never in pipes and logs; loading ticks per tensor."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.progress import configure, ticks


def test_a_bar_is_drawn_only_when_shown(capsys: pytest.CaptureFixture[str]) -> None:
    with ticks("loading", unit="tensors") as tick:  # stderr is not a terminal here
        tick(1, 2)
    assert capsys.readouterr().err == ""
    configure(True)
    try:
        with ticks("loading", unit="tensors") as tick:
            tick(1, 2)
            tick(2, 2)
    finally:
        configure(None)
    assert "moemesh: loading" in capsys.readouterr().err


def test_loading_a_span_ticks_once_per_parameter_and_a_raise_ends_it(tiny_models: dict[str, Path]) -> None:
    from shards import Checkpoint

    seen: list[tuple[int, int]] = []
    span = Checkpoint(tiny_models["mixtral"]).load_span(0, 2, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(seen), len(seen)) == (len(dict(span.named_parameters())),) * 2

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Checkpoint(tiny_models["mixtral"]).load_span(0, 2, progress=stop)


def test_a_stop_during_a_start_cancels_the_work_and_raises_stopped(tiny_models: dict[str, Path]) -> None:
    import asyncio

    from node.errors import Stopped
    from node.serve import Engine, Lifecycle, ServerConfig

    async def main() -> tuple[bool, bool, int]:
        lifecycle = Lifecycle()
        cancelled = asyncio.Event()

        async def slow() -> None:
            try:
                await asyncio.sleep(60)
            finally:
                cancelled.set()

        asyncio.get_running_loop().call_later(0.1, lifecycle.request_stop)
        with pytest.raises(Stopped):
            await lifecycle.unless_stopped(slow())
        loaded = []  # a load asked for once the stop is requested: cancelled, its thread ends at once
        try:
            loaded.append(await lifecycle.unless_stopped(Engine.load(ServerConfig(tiny_models["mixtral"], 0, 4))))
        except Stopped:
            pass
        fine = await Lifecycle().unless_stopped(asyncio.sleep(0, result=7))  # no stop: the work's result
        return cancelled.is_set(), not loaded, fine

    assert asyncio.run(main()) == (True, True, 7)
