"""Mixture-of-experts: router -> dispatch -> experts -> combine.

Expert weights are stored fused, as transformers 5 holds them in memory:
``gate_up [E, 2I, H]`` (gate rows first, then up rows) and ``down [E, H, I]``.

`experts_reference` is the plain one-hot formulation; `experts_grouped` is the fast path in
three explicit steps: `dispatch` (which rows go to which expert), `run_experts` (each hit
expert over its rows) and `combine` (weighted sums per token), so a dispatch to another
peer's experts can slot in between. Both accumulate each token's
expert outputs in ascending expert order, so they agree bit for bit, and with
transformers' eager experts.

Routers: `route` (softmax over all experts, then top-k: Mixtral, Qwen, OLMoE),
`route_topk_softmax` (top-k logits, then softmax: Granite-MoE, GPT-OSS),
`route_sigmoid_group` (DeepSeek-V3: sigmoid scores, a correction bias for the choice only,
group-limited top-k, a routed scaling factor) and `route_softmax_group` (DeepSeek-V2).
GPT-OSS's experts (biases, interleaved gate/up columns, a clamped SwiGLU, weights stored
transposed) are the `ClampedSwiGLU` activation.
The expert weights may be quantized (`kernels.quant`): each expert's matmuls then go
through the quantized `linear`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import native
from kernels.quant import AnyWeight, Bf16Weight, Int4Weight, Int8Weight, linear

__all__ = [
    "Activation",
    "ClampedSwiGLU",
    "ExpertAct",
    "Dispatch",
    "combine",
    "dispatch",
    "experts_dense",
    "experts_forward",
    "experts_fused",
    "experts_gathered",
    "experts_grouped",
    "experts_one_token",
    "experts_reference",
    "linear_fp32",
    "route",
    "route_sigmoid_group",
    "route_softmax_group",
    "route_topk_softmax",
    "run_experts",
]

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's expert MLP: ``gate_up [E, H, 2I]`` (gate and up columns interleaved) and
    ``down [E, I, H]`` applied as ``x @ W + b``, with a clamped, shifted SwiGLU between them."""

    gate_up_bias: torch.Tensor  # [E, 2I]
    down_bias: torch.Tensor  # [E, H]
    alpha: float
    limit: float


ExpertAct = Activation | ClampedSwiGLU


