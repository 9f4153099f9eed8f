"""AWQ's auto-clip (see docs/methods.md, AWQ) as pure tensor functions: per-(row, group) symmetric clamp thresholds.

The error of a candidate is the group's partial dot product against the *unclipped* weight, measured on a
strided sub-sample of the cached (already scaled) input features, as mit-han-lab/llm-awq `auto_clip_layer`.
Candidate i = 0 is the unclipped weight and a candidate replaces the best only when strictly better, so the
chosen threshold never increases the measured error and never exceeds the original max.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from lowbit.quantizer import compute_qparams, decode, fake_quant, quantize_codes
from lowbit.scheme import ACT_BITS_OFF, QuantScheme

CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512
SKIP_MARKERS = ("q_", "k_", "query", "key", "Wqkv", "qkv_proj")  # fused q/k/v (MPT, Phi-3) as Wqkv


def clip_applies(name: str) -> bool:
    """Query/key projections are skipped: their error passes through q·kᵀ and is hard to measure."""
    return not any(marker in name for marker in SKIP_MARKERS)


def sample_tokens(x: Tensor, n_tokens: int = CLIP_TOKENS) -> Tensor:
    """Rows 0, s, 2s, ... with stride s = max(1, T // n_tokens), as the reference sub-samples."""
    rows = x.reshape(-1, x.shape[-1])
    return rows[:: max(1, rows.shape[0] // n_tokens)]


def _row_scheme(scheme: QuantScheme) -> QuantScheme:
    return dataclasses.replace(scheme, group_size=-1, act_bits=ACT_BITS_OFF)  # keeps the grid rules (GGUF)


def fake_quant_rows(w: Tensor, scheme: QuantScheme) -> Tensor:
    """Quantize-dequantize a [m, width] slice as one group per row (the slice is one quantization group)."""
    row = _row_scheme(scheme)
    scale, zero = compute_qparams(w, row, zero_grad="none")
    return decode(quantize_codes(w, scale, zero, row), scale, zero, row)


@torch.no_grad()
def search_clip(
    weight: Tensor,
    x: Tensor,
    scheme: QuantScheme,
    *,
    grid: int = CLIP_GRID,
    max_shrink: float = CLIP_MAX_SHRINK,
    token_mean: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Best clamp threshold per (row, group) for `weight` [m, k] given sampled inputs `x` [T, k].

    Returns (t_best [m, G], err_best [m, G], err_unclipped [m, G]); a partial last group is searched on its
    own columns, exactly the columns the final quantizer groups together. `token_mean` takes a candidate's squared
    errors [T, m, G] to their mean over tokens (default: over x's; a data-parallel run's covers every rank's).
    """
    token_mean = (lambda err: err.mean(dim=0)) if token_mean is None else token_mean
    w = weight.detach().float()
    m, k = w.shape
    g = scheme.group_width(k)
    groups = scheme.num_groups(k)
    pad = groups * g - k
    # Pad to whole groups: weights repeat their last column (group min/max unchanged, as the quantizer's own
    # grouping does) and inputs get zeros there, so the padding adds nothing to any partial dot product.
    wp = torch.cat([w, w[:, -1:].expand(m, pad)], dim=1) if pad else w
    xp = torch.cat([x.float(), x.new_zeros(x.shape[0], pad, dtype=torch.float32)], dim=1) if pad else x.float()
    flat = dataclasses.replace(scheme, group_size=g, act_bits=ACT_BITS_OFF)
    wg = wp.reshape(m, groups, g)
    xg = xp.reshape(-1, groups, g)
    t0 = wg.abs().amax(dim=-1)
    t_best, err_best = t0.clone(), torch.full_like(t0, float("inf"))
    err_orig = t0
    for i in range(int(max_shrink * grid)):
        t = t0 * (1 - i / grid)
        clipped = torch.maximum(torch.minimum(wg, t[..., None]), -t[..., None]).reshape(m, -1)
        diff = (fake_quant(clipped, flat, ste="identity") - wp).reshape(m, groups, g)
        err = token_mean(torch.einsum("tgj,mgj->tmg", xg, diff).square())
        if i == 0:
            err_orig = err
        better = err < err_best
        err_best = torch.where(better, err, err_best)
        t_best = torch.where(better, t, t_best)
    return t_best, err_best, err_orig


@torch.no_grad()
def apply_clip(weight: Tensor, t: Tensor, group_size: int) -> Tensor:
    """clamp(W, -t, t) per (row, group); returns a new fp32 tensor (the partial last group included)."""
    w = weight.detach().float()
    k = w.shape[1]
    g = k if group_size == -1 else group_size
    bound = t.repeat_interleave(g, dim=1)[:, :k]
    return torch.maximum(torch.minimum(w, bound), -bound)
