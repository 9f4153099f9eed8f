"""HQQ's half-quadratic solver (Badri & Shaji 2023) as pure tensor functions on grouped weights.

The problem per group is min_{z} ||W - Q_z^{-1}(Q_z(W))||_p^p with p < 1: a sparsity-promoting error norm that
lets a few outliers keep a large error while the bulk of the group is fitted well. Half-quadratic splitting adds an
auxiliary error W_e and alternates (1) a generalized soft-thresholding of the error (`shrink_lp`), (2) a closed
form least-squares update of the zero point, with beta growing by kappa each step.

The functions follow the `hqq` library 0.2.8 (hqq/core/optimize.py, `optimize_weights_proximal_legacy`, the one
`Quantizer.quantize` uses by default) step for step, so that the same inputs give the same zero and codes:
- the library works with the *inverse* scale: codes = round(W * inv_scale + zero), W_r = (codes - zero) / inv_scale;
- only the zero is optimized, the min-max scale stays fixed;
- the stopping test is global (the mean |W - W_r| over the whole tensor) and, as in the library, the zero returned
  is the one computed in the step where the error stopped falling (`keep_best=False`); `keep_best=True` returns
  the best zero seen instead when the error rises (what the library's `optimize_weights_proximal_v2` does).
Every lowbit export stores an integer zero in [0, qmax], and rounding the library's fractional zero throws its gain
away (the grid shift *is* the gain; measured in docs/methods.md). `optimize_integer_grid` is lowbit's variant for
integer grids: the same half-quadratic splitting, but the least-squares step solves for the scale with the codes and
an integer zero fixed (the zero step is rounded), and the best step is kept per group, so no group ends worse than
its min-max (RTN) start in the mean absolute error.

Layout: every function takes groups as the last dimension, w of shape [..., g] (lowbit's [m, G, g] view, which is
the library's axis=1 grouping of a row-major [out, in] weight), and params of shape [..., 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError

_SMALL_RANGE = 1e-4  # the library's guard: a group narrower than this gets inverse scale 1
_INV_SCALE_CAP = 2e4  # the library's clamp, which keeps 1 / inv_scale representable in fp16


@dataclass(frozen=True)
class ProximalParams:
    """The solver's settings; the defaults are the library's default solver (`lp_norm` 0.7, beta 10, 20 steps).

    kappa is 1: the library's default (legacy) solver never grows beta although its settings name kappa 1.01;
    its `_v2` solver does, and `kappa=1.01` here reproduces that schedule.
    """

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.0
    iters: int = 20
    keep_best: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.lp_norm <= 1.0:
            raise LowbitError(f"lp_norm={self.lp_norm} is not valid: use a value in (0, 1] (HQQ uses 0.7)")
        if self.beta <= 0 or self.kappa < 1.0:
            raise LowbitError(f"beta={self.beta}, kappa={self.kappa}: use beta > 0 and kappa >= 1 (HQQ: 10, 1)")
        if self.iters < 1:
            raise LowbitError(f"iters={self.iters} is not valid: use at least 1 step (HQQ uses 20)")


def shrink_lp(x: Tensor, beta: float, lp_norm: float) -> Tensor:
    """The proximal operator of (1/beta)|x|^p: generalized soft-thresholding (p = 1: plain soft-thresholding).

    Small errors are set to zero (they are fitted exactly by the next least-squares step); large ones keep most
    of their size, so an outlier cannot drag the zero towards itself.
    """
    out = x.abs()
    if lp_norm == 1:
        out = (out - 1.0 / beta).clamp_min(0.0)
    else:
        out = (out - (1.0 / beta) * out.pow(lp_norm - 1)).clamp_min(0.0)
    return out * torch.sign(x)


def minmax_init(w: Tensor, qmax: int, *, round_zero: bool = False) -> tuple[Tensor, Tensor]:
    """The library's starting point: inverse scale qmax / (max - min) and zero -min * inv_scale per group.

    A group narrower than 1e-4 gets inverse scale 1 and the inverse scale is capped at 2e4, as in the library;
    `round_zero` rounds the starting zero (the library's default config does so at 4 bits only).
    """
    lo = w.amin(dim=-1, keepdim=True)
    hi = w.amax(dim=-1, keepdim=True)
    denom = hi - lo
    inv_scale = qmax / denom
    inv_scale = torch.where(denom.abs() <= _SMALL_RANGE, torch.full_like(inv_scale, 1.0), inv_scale)
    inv_scale = inv_scale.clamp(max=_INV_SCALE_CAP)
    zero = -lo * inv_scale
    if round_zero:
        zero = torch.round(zero)
    return inv_scale, zero


def hqq_codes(w: Tensor, inv_scale: Tensor, zero: Tensor, qmax: int) -> Tensor:
    """Codes as the library computes them: round(w * inv_scale + zero) clamped to [0, qmax] (zero may be fractional)."""
    return torch.round(w * inv_scale + zero).clamp(0, qmax)


@torch.no_grad()
def optimize_proximal(
    w: Tensor, inv_scale: Tensor, zero: Tensor, qmax: int, params: ProximalParams | None = None
) -> tuple[Tensor, Tensor, int]:
    """Half-quadratic iterations on fp32 groups; returns (inv_scale, zero, steps run).

    Each step: codes at the current (inv_scale, zero), dequantized W_r, error W_e = shrink(W - W_r), then the
    closed-form zero update (mean over the group of codes - (W - W_e) * inv_scale); the scale stays fixed. The
    error measured is the mean |W - W_r| of the whole tensor; the loop stops when it does not fall.
    """
    p = params or ProximalParams()
    w = w.float()
    inv_scale, zero = inv_scale.float().clone(), zero.float().clone()
    beta = p.beta
    best_error = torch.tensor(float("inf"))
    best = (inv_scale, zero)
    steps = 0
    for _ in range(p.iters):
        steps += 1
        codes = hqq_codes(w, inv_scale, zero, qmax)
        w_r = (codes - zero) / inv_scale
        w_e = shrink_lp(w - w_r, beta, p.lp_norm)
        current = (inv_scale, zero)
        zero = torch.mean(codes - (w - w_e) * inv_scale, dim=-1, keepdim=True)
        error = torch.abs(w - w_r).mean().float()
        if error < best_error:
            best_error, best = error, current
        else:
            if p.keep_best:  # v2 restores the best zero when the error rises (only then)
                inv_scale, zero = best
            break
        beta *= p.kappa
    return inv_scale, zero, steps


def hqq_quantize_groups(
    w: Tensor, bits: int, params: ProximalParams | None = None, *, round_zero: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The library's `Quantizer.quantize` (optimize=True) on groups [..., g]: (codes, scale, zero), all fp32.

    `scale` is the dequantization scale 1 / inv_scale and `zero` is fractional: W_hat = scale * (codes - zero).
    """
    qmax = 2**bits - 1
    w32 = w.float()
    inv_scale, zero = minmax_init(w32, qmax, round_zero=round_zero)
    inv_scale, zero, _ = optimize_proximal(w32, inv_scale, zero, qmax, params)
    return hqq_codes(w32, inv_scale, zero, qmax), 1.0 / inv_scale, zero


def _floor_scale(scale: Tensor, floor: float) -> Tensor:
    """Keep a scale at least `floor` away from zero, with its sign (sym_full scales may be negative)."""
    return torch.where(scale < 0, scale.clamp(max=-floor), scale.clamp(min=floor))


def covering_scale(lo: Tensor, hi: Tensor, zero: Tensor, qmax: int, negative: Tensor) -> Tensor:
    """The smallest |scale| at which every weight of [lo, hi] rounds to a level within half a step: no clipping.

    With scale s > 0 the grid spans [-s * zero, s * (qmax - zero)]; a negative scale (sym_full) mirrors it.
    """
    below = torch.where(negative, qmax - zero, zero) + 0.5
    above = torch.where(negative, zero, qmax - zero) + 0.5
    return torch.maximum((-lo).clamp(min=0) / below, hi.clamp(min=0) / above)


@torch.no_grad()
def optimize_integer_grid(
    w: Tensor,
    scale: Tensor,
    zero: Tensor,
    qmax: int,
    params: ProximalParams | None = None,
    *,
    fit_zero: bool = True,
    stored: Callable[[Tensor, Tensor], Tensor] | None = None,
    floor: float = 1e-5,
    clip: bool = False,
) -> tuple[Tensor, Tensor, int]:
    """Half-quadratic iterations on an integer grid W_hat = scale * (codes - zero); returns (scale, zero, steps).

    w is [..., g], scale and zero [..., 1], zero integer. Each step: codes = clamp(round(w / scale) + zero), the
    shrunk error W_e = shrink(W - W_hat), then (fit_zero) the HQQ zero step rounded to an integer in [0, qmax], then
    the least-squares scale for the fixed codes and zero, argmin_s ||(W - W_e) - s * (codes - zero)||^2.
    `stored(scale, zero)` maps a candidate scale to the value the format stores (fp16 rounding, GGUF rules), so
    the error that is tracked is the error of what will be written. Unless `clip`, the scale never shrinks below
    `covering_scale`: the group's extremes stay on the grid, as with min-max rounding and with the library (whose
    scale is fixed). With p < 1 an unconstrained fit clips outliers freely, which lowers the weight error and, on
    SmolLM2 at 4 and 3 bits, raised perplexity (docs/methods.md). Every group keeps the step with its lowest
    mean |W - W_hat|; step 0 is the start, so no group ends worse than it. The loop stops when the mean error of
    the whole tensor stops falling, as the library's solver does.
    """
    p = params or ProximalParams()
    w = w.float()
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    store = stored or (lambda s, z: s)
    zero = zero.float().clone()
    scale = store(scale.float().clone(), zero)
    best_scale, best_zero = scale.clone(), zero.clone()
    best_error = torch.full_like(scale, float("inf"))
    beta, last_total, steps = p.beta, float("inf"), 0
    for _ in range(p.iters):
        steps += 1
        codes = (torch.round(w / scale) + zero).clamp(0, qmax)
        w_hat = scale * (codes - zero)
        error = (w - w_hat).abs().mean(dim=-1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        total = float(error.mean())
        if total >= last_total:
            break
        last_total = total
        target = w - shrink_lp(w - w_hat, beta, p.lp_norm)
        if fit_zero:
            zero = torch.round(torch.mean(codes - target / scale, dim=-1, keepdim=True)).clamp(0, qmax)
        centred = codes - zero
        den = (centred * centred).sum(dim=-1, keepdim=True)
        fitted = (target * centred).sum(dim=-1, keepdim=True) / den.clamp_min(1e-12)
        fitted = _floor_scale(torch.where(den > 0, fitted, scale), floor)
        if not clip:
            size = torch.maximum(fitted.abs(), covering_scale(lo, hi, zero, qmax, fitted < 0))
            fitted = torch.where(fitted < 0, -size, size)
        scale = store(fitted, zero)
        beta *= p.kappa
    return best_scale, best_zero, steps