def linear_fp32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in fp32, rounded once to x's dtype: a quantized span's router. Its bf16
    ``F.linear`` goes through oneDNN, which ran 78 us a call in a quantized decode here against
    ~8 for this (and a quantized span is bound to no one's bf16 bits)."""
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


def route(
    x: torch.Tensor,  # [T, H]
    router_weight: torch.Tensor,  # [E, H]
    top_k: int,
    normalize: bool,
    weights_in_model_dtype: bool,
    linear: Callable[..., torch.Tensor] = F.linear,  # linear_fp32 for quantized spans
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax routing; returns (weights [T, k], expert ids [T, k])."""
    logits = linear(x, router_weight)  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E] fp32
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if normalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    if weights_in_model_dtype:
        weights = weights.to(logits.dtype)
    return weights, ids


def route_topk_softmax(
    x: torch.Tensor,  # [T, H]
    router_weight: torch.Tensor,  # [E, H]
    router_bias: torch.Tensor | None,  # [E]
    top_k: int,
    upcast: bool,  # Granite: softmax in fp32, weights back in x's dtype; GPT-OSS: all in x's dtype
    linear: Callable[..., torch.Tensor] = F.linear,  # linear_fp32 for quantized spans
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the logits, then a softmax over those k; returns (weights [T, k], expert ids [T, k])."""
    logits = linear(x, router_weight, router_bias)  # [T, E]
    if upcast:
        logits = logits.float()
    top, ids = torch.topk(logits, top_k, dim=-1)  # [T, k]
    weights = torch.softmax(top, dim=-1, dtype=top.dtype)
    return (weights.type_as(x) if upcast else weights), ids


def route_sigmoid_group(
    x: torch.Tensor,  # [T, H]
    router_weight: torch.Tensor,  # [E, H]
    correction_bias: torch.Tensor,  # [E]: shifts the choice, not the weights
    top_k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores in fp32, top-k within the best `topk_group` of `n_group` groups."""
    logits = F.linear(x.float(), router_weight.float())  # [T, E] fp32
    scores = logits.sigmoid()
    choice = scores + correction_bias
    t, e = choice.shape
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]  # [T, k]
    weights = scores.gather(1, ids)
    if normalize:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * scaling, ids


def route_softmax_group(
    x: torch.Tensor,  # [T, H]
    router_weight: torch.Tensor,  # [E, H]
    top_k: int,
    n_group: int,
    topk_group: int,
    group_limited: bool,  # "group_limited_greedy"; else "greedy" over all experts
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax scores in fp32, top-k (within the best groups by their max), scaled, unnormalised."""
    logits = F.linear(x.float(), router_weight.float())  # [T, E] fp32
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if group_limited:
        t, e = scores.shape
        group_scores = scores.view(t, n_group, e // n_group).max(dim=-1).values  # [T, G]
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)  # [T, k]
    return weights * scaling, ids


def _expert(
    x: torch.Tensor,  # [n, H]
    expert: int,
    gate_up: AnyWeight,  # [E, 2I, H] ([E, H, 2I] for ClampedSwiGLU)
    down: AnyWeight,  # [E, H, I] ([E, I, H] for ClampedSwiGLU)
    act: ExpertAct,
) -> torch.Tensor:  # [n, H]
    if isinstance(act, ClampedSwiGLU):  # GPT-OSS's experts are kept unquantized (kernels.quant skips them)
        assert isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
        gate_up_out = x @ gate_up[expert] + act.gate_up_bias[expert]  # [n, 2I]
        gate, up = gate_up_out[..., ::2], gate_up_out[..., 1::2]  # [n, I] each
        gate = gate.clamp(min=None, max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
        glu = gate * torch.sigmoid(gate * act.alpha)
        return ((up + 1) * glu) @ down[expert] + act.down_bias[expert]
    gate, up = linear(x, gate_up[expert]).chunk(2, dim=-1)  # [n, I] each
    return linear(act(gate) * up, down[expert])  # [n, H]


def experts_reference(
    x: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, k]
    weights: torch.Tensor,  # [T, k]
    gate_up: AnyWeight,  # [E, 2I, H]
    down: AnyWeight,  # [E, H, I]
    act: ExpertAct,
) -> torch.Tensor:
    """One-hot dispatch over every expert: the definition the fast path must match."""
    num_experts = gate_up.shape[0]
    out = torch.zeros_like(x)  # [T, H]
    mask = F.one_hot(ids, num_classes=num_experts).permute(2, 1, 0)  # [E, k, T]
    for expert in range(num_experts):
        slot, token = torch.where(mask[expert])  # ordered by (slot, token)
        if token.numel() == 0:
            continue
        y = _expert(x[token], expert, gate_up, down, act)  # [n, H]
        y = y * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


@dataclass(frozen=True)
class Dispatch:
    """Which token rows go to which expert: the plan that dispatch makes and combine follows.

    `experts` are the experts hit, ascending; for each, `tokens[i]` and `slots[i]` list its
    (token, top-k slot) pairs in (slot, token) order, as the reference visits them. A remote
    dispatch (experts on another peer) sends `x[tokens[i]]` there and combines what comes back.
    """

    experts: tuple[int, ...]
    tokens: tuple[torch.Tensor, ...]  # [n_i] token rows of expert i
    slots: tuple[torch.Tensor, ...]  # [n_i] the top-k slot each row chose it in


def dispatch(ids: torch.Tensor) -> Dispatch:  # ids [T, k]
    """Group the (token, slot) pairs by expert, experts ascending (the reference's order)."""
    ids_t = ids.t()  # [k, T]: torch.where on it yields (slot, token) order like the reference
    experts = tuple(sorted(set(ids.flatten().tolist())))
    pairs = [torch.where(ids_t == e) for e in experts]
    return Dispatch(experts, tuple(t for _, t in pairs), tuple(s for s, _ in pairs))


def run_experts(
    x: torch.Tensor,  # [T, H]
    plan: Dispatch,
    gate_up: AnyWeight,  # [E, 2I, H]
    down: AnyWeight,  # [E, H, I]
    act: ExpertAct,
) -> list[torch.Tensor]:
    """Each hit expert over its token rows: one [n_i, H] output per expert of the plan."""
    return [_expert(x[t], e, gate_up, down, act) for e, t in zip(plan.experts, plan.tokens, strict=True)]


def combine(
    outputs: Sequence[torch.Tensor],  # [n_i, H] per expert of the plan
    plan: Dispatch,
    weights: torch.Tensor,  # [T, k]
    out: torch.Tensor,  # [T, H] zeros: the sum lands here
) -> torch.Tensor:
    """Weight each expert's rows and add them up per token, experts ascending (the reference's sums).

    An expert's rows are distinct tokens, so an accumulating ``index_put_`` does the reference's
    ``index_add_`` sums; on the CPU ``index_add_`` goes parallel even for one row and costs
    ~0.1-1.4 ms per call on 2 busy cores (32 calls per token on the bench model), this ~5 us.
    """
    for y, token, slot in zip(outputs, plan.tokens, plan.slots, strict=True):
        out.index_put_((token,), (y * weights[token, slot, None]).to(out.dtype), accumulate=True)
    return out


def experts_grouped(
    x: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, k]
    weights: torch.Tensor,  # [T, k]
    gate_up: AnyWeight,  # [E, 2I, H]
    down: AnyWeight,  # [E, H, I]
    act: ExpertAct,
) -> torch.Tensor:
    """dispatch -> experts -> combine, visiting only the experts that were hit (same sums as the reference)."""
    plan = dispatch(ids)
    return combine(run_experts(x, plan, gate_up, down, act), plan, weights, torch.zeros_like(x))


def experts_one_token(
    x: torch.Tensor,  # [1, H]
    ids: torch.Tensor,  # [1, k]
    weights: torch.Tensor,  # [1, k]
    gate_up: AnyWeight,
    down: AnyWeight,
    act: ExpertAct,
) -> torch.Tensor:
    """One token (a decode step of one session): its k experts ascending, without a plan's
    indexing; the same sums as the reference (adding to zeros is exact)."""
    chosen = ids[0].tolist()
    out: torch.Tensor | None = None
    for slot in sorted(range(len(chosen)), key=chosen.__getitem__):
        y = (_expert(x, chosen[slot], gate_up, down, act) * weights[:, slot, None]).to(x.dtype)
        out = y if out is None else out + y
    assert out is not None
    return out


def experts_fused(
    x: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, k]
    weights: torch.Tensor,  # [T, k]
    gate_up: AnyWeight,  # [E, 2I, H]
    down: AnyWeight,  # [E, H, I]
) -> torch.Tensor | None:
    """A few tokens on quantized SiLU experts in one C call (`kernels.native.moe`): the grouped
    path's plan and sums, with gate and up kept in fp32 and no rounding before the routing
    weight; a row's bits do not depend on the rows beside it. A quantized span's decode (it
    replaces ~25 dispatcher ops a token and layer); None where it does not apply."""
    kinds = (Int8Weight, Int4Weight, Bf16Weight)
    if not (isinstance(gate_up, kinds) and isinstance(down, kinds)):
        return None
    return native.moe(x, ids, weights, gate_up, down)


def _gather(w: AnyWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights of experts `ids` [n] as one [n, N, K] tensor (quantized ones dequantized)."""
    from kernels.quant import dequantize

    if isinstance(w, torch.Tensor):
        return w[ids]
    if isinstance(w, Int8Weight):
        return dequantize(Int8Weight(w.codes[ids], w.scales[ids]), dtype)
    if isinstance(w, Int4Weight):
        return dequantize(Int4Weight(w.packed[ids], w.scale_zeros[ids], w.group), dtype)
    if isinstance(w, Bf16Weight):
        return dequantize(Bf16Weight(w.bits[ids], w.scales), dtype)
    raise TypeError("packed weights are CPU-only: the gathered path is for accelerators")


def experts_gathered(
    x: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, k]
    weights: torch.Tensor,  # [T, k]
    gate_up: AnyWeight,  # [E, 2I, H]
    down: AnyWeight,  # [E, H, I]
    act: Activation,
) -> torch.Tensor:
    """Few tokens on an accelerator: gather the chosen experts' weights and run them as batched
    matmuls, with no host synchronisation (the grouped path reads the ids on the host). Not
    bit-identical to the reference (another summation order): within fp32 rounding."""
    t, k = ids.shape
    flat = ids.reshape(-1)  # [T*k]
    rows = x.repeat_interleave(k, dim=0)[:, :, None]  # [T*k, H, 1]
    gate, up = torch.bmm(_gather(gate_up, flat, x.dtype), rows)[..., 0].chunk(2, dim=-1)  # [T*k, I] each
    y = torch.bmm(_gather(down, flat, x.dtype), (act(gate) * up)[:, :, None])[..., 0]  # [T*k, H]
    return (y * weights.reshape(-1, 1)).view(t, k, -1).sum(dim=1).to(x.dtype)


def experts_dense(
    x: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, k]
    weights: torch.Tensor,  # [T, k]
    gate_up: AnyWeight,  # [E, 2I, H]
    down: AnyWeight,  # [E, H, I]
    act: ExpertAct,
) -> torch.Tensor:
    """Many tokens on an accelerator: every expert over every row, weighted by its routing
    weight (zero where not chosen), experts ascending; no host synchronisation."""
    out = torch.zeros_like(x)
    for expert in range(gate_up.shape[0]):
        w = (weights * (ids == expert)).sum(dim=-1, keepdim=True)  # [T, 1]
        out += (_expert(x, expert, gate_up, down, act) * w).to(x.dtype)
    return out


GATHER_MAX_ROWS = 16  # tokens x top-k up to which an accelerator gathers experts, else runs all


def experts_forward(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: AnyWeight,
    down: AnyWeight,
    act: ExpertAct,
) -> torch.Tensor:
    """Dispatcher. On the CPU the grouped path (host-side plans cost nothing there), one
    token without a plan; on an accelerator paths that never wait for the device."""
    if x.device.type == "cpu":
        if x.shape[0] == 1:
            return experts_one_token(x, ids, weights, gate_up, down, act)
        return experts_grouped(x, ids, weights, gate_up, down, act)
    if ids.numel() <= GATHER_MAX_ROWS and not isinstance(act, ClampedSwiGLU):
        return experts_gathered(x, ids, weights, gate_up, down, act)
    return experts_dense(x, ids, weights, gate_up, down, act)
