"""Client SDK pieces: route planning and sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.client import Client, Hop, PeerInfo, Sampling, plan_route, sample
from node.errors import ConfigError, RouteError, TokenizerError
from node.plan.peers import PeerView
from node.plan.routing import best_chain, missing_blocks
from node.testing.launch import local_swarm


def peer(address: str, start: int, end: int, layers: int = 12) -> PeerInfo:
    return PeerInfo(address, start, end, address=address, model_id="m", num_layers=layers, model_name="model")


def test_route_needs_the_fewest_hops_and_uses_sub_spans() -> None:
    peers = [peer("a", 0, 4), peer("b", 0, 6), peer("d", 6, 9), peer("c", 3, 12)]
    hops = plan_route(peers)
    assert len(hops) == 2 and hops[0].start == 0 and hops[-1] == Hop("c", hops[0].end, 12, "c")


def test_best_chain_weighs_round_trips_against_compute() -> None:
    fast_far = PeerView("far", 0, 8, throughput=1000.0, address="far:1", rtt_s=0.050)  # 1 ms per block
    slow_near = PeerView("near", 0, 8, throughput=100.0, address="near:1", rtt_s=0.001)  # 10 ms per block
    assert [h.peer for h in best_chain([fast_far, slow_near], 8)] == ["far"]  # 0.058 s < 0.081 s
    assert [h.peer for h in best_chain([fast_far, slow_near], 2)] == ["near"]  # 0.021 s < 0.052 s
    split = [
        PeerView("a", 0, 8, 100.0, address="a:1", rtt_s=0.001),
        PeerView("b", 4, 8, 1000.0, address="b:1", rtt_s=0.001),
    ]
    assert [(h.peer, h.start, h.end) for h in best_chain(split, 8)] == [("a", 0, 4), ("b", 4, 8)]
    assert missing_blocks(split[1:], 8) == [(0, 4)]


def test_route_names_every_missing_block() -> None:
    with pytest.raises(RouteError, match="layers 4:6, 9:12 of 12") as info:
        plan_route([peer("a", 0, 4), peer("b", 6, 9)])
    assert info.value.missing == ((4, 6), (9, 12))
    with pytest.raises(RouteError, match="no peer answered"):
        plan_route([])


def test_greedy_and_seeded_sampling() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert sample(logits, Sampling(), 0) == 1
    warm = Sampling(temperature=1.0, seed=7)
    draws = [sample(logits, warm, step) for step in range(200)]
    assert draws == [sample(logits, warm, step) for step in range(200)]  # reproducible per (seed, step)
    assert {1, 2} <= set(draws)
    assert {sample(logits, Sampling(temperature=1.0, top_p=0.5, seed=s), 0) for s in range(50)} == {1}
    with pytest.raises(ConfigError):
        Sampling(temperature=-1)
    with pytest.raises(ConfigError):
        Sampling(top_p=0)


def test_sampled_generation_is_reproducible_with_a_seed(tiny_models: dict[str, Path]) -> None:
    with local_swarm(tiny_models["qwen3_moe"], [(0, 2), (2, 4)]) as servers:
        with Client([s.pinned for s in servers]) as client:
            sampling = Sampling(temperature=0.8, top_p=0.9, seed=42)
            one = list(client.generate([3, 1, 4, 1, 5], 12, sampling=sampling, stop_at_eos=False))
            two = list(client.generate([3, 1, 4, 1, 5], 12, sampling=sampling, stop_at_eos=False))
            other = list(client.generate([3, 1, 4, 1, 5], 12, sampling=Sampling(0.8, 0.9, seed=43), stop_at_eos=False))
            assert one == two and len(one) == 12
            assert one != other
            with pytest.raises(ConfigError, match="empty"):
                list(client.generate([], 4))
            with pytest.raises(TokenizerError, match="NOT_FOUND.*pass the model folder"):  # none in the swarm either
                list(client.generate("hello", 4))


def test_a_raw_prompt_gets_the_bos_the_tokenizer_adds_and_a_chat_prompt_keeps_its_own(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from node.client.text import TextCodec

    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ bos_token }}{% for m in messages %}'
        '{{ m.content }} {% endfor %}"}'
    )
    codec = TextCodec(tmp_path)
    assert codec.encode("hello world", raw=True) == [0, 2, 3]  # as transformers' tokenizer(prompt)
    assert codec.encode(codec.chat_prompt("hello")) == [0, 2]  # the template's own BOS, not a second one


def test_the_sdk_prints_nothing_to_stderr_by_default() -> None:
    import subprocess
    import sys

    code = (
        "from libp2p.peer.id import ID\n"
        "from node.client import Client\n"
        "from node.errors import MeshError\n"
        "from node.mesh.identity import ephemeral_identity\n"
        "pid = ID.from_pubkey(ephemeral_identity().public_key).to_base58()\n"
        "try:\n"
        "    with Client(bootstrap=[f'/ip4/127.0.0.1/tcp/9/p2p/{pid}']) as client:\n"
        "        client.route()\n"
        "except MeshError:\n"
        "    print('refused')\n"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "refused", result.stderr
    assert result.stderr == ""  # libp2p's own "Failed to open TCP stream" lines stay quiet
