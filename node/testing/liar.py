"""A lying peer, for tests of spot-checks: `moemesh serve` whose outputs are perturbed.

    python -m node.testing.liar SCALE serve --model M --layers 2:4 ...
    python -m node.testing.liar token serve --model M --layers 2:4 ...

runs the ordinary serve command, except that every Forward and session step answers (and
pushes on) its true output plus Gaussian noise of SCALE times the output's own standard
deviation: a peer that looks healthy (it answers in time, with the right shapes) and lies.
With `token`, its outputs are true but it answers every step it is asked to sample with a
token id outside the vocabulary. Test code only.
"""

from __future__ import annotations

import sys

import torch

from node.serve import service
from node.serve.codec import from_message, to_message
from node.serve.engine import Engine, Session
from node.serve.push import Dial
from protocol.shard_pb2 import ForwardResponse, Sample, Tensor

__all__ = ["LyingShardService", "WrongTokenShardService", "perturb"]


def perturb(t: Tensor, scale: float, seed: int = 0) -> Tensor:
    """`t` plus noise of `scale` times its standard deviation, in its own dtype."""
    true = from_message(t, what="output")
    x = true.float()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * x.std().clamp_min(1e-6) * scale
    return to_message((x + noise).to(true.dtype))


class LyingShardService(service.ShardService):
    """The Shard service, lying in every output by `SCALE` (set before the server starts)."""

    SCALE = 1.0

    async def forward(self, raw: bytes, context: object) -> bytes:  # type: ignore[override]
        answer = ForwardResponse.FromString(await super().forward(raw, context))  # type: ignore[arg-type]
        return ForwardResponse(output=perturb(answer.output, self.SCALE)).SerializeToString()

    def __init__(self, engine: Engine, dial: Dial | None = None) -> None:
        super().__init__(engine, dial)
        true_step = engine.step

        async def lying_step(session: Session, position: int, msg: Tensor, last_only: bool) -> Tensor:
            # at the engine, so what it pushes to the next hop lies as much as what it answers
            return perturb(await true_step(session, position, msg, last_only), self.SCALE, position)

        engine.step = lying_step  # type: ignore[method-assign]


class WrongTokenShardService(service.ShardService):
    """The Shard service, answering each step it samples with a token id past the vocabulary."""

    async def _sampled(self, logits: Tensor, request: Sample) -> Tensor:
        vocab = from_message(logits, what="logits").shape[-1]
        return to_message(torch.tensor([[vocab + 7]], dtype=torch.int64))


def main(argv: list[str]) -> int:
    from node.cli.main import main as moemesh

    if argv[0] == "token":
        service.ShardService = WrongTokenShardService  # type: ignore[misc]  # what start_server builds
    else:
        LyingShardService.SCALE = float(argv[0])
        service.ShardService = LyingShardService  # type: ignore[misc]
    return moemesh(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
