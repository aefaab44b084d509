"""Quantized peers: they say so (Info, records, status), a quantized pipeline equals one quantized
process exactly, and a client with `exact` routes around them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.client import Client, ClientConfig
from node.errors import RouteError
from node.testing.launch import local_swarm
from shards import Checkpoint

pytestmark = pytest.mark.slow  # serving processes


def _one_process_greedy(folder: Path, mode: str, prompt: list[int], n: int) -> list[int]:
    span = Checkpoint(folder).load_span(0, 4, quantize=mode)
    cache = span.new_cache(len(prompt) + n)
    with torch.inference_mode():
        logits = span(torch.tensor([prompt]), cache, 0, last_only=True)
        tokens: list[int] = []
        position = len(prompt)
        for _ in range(n):
            tokens.append(int(logits.reshape(-1).argmax()))
            logits = span(torch.tensor([[tokens[-1]]]), cache, position, last_only=True)
            position += 1
    return tokens


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_a_quantized_pipeline_says_so_equals_one_quantized_process_and_exact_avoids_it(
    tiny_models: dict[str, Path], mode: str
) -> None:
    folder = tiny_models["mixtral"]
    prompt = [5, 17, 42, 9, 100, 3]
    with local_swarm(folder, [(0, 2), (2, 4)], extra_args=["--quantize", mode]) as servers:
        addresses = [s.address for s in servers]
        with Client(addresses) as client:
            assert {client.info(a).quantization for a in addresses} == {mode}
            assert {client.info(a).device for a in addresses} == {"cpu"}
            sizes = Checkpoint(folder).config, torch.float32
            from kernels import SpanBytes

            assert {client.info(a).block_bytes for a in addresses} == {SpanBytes(*sizes, mode).per_block}
            tokens = list(client.generate(prompt, 8, stop_at_eos=False))
        assert tokens == _one_process_greedy(folder, mode, prompt, 8)
        with Client(addresses, config=ClientConfig(exact=True)) as client:
            with pytest.raises(RouteError, match="quantized, left out by exact mode"):
                client.route()
