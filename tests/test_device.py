"""--device and --max-memory: CUDA spans (skipped without a GPU), memory-aware spans, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, load_reference

from kernels import SpanBytes
from node.cli.values import to_bytes as _to_bytes
from node.errors import ConfigError
from node.serve.config import ServerConfig
from node.serve.device import blocks_that_fit, check_fits, resolve_device
from shards import Checkpoint
from shards.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU here (torch.cuda.is_available() is False)")
# fp32 on a GPU: other kernels (cuBLAS, TF32 off) than the CPU's, so equal within fp32 rounding, not bit for bit
FP32 = dict(rtol=1e-4, atol=1e-4)


def moemesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_memory_sizes_parse() -> None:
    assert _to_bytes("8GiB") == 8 * 1024**3 and _to_bytes("512MB") == 512 * 1000**2 and _to_bytes("1.5g") == 1.5e9
    assert _to_bytes("1000") == 1000 and _to_bytes("64 kib") == 65536
    for bad in ("", "GiB", "8 parsecs", "-"):
        with pytest.raises(ValueError):
            _to_bytes(bad)


@pytest.mark.skipif(GPU, reason="this machine has a GPU: the no-GPU error cannot show")
def test_device_cuda_without_a_gpu_exits_2_with_a_clear_message(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="--device cuda"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    result = moemesh("serve", "--model", str(tiny_models["llama"]), "--layers", "0:2", "--device", "cuda")
    assert result.returncode == 2 and "--device cuda" in result.stderr and "Traceback" not in result.stderr


def test_memory_flags_are_checked(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["mixtral"])
    bad = moemesh("serve", "--model", model, "--layers", "0:2", "--max-memory", "lots")
    assert bad.returncode == 2 and "memory size" in bad.stderr
    tight = moemesh("serve", "--model", model, "--layers", "0:4", "--max-memory", "20KB", "--insecure-lan")
    assert tight.returncode == 2 and "raise --max-memory" in tight.stderr and "Traceback" not in tight.stderr
    assert "19.53 KiB" in tight.stderr and "0.00 GiB" not in tight.stderr  # sizes in a unit that shows them


@pytest.mark.parametrize("mode", ["none", "int4"])
def test_auto_layers_take_the_largest_window_that_fits(mode: str, tiny_models: dict[str, Path]) -> None:
    folder = tiny_models["mixtral"]
    checkpoint = Checkpoint(folder)
    sizes = SpanBytes(checkpoint.config, checkpoint.compute_dtype, mode)
    budget = sizes.embedding + sizes.head + 3 * sizes.per_block
    config = ServerConfig(model=folder, start=0, end=4, quantize=mode, max_memory_bytes=budget)
    assert blocks_that_fit(config, checkpoint, "cpu") == 3
    # a daemon started with only the model id sizes its span from the manifest, the same way
    assert blocks_that_fit(config, load_manifest(folder), "cpu") == 3
    with pytest.raises(ConfigError, match="layers 0:4 .* need"):
        check_fits(config, checkpoint, "cpu")
    assert check_fits(
        ServerConfig(model=folder, start=1, end=4, quantize=mode, max_memory_bytes=budget), checkpoint, "cpu"
    )
    with pytest.raises(ConfigError, match="not one block"):
        blocks_that_fit(ServerConfig(model=folder, start=0, end=4, max_memory_bytes=sizes.embedding), checkpoint, "cpu")
    default = ServerConfig(model=folder, start=0, end=4, quantize=mode)  # a share of free RAM: a tiny model fits
    assert blocks_that_fit(default, checkpoint, "cpu") == 4


# ---- on a GPU --------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_spans_match_transformers_on_cuda(family: str, tiny_models: dict[str, Path]) -> None:
    from transformers.cache_utils import DynamicCache

    torch.backends.cuda.matmul.allow_tf32 = False
    folder = tiny_models[family]
    ref = load_reference(folder).to("cuda")
    checkpoint = Checkpoint(folder)
    spans = [checkpoint.load_span(0, 2, pack=False).to("cuda"), checkpoint.load_span(2, 4, pack=False).to("cuda")]
    assert all(s.device.type == "cuda" for s in spans)
    caches = [s.new_cache(64) for s in spans]
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(7))
    ref_cache = DynamicCache(config=ref.config)
    position = 0
    for chunk in (ids[:, :5], ids[:, 5:11], ids[:, 11:12], ids[:, 12:13], ids[:, 13:]):
        with torch.no_grad():
            expected = ref(input_ids=chunk.cuda(), past_key_values=ref_cache, use_cache=True).logits
        h = chunk  # token ids from the CPU, as from the wire
        for span, cache in zip(spans, caches, strict=True):
            h = span(h, cache, position)
        position += chunk.shape[1]
        torch.testing.assert_close(h, expected, **FP32)


@needs_gpu
@pytest.mark.parametrize("mode", ["none", "bf16", "int8", "int4"])
def test_cuda_quantized_spans_match_the_cpu_and_decode_in_batches(mode: str, tiny_models: dict[str, Path]) -> None:
    checkpoint = Checkpoint(tiny_models["mixtral"])
    cpu = checkpoint.load_span(0, 4, quantize=mode)
    gpu = checkpoint.load_span(0, 4, quantize=mode, pack=False).to("cuda")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    caches = [cpu.new_cache(16), gpu.new_cache(16)]
    position = 0
    for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:]):
        a, b = (span(chunk, cache, position) for span, cache in zip((cpu, gpu), caches, strict=True))
        position += chunk.shape[1]
        torch.testing.assert_close(b.cpu(), a, **FP32)
    batch = [[s.new_cache(4) for _ in range(3)] for s in (cpu, gpu)]
    x = torch.tensor([[3], [5], [7]])
    outs = [span.decode(x, c, [0, 0, 0]) for span, c in zip((cpu, gpu), batch, strict=True)]
    torch.testing.assert_close(outs[1].cpu(), outs[0], **FP32)


@needs_gpu
@pytest.mark.slow
def test_a_pipeline_of_a_cpu_and_a_gpu_peer_generates_as_one_cpu_process(tiny_models: dict[str, Path]) -> None:
    from node.client import Client
    from node.testing.launch import local_swarm

    folder = tiny_models["mixtral"]
    prompt = [5, 17, 42, 9, 100, 3]
    span = Checkpoint(folder).load_span(0, 4)
    cache = span.new_cache(32)
    logits = span(torch.tensor([prompt]), cache, 0, last_only=True)
    expected: list[int] = []
    for position in range(len(prompt), len(prompt) + 8):
        expected.append(int(logits.reshape(-1).argmax()))
        logits = span(torch.tensor([[expected[-1]]]), cache, position, last_only=True)
    with (
        local_swarm(folder, [(0, 2)], extra_args=["--device", "cpu"]) as cpu,
        local_swarm(folder, [(2, 4)], extra_args=["--device", "cuda"]) as gpu,
    ):
        addresses = [cpu[0].pinned, gpu[0].pinned]
        with Client(addresses) as client:
            assert [client.info(a).device for a in addresses] == ["cpu", "cuda"]
            assert list(client.generate(prompt, 8, stop_at_eos=False)) == expected  # greedy: rounding rarely flips


@pytest.mark.slow
def test_an_auto_daemon_takes_the_window_its_max_memory_holds_and_advertises_its_device(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from node.daemon import DaemonConfig
    from node.mesh.autonat import AutoNATConfig
    from node.mesh.host import MeshConfig
    from node.mesh.nat import NatConfig
    from node.mesh.reader import SwarmReader
    from node.swarm.agent import SwarmConfig
    from node.testing.inprocess import DaemonThread

    folder = tiny_models["mixtral"]
    checkpoint = Checkpoint(folder)
    sizes = SpanBytes(checkpoint.config, checkpoint.compute_dtype, "int8")
    budget = sizes.embedding + sizes.head + 3 * sizes.per_block
    config = DaemonConfig(
        identity=tmp_path / "d.key",
        mesh=MeshConfig(),
        server=ServerConfig(model=folder, start=0, end=4, quantize="int8", max_memory_bytes=budget),
        nat=NatConfig(AutoNATConfig(confirmations=1)),
        cache_dir=tmp_path / "cache",
        swarm=SwarmConfig(lease_s=6.0, sync_interval_s=0.5),
        auto_layers=True,
    )
    with DaemonThread(config) as d:
        ready = d.ready(timeout=120)
        start, end = ready["layers"]
        assert end - start == 3  # the largest window that fits, not the whole model
        with SwarmReader([ready["multiaddrs"][0]], traversal=True) as reader:
            (shard,) = reader.everyone().records[ready["peer_id"]].shards
        assert (shard.device, shard.block_bytes, shard.quantization) == ("cpu", sizes.per_block, "int8")
