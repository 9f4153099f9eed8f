"""Gram matrices X^T X of layer inputs: GPTQ's Hessians and AWQ's quadratic clip loss both need them."""

from __future__ import annotations

import torch
from torch import Tensor

GRAM_PANEL = 512


def gram_matrix(rows: Tensor, panel: int = GRAM_PANEL) -> Tensor:
    """rows^T rows for rows [tokens, k], computing only the upper triangle's panels and mirroring them.

    A Gram matrix is symmetric: with panels of `panel` columns the products cover k(k + panel)/2 entries instead
    of k^2 (0.67x the multiply-adds at k = 1536); the entries are the full product's dot products (their summation
    order, and so their last bits, may differ).
    """
    k = rows.shape[-1]
    if k <= panel:
        return rows.t() @ rows
    out = torch.empty(k, k, dtype=rows.dtype, device=rows.device)
    for start in range(0, k, panel):
        stop = min(start + panel, k)
        out[start:stop, start:] = rows[:, start:stop].t() @ rows[:, start:]
        out[stop:, start:stop] = out[start:stop, stop:].t()
    return out
