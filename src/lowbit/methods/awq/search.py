"""AWQ's scale search as plain functions: the candidates' scales, the losses (Gram or replayed on evenly spaced
samples) and the choice among them (docs/methods.md, AWQ); `stage.py` runs them per block."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.engine import BlockContext
from lowbit.methods.awq.ranks import local_samples
from lowbit.methods.common.gram import gram_matrix
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)


@torch.no_grad()
def block_gram(ctx: BlockContext, x: Tensor) -> Tensor:
    """H = X^T X over every cached token of x ([n, L, k], or [tokens, k] where a block flattens them, as OPT's
    FFN does): one fp32 product per batch (a float64 GEMM runs at a quarter of the rate on a CPU), summed in
    float64 so the sum over all batches loses nothing."""
    k = x.shape[-1]
    total = torch.zeros(k, k, dtype=torch.float64, device=ctx.device)
    for part in ctx.batches(x.shape[0]):
        total += gram_matrix(ctx.batch(x, part).reshape(-1, k).float()).double()
    return total


def gram_loss(error: Tensor, gram: Tensor, tokens: int) -> float:
    """Mean squared output error of a linear whose weight error is E [m, k] on inputs with Gram matrix H:
    ||X E^T||^2 / (tokens * m) = tr(E H E^T) / (tokens * m), what `_loss` measures by replaying every token."""
    e = error.to(gram.device, torch.float64)
    return float(((e @ gram) * e).sum()) / (tokens * e.shape[0])


def spaced_samples(n: int, count: int | None) -> Tensor | None:
    """Indices of `count` evenly spaced samples out of n (first and last included; rounding may merge two), or
    None where `count` covers them all."""
    if count is None or count >= n:
        return None
    return torch.linspace(0, n - 1, count).round().long().unique()


def _batch_shaped(value: Any) -> bool:
    """Whether a call argument has a leading batch dimension > 1 (the engine's captured kwargs broadcast: dim 1)."""
    if isinstance(value, Tensor):
        return value.dim() >= 2 and value.shape[0] > 1
    if isinstance(value, (tuple, list)):
        return any(_batch_shaped(v) for v in value)
    if isinstance(value, dict):
        return any(_batch_shaped(v) for v in value.values())
    return False


def replay_samples(
    x: Tensor, nsamples: int | None, count: int | None, call: tuple | None, span: tuple[int, int] | None = None
) -> tuple[Tensor, int | None]:
    """The inputs a replay search runs on: the `count` evenly spaced samples of x (`spaced_samples`), and how many
    samples that is (None: x's sample structure is unknown, all rows are used). With a data-parallel `span` (this
    rank's first sample, every rank's samples), they are spaced over every rank's samples and x keeps the ones it
    holds; the count is still theirs over every rank.

    x is [n, L, k], or [n * L, k] where the block flattens the tokens (OPT's FFN); `nsamples` is n (None: x's first
    dimension when x is 3-D). All of x is kept where the structure is unknown, or where the inspected module's
    call arguments are batch-shaped rather than broadcast over samples (a subset could not match them)."""
    n = nsamples if nsamples is not None else (x.shape[0] if x.dim() >= 3 else None)
    if n is None or not (x.shape[0] == n or (x.dim() == 2 and x.shape[0] % n == 0)):
        return x, None
    total = n if span is None else span[1]
    index = spaced_samples(total, count)
    if index is None:
        return x, total
    if call is not None and _batch_shaped((call[1], call[2])):
        log.warning("awq: the inspected module's call arguments are batch-shaped; its search uses all %d samples", n)
        return x, total
    mine = local_samples(index, span, n)
    if x.shape[0] == n:
        return x[mine], len(index)
    return x.reshape(n, -1, x.shape[-1])[mine].reshape(-1, x.shape[-1]), len(index)


def first_argmin(losses: list[float]) -> int | None:
    """Index of the first smallest finite loss (docs/methods.md, AWQ's r*), or None when none is finite."""
    return min((i for i, loss in enumerate(losses) if math.isfinite(loss)), key=losses.__getitem__, default=None)


def normalised_scales(xbar: Tensor, r: float, wbar: Tensor | None = None) -> Tensor:
    """s = max(xbar^r, 1e-4) (or xbar^r / wbar^(1-r) with duo scaling), normalised so max(s)·min(s) = 1."""
    s = xbar.pow(r) if wbar is None else xbar.pow(r) / wbar.pow(1 - r).clamp(min=1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(linears: list[nn.Linear], scheme: QuantScheme) -> Tensor:
    """Per-input-channel mean of |W| normalised by each group's max (llm-compressor's duo-scaling w̄)."""
    w = torch.cat([linear.weight.detach().float() for linear in linears])
    k = w.shape[1]
    g = scheme.group_width(k)
    out = torch.empty_like(w)
    for j in range(0, k, g):
        part = w[:, j : j + g].abs()
        out[:, j : j + g] = part / part.amax(dim=1, keepdim=True).clamp(min=1e-12)
    return out.mean(dim=0)
