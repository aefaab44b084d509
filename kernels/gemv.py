"""fp32 decode matmuls split by rows over the CPU's threads, bit for bit ``F.linear``.

For one row of activations (one decode token) ``F.linear`` on fp32 weights is BLAS's gemv,
and the MKL that torch ships runs it on one thread: measured on this machine's AMD EPYC
(2 threads), a ``[1, 512] x [32000, 512]`` head took 6.6 ms on one thread and 6.9 ms on two,
about 10 GB/s, while the other core idles. transformers' own decode pays the same.

Each output is one row's dot product, computed the same way whatever rows surround it, so
the rows can be cut into equal blocks and the blocks' gemvs run at once: ``torch.bmm`` of
the one row against the blocks does that on torch's own threads (no Python thread, no
second OpenMP team) and gives F.linear's bits. Measured: that head in 3.2 ms instead of
6.1, a ``[1, 1536] x [4096, 1536]`` projection in 1.06 ms instead of 1.63, identical
outputs. Matrices under 2 MB are left alone.

BLAS's bits also depend on where a row lies in memory (its address modulo the vector width
decides how the dot product is peeled), so blocks start on multiples of 64 rows: every row
keeps its address modulo 256 bytes. Fusing q/k/v (or gate/up) into one new tensor was tried
and dropped for that reason: the copies' alignment differs from the checkpoint's, and so do
the bits (transformers multiplies the tensors where the checkpoint loader put them).

`split_available` probes once, on this CPU, that the split gives F.linear's bits and that
it is faster (an MKL that threads its gemv itself, as on some Intel CPUs, gains nothing);
`SplitLinear` is an ``nn.Linear`` that takes the split for one-row inputs on the CPU, so a
span keeps its modules, ``state_dict`` and ``.to()``. Set ``MOEMESH_NO_SPLIT=1`` to turn it off.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from kernels.packed import linears

__all__ = ["MIN_SPLIT_ELEMENTS", "SplitLinear", "gemv_split", "split_available", "split_exact", "split_span"]

NO_SPLIT_ENV = "MOEMESH_NO_SPLIT"
MIN_SPLIT_ELEMENTS = 1 << 19  # weights below 2 MB of fp32 stay as they are (little to gain)
_ALIGN = 64  # blocks are multiples of this many rows (BLAS works rows in small blocks)


def _parts(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // _ALIGN))


def gemv_split(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, parts: int = 0) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for x with one row (``[..., K]``, numel K), w ``[N, K]`` fp32
    contiguous on the CPU, its rows cut into `parts` equal blocks (default: one per torch
    thread) run as one batched matmul, which torch spreads over its threads; rows past the
    last whole block (N not a multiple of `parts` x 64) take one more plain gemv."""
    n, k = w.shape
    parts = parts or _parts(n)
    rows = n // parts // _ALIGN * _ALIGN  # per block
    body = rows * parts
    x2 = x.reshape(1, k)
    xs = x2.expand(parts, 1, k)
    blocks = w[:body].view(parts, rows, k).transpose(1, 2)  # [P, K, rows]: each block's gemv
    if bias is None:
        y = torch.bmm(xs, blocks).view(1, body)
    else:
        y = torch.baddbmm(bias[:body].view(parts, 1, rows), xs, blocks).view(1, body)
    if body < n:
        y = torch.cat((y, F.linear(x2, w[body:], None if bias is None else bias[body:])), dim=-1)
    return y.reshape(*x.shape[:-1], n)


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gemv_split` can take this call (one row, fp32, CPU, big enough, no autograd)."""
    return (
        x.numel() == w.shape[-1]
        and w.dim() == 2
        and w.numel() >= MIN_SPLIT_ELEMENTS
        and w.dtype == torch.float32
        and x.dtype == torch.float32
        and w.device.type == "cpu"
        and not torch.is_grad_enabled()
        and w.is_contiguous()
    )


@functools.cache
def split_exact() -> bool:
    """Whether splitting gives F.linear's bits here (probed once). Not on every CPU: on a Xeon
    with AVX-512 and AMX, MKL threads its gemv itself, and the rows where it cuts its own
    blocks (say row 2050 of 4099) are peeled otherwise than in a block of ours, so a row or
    two of each odd-sized matrix came out different."""
    if torch.get_num_threads() < 2:
        return False
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, k in ((1000, 320), (4099, 256), (777, 1024)):
            w, x, b = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g), torch.randn(n, generator=g)
            for parts in (2, 3, 5):
                if not torch.equal(gemv_split(x, w, parts=parts), F.linear(x, w)):
                    return False
                if not torch.equal(gemv_split(x, w, b, parts=parts), F.linear(x, w, b)):
                    return False
    return True


@functools.cache
def split_available() -> bool:
    """Whether splitting gives F.linear's bits here (`split_exact`) and is faster (probed once, ~60 ms)."""
    if os.environ.get(NO_SPLIT_ENV, "") not in ("", "0") or not split_exact():
        return False
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ws = [torch.randn(4096, 1024, generator=g) for _ in range(4)]  # 64 MB: beyond the caches
        x = torch.randn(1, 1024, generator=g)

        def best(fn: object) -> float:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for w in ws:
                    fn(x, w)  # type: ignore[operator]
                times.append(time.perf_counter() - t0)
            return min(times)

        best(F.linear), best(gemv_split)  # warm-up
        return best(gemv_split) < 0.85 * best(F.linear)


class SplitLinear(nn.Linear):
    """``nn.Linear`` whose one-row fp32 CPU calls go through `gemv_split` (same bits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if applies(x, self.weight) and split_available():
            return gemv_split(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@torch.no_grad()
def split_span(span: nn.Module, probe: bool = True) -> int:
    """Make a span's big fp32 projections `SplitLinear` in place where the split is available
    (`probe` false: without asking, for tests); returns how many. The weights are the same
    tensors: moving the span later still works."""
    if probe and not split_available():
        return 0
    count = 0
    for parent, name, lin in list(linears(span)):
        w = lin.weight
        if (
            type(lin) is nn.Linear
            and w.dtype == torch.float32
            and w.device.type == "cpu"
            and w.numel() >= MIN_SPLIT_ELEMENTS
        ):
            split = SplitLinear(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
            split.weight, split.bias = w, lin.bias  # the same tensors, the same state_dict keys
            setattr(parent, name, split)
            count += 1
    return count
