"""The importance-weighted grid search behind llama.cpp's imatrix quantization, as pure tensor functions.

llama.cpp (`make_qx_quants`, `make_qkx2_quants` in ggml-quants.c) does not take a group's min-max scale as it is: it
tries a few scales around it and keeps the one with the least squared error, each element weighted by how much its
input column matters (`imatrix`: the mean square of the column's calibration inputs) times `sqrt(sigma2 + w^2)`
(`sigma2`: the group's mean square weight). Here the candidates are clipping factors on lowbit's own range rule
(`compute_qparams`), so every candidate, and the result, lies on the scheme's grid (GGUF fp16 offsets and K-quant
double quantization included) and any quantizer can start from it. The default factors are llama.cpp's:
`nmax / (nmax + 0.1 i)` for i in -9..9, nmax = 2^(bits-1); auto-round's `search_scales` tries a wider, finer
set (i in -150..150, step 0.08 at 4 and 5 bits), which the stage's options can ask for. An asymmetric grid also
searches its low side alone. Each candidate's codes also give a least-squares fit, tried as one more candidate
(llama.cpp's refit; lowbit then rounds to nearest there): the scale alone on a symmetric grid (`make_qx_quants`),
scale and offset jointly on GGUF's offset grids (`make_qkx2_quants`, the min kept <= 0 on K-quants). Factor 1
(min-max) is tried first and a candidate replaces the best only when strictly better, so the weighted error never
exceeds min-max rounding's.

K-quants quantize the group scales (and mins) a second time, per 256-value super-block. As llama.cpp does, each
group is searched alone with its scale unquantized (a group's choice then cannot move its neighbours' grid through
the shared super-scale); the double quantization applies to the result. A super-block whose stored error ends up
above min-max's keeps min-max, so the guarantee above holds on the stored grid too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.quantizer import _grouped, compute_qparams, decode, fake_quant, quantize_codes
from lowbit.scheme import QuantScheme

STEPS = 9  # llama.cpp tries i in -9..9 ...
STEP = 0.1  # ... in steps of 0.1


def candidate_factors(bits: int, steps: int = STEPS, step: float = STEP) -> list[float]:
    """Clipping factors nmax / (nmax + step * i), i = -steps..steps (positive denominators only), 1.0 first."""
    nmax = 2 ** (bits - 1)
    return [1.0] + [nmax / (nmax + step * i) for i in range(-steps, steps + 1) if i != 0 and nmax + step * i > step]


def element_weights(w: Tensor, energy: Tensor, scheme: QuantScheme) -> Tensor:
    """llama.cpp's per-element weights [m, G, g]: column energy times sqrt(group mean square + w^2).

    `energy` [k] is the mean square input of each column; a zero (a column no calibration token reached, an expert
    no token was routed to) is replaced by the mean of the others, or 1 when all are zero.
    """
    k = w.shape[1]
    e = energy.float().clamp(min=0)
    if bool((e == 0).any()):
        fill = e[e > 0].mean() if bool((e > 0).any()) else torch.tensor(1.0)
        e = torch.where(e > 0, e, fill)
    g = scheme.group_width(k)
    wg = _grouped(w.float(), g)
    eg = _grouped(e.expand_as(w).contiguous(), g)
    sigma2 = (wg * wg).mean(dim=-1, keepdim=True)
    return eg * torch.sqrt(sigma2 + wg * wg)


def _group_error(
    w: Tensor, weights: Tensor, scheme: QuantScheme, hi: Tensor, lo: Tensor, double_quant: bool = True
) -> Tensor:
    """Weighted squared error [m, G] of rounding w with clipping factors (hi, lo) [m, G]."""
    q = fake_quant(w, scheme, gamma_hi=hi, gamma_lo=lo, ste="identity", double_quant=double_quant)
    g = scheme.group_width(w.shape[1])
    return (weights * (_grouped(q, g) - _grouped(w.float(), g)) ** 2).sum(dim=-1)


def _codes_at(w: Tensor, scheme: QuantScheme, hi: Tensor, lo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scale [m, G], zero [m, G], codes [m, G, g]) of a candidate, group scales unquantized."""
    scale, zero = compute_qparams(w, scheme, gamma_hi=hi, gamma_lo=lo, zero_grad="none", double_quant=False)
    codes = _grouped(quantize_codes(w, scale, zero, scheme), scheme.group_width(w.shape[1]))
    return scale, zero, codes


def _refit(w: Tensor, weights: Tensor, scheme: QuantScheme, factor: Tensor) -> Tensor:
    """llama.cpp's least-squares step for a symmetric grid: with the codes l a candidate rounds to, the scale
    sum(W x l) / sum(W l^2) fits the group best; returned as the clipping factor that gives that scale."""
    scale, zero, codes = _codes_at(w, scheme, factor, factor)
    levels = decode(codes, torch.ones_like(codes), zero[..., None], scheme)  # c - z, or IQ4_NL's level of c
    x = _grouped(w.float(), scheme.group_width(w.shape[1]))
    num = (weights * x * levels).sum(dim=-1)
    den = (weights * levels * levels).sum(dim=-1)
    ratio = torch.where(den > 0, num / den.clamp(min=1e-30) / scale, torch.ones_like(scale))
    return torch.where(ratio > 0, factor * ratio, factor)


