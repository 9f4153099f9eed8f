"""OmniQuant's Learnable Weight Clipping (docs/methods.md, OmniQuant): sigmoid-gated clipping factors per (row, group).

In lowbit terms LWC is the scheme's quantizer (docs/methods.md: asym, or the `sym_omni` kind) with
gamma_hi = sigmoid(u), gamma_lo = sigmoid(l), the raw min/max range (`include_zero=False`) and no gradient through
the zero point's rounding (`zero_grad="none"`), so u and l learn only through the scale.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from lowbit.quantizer import QuantizedWeight, _grouped, fake_quant, quantize_weight
from lowbit.scheme import QuantScheme

LWC_INIT = 4.0  # sigmoid(4) ~ 0.982: clipping starts at 98.2% of the range (reference)


def lwc_scheme(scheme: QuantScheme) -> QuantScheme:
    """The scheme LWC quantizes with: the raw group min/max, never widened to include zero."""
    return dataclasses.replace(scheme, include_zero=False)


class LearnableClip:
    """One linear's clipping factors u (max side) and l (min side), shape [m, G], both initialised to 4.0.

    `learnable=False` gives the reference's quantizer without `--lwc`: plain min/max (factors fixed at 1).
    """

    def __init__(self, out_features: int, in_features: int, scheme: QuantScheme, learnable: bool = True) -> None:
        self.scheme = lwc_scheme(scheme)
        groups = scheme.num_groups(in_features)
        self.upper = nn.Parameter(torch.full((out_features, groups), LWC_INIT)) if learnable else None
        self.lower = nn.Parameter(torch.full((out_features, groups), LWC_INIT)) if learnable else None

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.upper is None else [self.upper, self.lower]

    @torch.no_grad()
    def init_from_search(self, weight: Tensor, grid: int = 20, max_shrink: float = 0.5) -> None:
        """Start u = l at the clip ratio of least weight error per (row, group) (`lwc_init=mse`, not the reference).

        Ratios 1 - max_shrink * i / grid are tried; the factor is capped at the reference's sigmoid(4) start.
        """
        if self.upper is None:
            return
        gamma = search_clip_ratio(weight, self.scheme, grid, max_shrink).clamp(
            max=torch.sigmoid(torch.tensor(LWC_INIT))
        )
        logit = torch.log(gamma / (1 - gamma))
        self.upper.copy_(logit)
        self.lower.copy_(logit)

    def _gammas(self) -> dict[str, Tensor]:
        if self.upper is None:
            return {}
        return {"gamma_hi": torch.sigmoid(self.upper), "gamma_lo": torch.sigmoid(self.lower)}

    def fake(self, weight: Tensor) -> Tensor:
        """Differentiable fake-quant weight (round with STE; gradients reach u, l through the scale)."""
        return fake_quant(weight, self.scheme, zero_grad="none", **self._gammas())

    @torch.no_grad()
    def record(self, weight: Tensor) -> QuantizedWeight:
        """The export record; `record(w).dequantize()` equals `fake(w)` bit for bit."""
        return quantize_weight(weight.detach(), self.scheme, **{k: v.detach() for k, v in self._gammas().items()})


@torch.no_grad()
def search_clip_ratio(weight: Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5) -> Tensor:
    """Per (row, group), the clip ratio gamma (applied to both ends) minimising ||Q(w) - w||^2 over a grid."""
    w = weight.detach().float()
    m, k = w.shape
    width = scheme.group_width(k)
    groups = scheme.num_groups(k)
    best_err = torch.full((m, groups), float("inf"))
    best = torch.ones(m, groups)
    for i in range(grid):
        ratio = 1.0 - max_shrink * i / grid
        gamma = torch.full((m, groups), ratio)
        err = _grouped((fake_quant(w, scheme, gamma_hi=gamma, gamma_lo=gamma) - w).pow(2), width).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, gamma, best)
    return best
