"""The wire: generated code is current, tensors are validated before use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.serve.codec import from_message, to_message
from protocol import InvalidTensorError, check_tensor, make_tensor
from protocol.shard_pb2 import DType, Tensor

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_codec_round_trip_is_exact(dtype: torch.dtype) -> None:
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    back = from_message(Tensor.FromString(to_message(t).SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_invalid_tensors_are_refused() -> None:
    with pytest.raises(InvalidTensorError, match="bytes do not hold"):
        check_tensor(Tensor(dtype=DType.FLOAT32, shape=[2, 3], data=b"\0" * 20))
    with pytest.raises(InvalidTensorError, match="dtype"):
        check_tensor(Tensor(dtype=DType.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4))
    with pytest.raises(InvalidTensorError, match="dtype 99"):
        check_tensor(Tensor(dtype=99, shape=[1], data=b"\0" * 4))  # type: ignore[arg-type]
    with pytest.raises(InvalidTensorError, match="rank"):
        check_tensor(Tensor(dtype=DType.FLOAT32, shape=[], data=b""))
    with pytest.raises(InvalidTensorError, match="rank"):
        check_tensor(Tensor(dtype=DType.FLOAT32, shape=[1] * 5, data=b"\0" * 4))
    with pytest.raises(InvalidTensorError, match="dimension outside"):  # no bytes, and torch.empty would overflow
        check_tensor(Tensor(dtype=DType.FLOAT32, shape=[1, 1, 0, 2**63 - 1], data=b""))
    with pytest.raises(InvalidTensorError, match="cannot travel"):
        make_tensor("float64", [1], b"\0" * 8)
    assert check_tensor(make_tensor("int64", [1, 2], b"\0" * 16)).shape == (1, 2)