def _refit_offset(w: Tensor, weights: Tensor, scheme: QuantScheme, hi: Tensor, lo: Tensor) -> tuple[Tensor, Tensor]:
    """llama.cpp's joint least-squares step for an offset grid (`w = s*c + m`): with a candidate's codes c, the
    (s, m) that fit the group best in the weighted sense, as clipping factors (hi', lo') of the group's range.
    K-quants keep m <= 0 (their min is stored unsigned): a positive m is refitted with m = 0. Groups where the fit
    is degenerate or not expressible as factors keep the candidate's."""
    _, _, c = _codes_at(w, scheme, hi, lo)
    x = _grouped(w.float(), scheme.group_width(w.shape[1]))
    sw, sl, sll = weights.sum(-1), (weights * c).sum(-1), (weights * c * c).sum(-1)
    sx, sxl = (weights * x).sum(-1), (weights * x * c).sum(-1)
    det = sw * sll - sl * sl
    safe = det.clamp(min=1e-30)
    s = (sw * sxl - sx * sl) / safe
    m = (sll * sx - sl * sxl) / safe
    if scheme.double_quant is not None:
        positive = m > 0
        s = torch.where(positive, sxl / sll.clamp(min=1e-30), s)
        m = torch.where(positive, torch.zeros_like(m), m)
    lo0, hi0 = torch.aminmax(x, dim=-1)
    if scheme.include_zero or scheme.double_quant is not None:
        lo0, hi0 = lo0.clamp(max=0), hi0.clamp(min=0)
    top = s * scheme.qmax + m
    lo_ok = (lo0 != 0) | (m == 0)
    ok = (det > 0) & (s > 0) & (hi0 != 0) & lo_ok
    new_hi = torch.where(ok, top / torch.where(hi0 != 0, hi0, 1.0), hi)
    new_lo = torch.where(ok & (lo0 != 0), m / torch.where(lo0 != 0, lo0, 1.0), torch.where(ok, 1.0, lo))
    return new_hi, new_lo


def _keep_min_max_where_worse(
    w: Tensor, weights: Tensor, scheme: QuantScheme, hi: Tensor, lo: Tensor
) -> tuple[Tensor, Tensor]:
    """K-quants: per super-block, min-max factors where the searched ones store a larger error."""
    per = scheme.double_quant[0]
    m, groups = hi.shape
    if groups % per:
        return hi, lo
    ones = torch.ones_like(hi)
    searched = _group_error(w, weights, scheme, hi, lo).view(m, groups // per, per).sum(-1)
    plain = _group_error(w, weights, scheme, ones, ones).view(m, groups // per, per).sum(-1)
    worse = (searched > plain).repeat_interleave(per, dim=1)
    return torch.where(worse, ones, hi), torch.where(worse, ones, lo)


@torch.no_grad()
def search_factors(
    w: Tensor, energy: Tensor, scheme: QuantScheme, steps: int = STEPS, step: float = STEP, refit: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-group clipping factors (gamma_hi, gamma_lo) [m, G] that minimize the importance-weighted error of
    rounding `w` [m, k] on `scheme`'s grid, for `quantize_weight(..., gamma_hi=, gamma_lo=)`."""
    weights = element_weights(w, energy, scheme)
    m, groups = w.shape[0], scheme.num_groups(w.shape[1])
    best_hi = torch.ones(m, groups)
    best_lo = torch.ones(m, groups)
    best = _group_error(w, weights, scheme, best_hi, best_lo, double_quant=False)
    factors = candidate_factors(scheme.bits, steps, step)[1:]

    def keep(hi: Tensor, lo: Tensor) -> None:
        nonlocal best
        err = _group_error(w, weights, scheme, hi, lo, double_quant=False)
        better = err < best
        best = torch.where(better, err, best)
        best_hi.copy_(torch.where(better, hi, best_hi))
        best_lo.copy_(torch.where(better, lo, best_lo))

    def full(f: float) -> Tensor:
        return torch.full((m, groups), f)

    symmetric = scheme.kind in ("sym", "sym_full", "sym_omni", "nl")
    fits = refit and (symmetric or scheme.min_offset)  # lowbit's integer-zero grids have no refit
    for f in [1.0, *factors] if fits else []:  # each candidate's least-squares fit (min-max's too), one per candidate
        if symmetric:
            fitted = _refit(w, weights, scheme, full(f))
            keep(fitted, fitted)
        else:
            keep(*_refit_offset(w, weights, scheme, full(f), full(f)))
    for f in factors:
        keep(full(f), full(f))
    if not symmetric:  # the low side alone, from the best common factor
        start_hi = best_hi.clone()
        for f in factors:
            keep(start_hi, full(f))
    if scheme.double_quant is not None:
        return _keep_min_max_where_worse(w, weights, scheme, best_hi, best_lo)
    return best_hi, best_lo
