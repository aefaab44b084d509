"""Sampling where the logits are: the chain's last hop answers a decode step with the token id
`node.client.sampling.sample` picks from its logits (the client's seed and draw), instead of
the logits. The tokens are those the client would pick itself, greedy and seeded, pushed and
relayed; a last hop answering a token outside the vocabulary is replaced like a dead one; a
step asking for an impossible draw is refused."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from node.client import Client, ClientConfig, Hop, Sampling, sample
from node.client import session as session_module
from node.client.sampling import logits_of, sample_request, sampled_token, sampling_of, token_of
from node.client.stream import HopStream
from node.errors import ConfigError, PeerError, PeerRefused
from node.serve.codec import to_message
from node.testing.launch import ServerProcess, named_servers
from protocol import make_tensor
from protocol.shard_pb2 import Sample

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
TOKENS = 16
SAMPLINGS = [Sampling(), Sampling(temperature=0.8, top_p=0.9, seed=7), Sampling(temperature=1.3, seed=2**64 - 1)]


# -- the pieces, in process ----------------------------------------------------------------------


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "top-p", "temperature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_last_hops_draw_is_the_clients(sampling: Sampling, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for step in range(20):
        logits = to_message((torch.randn(1, 1, 300, generator=g) * 3).to(dtype))
        request = sample_request(sampling, step)  # through the wire's message, as the server gets it
        answer = sampled_token(logits, sampling_of(request), request.index)
        assert answer is not None
        assert token_of(answer, "peer", 300) == sample(logits_of(logits, "peer")[-1], sampling, step)


def test_what_the_last_hop_cannot_sample_it_answers_as_logits() -> None:
    several = to_message(torch.randn(1, 3, 50))  # more than one position
    assert sampled_token(several, Sampling(), 0) is None
    nan = to_message(torch.full((1, 1, 50), float("nan")))
    assert sampled_token(nan, Sampling(temperature=1.0), 0) is None
    assert sampled_token(to_message(torch.zeros(1, 1, 50, dtype=torch.int64)), Sampling(), 0) is None


def test_a_sampled_answer_is_checked() -> None:
    assert token_of(to_message(torch.randn(1, 1, 50)), "peer", 50) is None  # logits: sample them here
    assert token_of(to_message(torch.tensor([[49]])), "peer", 50) == 49
    for wrong in (torch.tensor([[50]]), torch.tensor([[-1]]), torch.tensor([[1, 2]])):
        with pytest.raises(PeerError):
            token_of(to_message(wrong), "peer", 50)
    with pytest.raises(PeerError):
        token_of(make_tensor("int64", (1, 1), b"\0" * 3), "peer", 50)  # bytes that are no int64


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(temperature=math.nan), dict(top_p=0), dict(top_p=math.inf), dict(seed=-3)]
)
def test_impossible_samplings_are_refused_by_name(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Sampling(**bad)  # type: ignore[arg-type]


# -- through serving processes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path]) -> Iterator[dict[str, ServerProcess]]:
    serve, wrong = ("-m", "node"), ("-m", "node.testing.liar", "token")
    specs = {"head": ((0, 2), serve), "tail": ((2, 4), serve), "wrong": ((2, 4), wrong)}
    with named_servers(tiny_models["mixtral"], specs) as started:
        yield started


def _generate(
    peers: list[str], route: list[str], sampling: Sampling, **config: object
) -> tuple[list[int], Client, list[int | None]]:
    """TOKENS tokens along `route` (head 0:2, tail 2:4); also what each sampled decode step's
    last hop answered (a token id, or None: logits)."""
    answers: list[int | None] = []
    real = session_module.token_of

    def spy(*args: object) -> int | None:
        answers.append(real(*args))  # type: ignore[arg-type]
        return answers[-1]

    client = Client(peers, config=ClientConfig(decode_timeout_s=5.0, retry_backoff_s=0.1, **config))  # type: ignore[arg-type]
    hops = [Hop(route[0], 0, 2, route[0]), Hop(route[1], 2, 4, route[1])]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(session_module, "token_of", spy)
            route_of = (client.route()[0], hops)
            tokens = list(client.generate(PROMPT, TOKENS, sampling=sampling, stop_at_eos=False, route=route_of))
    finally:
        client.close()
    return tokens, client, answers


@pytest.mark.slow
@pytest.mark.parametrize("push", [True, False], ids=["pushed", "relayed"])
@pytest.mark.parametrize("sampling", SAMPLINGS[:2], ids=["greedy", "top-p"])
def test_tokens_sampled_by_the_last_hop_are_the_clients(
    servers: dict[str, ServerProcess], sampling: Sampling, push: bool
) -> None:
    head, tail = servers["head"].pinned, servers["tail"].pinned
    here, _, none = _generate([head, tail], [head, tail], sampling, push=push, sample_at_last_hop=False)
    there, _, answers = _generate([head, tail], [head, tail], sampling, push=push)
    assert there == here
    assert none == [] and len(answers) == 2 * (TOKENS - 1)  # the session's check, then its own
    assert all(a is not None for a in answers)  # every decode step came back as a token id


@pytest.mark.slow
def test_a_last_hop_answering_a_token_outside_the_vocabulary_is_replaced(servers: dict[str, ServerProcess]) -> None:
    s = {name: server.pinned for name, server in servers.items()}
    honest, _, _ = _generate([s["head"], s["tail"]], [s["head"], s["tail"]], SAMPLINGS[1])
    tokens, client, _ = _generate([s["head"], s["wrong"], s["tail"]], [s["head"], s["wrong"]], SAMPLINGS[1])
    assert tokens == honest
    assert len(client.recoveries) == 1 and s["wrong"] in client.recoveries[0]
    assert "outside the vocabulary" in client.recoveries[0]


@pytest.mark.slow
def test_a_step_asking_for_an_impossible_draw_is_refused_and_the_server_serves_on(
    servers: dict[str, ServerProcess],
) -> None:
    tail = servers["tail"]
    with Client([tail.pinned]) as client:
        model_id = client.info(tail.pinned).model_id
        stream = HopStream(client.channel(tail.pinned), Hop(tail.pinned, 2, 4), model_id, 8, client.config)
        hidden = to_message(torch.randn(1, 1, 64))
        step_id, timeout = stream.send(hidden, 0, True, draw=Sample(temperature=math.nan))
        with pytest.raises(PeerRefused, match="temperature"):
            stream.result(step_id, timeout)
        stream.close(goodbye=False)
        stream = HopStream(client.channel(tail.pinned), Hop(tail.pinned, 2, 4), model_id, 8, client.config)
        step_id, timeout = stream.send(hidden, 0, True, draw=sample_request(Sampling(), 0))
        answer = stream.result(step_id, timeout)
        assert token_of(answer, tail.pinned, 10**6) == int(np.argmax(logits_of(stream.step(hidden, 0, True), "")[-1]))
        stream.close()
