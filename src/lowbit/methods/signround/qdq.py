"""A fused QDQ with a hand-written backward for SignRound's asymmetric quantizer (the speed path).

The generic `fake_quant` builds an autograd graph of ~20 elementwise ops over every weight, re-pads the partial last
group and recomputes the (constant) group min/max on each call; on a CPU that costs more than the block's own
forward and backward. Here the grouped weight and its range are computed once per layer, the forward repeats
`fake_quant`'s exact operation sequence (so the value is bit-identical; tests check it), and the backward is the
closed-form straight-through gradient w.r.t. V, alpha and beta.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.quantizer import SCALE_FLOOR, _grouped, _qparams_from_range, _ungrouped
from lowbit.scheme import QuantScheme


class GroupedWeight:
    """A weight's [m, G, g] view (partial last group padded as the quantizer does) and its include-zero range."""

    def __init__(self, weight: Tensor, scheme: QuantScheme) -> None:
        k = weight.shape[1]
        self.k = k
        self.g = scheme.group_width(k)
        self.scheme = scheme
        self.wg = _grouped(weight.float(), self.g).contiguous()
        lo, hi = torch.aminmax(self.wg, dim=-1)
        if scheme.include_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        self.lo0, self.hi0 = lo, hi

    def qdq(self, v: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        """Fake-quant weight [m, k]; differentiable w.r.t. v, alpha, beta (alpha, beta clamped to [0, 1])."""
        return _AsymQDQ.apply(v, alpha, beta, self)


class _AsymQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, alpha: Tensor, beta: Tensor, gw: GroupedWeight) -> Tensor:  # type: ignore[override]
        scheme = gw.scheme
        a, b = alpha.clamp(0, 1), beta.clamp(0, 1)
        hi, lo = gw.hi0 * a, gw.lo0 * b
        scale, zero = _qparams_from_range(lo, hi, scheme, "ste")
        s, z = scale[..., None], zero[..., None]
        t = gw.wg / s + _grouped(v, gw.g)
        r = t + (torch.round(t) - t)  # round_ste's forward value, exactly as fake_quant computes it
        rz = r + z
        codes = rz.clamp(0, scheme.qmax)
        ctx.save_for_backward(alpha, beta, scale, zero, rz, codes, lo, hi)
        ctx.gw = gw
        return _ungrouped(s * (codes - z), gw.k)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        alpha, beta, scale, zero, rz, codes, lo, hi = ctx.saved_tensors
        gw: GroupedWeight = ctx.gw
        qmax = gw.scheme.qmax
        m = grad_out.shape[0]
        go = grad_out.float()
        pad = gw.wg.shape[1] * gw.g - gw.k
        if pad:  # padded columns are dropped by the forward: no gradient
            go = torch.cat([go, go.new_zeros(m, pad)], dim=1)
        go = go.reshape(m, -1, gw.g)
        s, z = scale[..., None], zero[..., None]
        inside = ((rz >= 0) & (rz <= qmax)).to(go.dtype)
        grad_v = _ungrouped(go * s * inside, gw.k)
        # out = s * (c - z), c = clamp(round(w/s + v) + z): d out/ds = (c - z) - in * w / s ; d out/dz = s * (in - 1)
        grad_s = (go * ((codes - z) - inside * gw.wg / s)).sum(-1)
        grad_z = (go * (inside - 1.0)).sum(-1) * scale
        # z = clamp(round_ste(-lo / s), 0, qmax): straight-through inside the clamp range
        z_raw = torch.round(-lo / scale)
        z_in = ((z_raw >= 0) & (z_raw <= qmax)).to(go.dtype)
        grad_s = grad_s + grad_z * z_in * lo / scale**2
        grad_lo = -grad_z * z_in / scale
        # s = cast(((hi - lo) / qmax).clamp(min=floor)): the cast passes the gradient, the floor blocks it
        s_in = (((hi - lo) / qmax) >= SCALE_FLOOR).to(go.dtype)
        grad_hi = grad_s * s_in / qmax
        grad_lo = grad_lo - grad_s * s_in / qmax
        a_in = ((alpha >= 0) & (alpha <= 1)).to(go.dtype)
        b_in = ((beta >= 0) & (beta <= 1)).to(go.dtype)
        return grad_v, grad_hi * gw.hi0 * a_in, grad_lo * gw.lo0 * b_in, None


def supports_fast_qdq(scheme: QuantScheme) -> bool:
    """The fused path covers the asymmetric kind (SignRound's default); other kinds use `fake_quant`."""
    return scheme.kind == "asym"
