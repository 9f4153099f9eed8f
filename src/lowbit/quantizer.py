"""The integer quantizer family: pure tensor functions every method uses (see docs/methods.md).

All math is fp32. Scales are rounded through the scheme's scale dtype before codes are computed, so
the fake-quant weight a method trains against equals, bit for bit, what a loader dequantizes. The grid itself
(group view, codes, decoding) is lowbit/grid.py; its functions are importable from here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.gguf_types import double_quant_min, double_quant_scale, fp16_offset_scale
from lowbit.grid import (  # noqa: F401 (re-exported: methods import the grid functions from the quantizer)
    _check_matrix,
    _check_param,
    _check_qparams,
    _check_v,
    _codes,
    _g_idx_long,
    _grouped,
    _ungrouped,
    _width,
    decode,
    dequantize,
    quantize_codes,
    round_ste,
)
from lowbit.scheme import QuantScheme
from lowbit.weight_checks import record_problems

SCALE_FLOOR = 1e-5
_ZERO_GRAD_MODES = ("ste", "none")
_STE_MODES = ("clamp_aware", "identity")


# ----------------------------------------------------------------------------------------------------------
# qparams


def _cast_scale(s: Tensor, scheme: QuantScheme) -> Tensor:
    """Round the scale through the storage dtype (differentiable), so training sees the stored value."""
    return s.to(scheme.torch_scale_dtype).to(torch.float32)


def _round_zero(x: Tensor, zero_grad: str) -> Tensor:
    return round_ste(x) if zero_grad == "ste" else torch.round(x.detach())


def _qparams_from_range(
    lo: Tensor, hi: Tensor, scheme: QuantScheme, zero_grad: str, double_quant: bool = True
) -> tuple[Tensor, Tensor]:
    """Scale and zero from the (clipped) group range lo' <= hi', per scheme kind."""
    bits, qmax = scheme.bits, scheme.qmax
    dq = scheme.double_quant if double_quant else None
    if scheme.min_offset:  # GGUF's own asymmetric grids: the "zero" is the offset, in weight units (w = s*c - z)
        if scheme.double_quant is None:  # Q4_1/Q5_1: w = d*q + m, fp16 d and fp16 m = -z
            scale = _cast_scale(((hi - lo) / qmax).clamp(min=SCALE_FLOOR), scheme)
            return scale, _cast_scale(-lo, scheme)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # K-quants: w = d*sc*q - dmin*m, the min m is unsigned
        scale = _cast_scale(((hi - lo) / qmax).clamp(min=SCALE_FLOOR), scheme)
        return (scale, -lo) if dq is None else (double_quant_scale(scale, *dq), double_quant_min(-lo, *dq))
    if scheme.kind == "asym":
        scale = _cast_scale(((hi - lo) / qmax).clamp(min=SCALE_FLOOR), scheme)
        zero = _round_zero(-lo / scale, zero_grad).clamp(0, qmax)
        if scheme.fp16_offset:  # GGUF Q4_1/Q5_1: the stored offset -s*z is fp16, so s*z must be one (straight-through)
            scale = scale + (fp16_offset_scale(scale, zero) - scale).detach()
        return scale, zero
    if scheme.codebook is not None:  # IQ4_NL: the larger side maps to the first level (d < 0 flips the table)
        top = torch.where(hi.abs() > lo.abs(), hi, lo) / scheme.codebook[0]
        floored = torch.where(top < 0, top.clamp(max=-SCALE_FLOOR), top.clamp(min=SCALE_FLOOR))
        return _cast_scale(floored, scheme), torch.zeros_like(lo)
    if scheme.kind == "sym_full":
        a_lo, a_hi = (-lo).clamp(min=0), hi.clamp(min=0)
        raw = torch.where(a_hi < a_lo, 1.0, -1.0) * torch.maximum(a_hi, a_lo) / 2 ** (bits - 1)
        floored = torch.where(raw < 0, raw.clamp(max=-SCALE_FLOOR), raw.clamp(min=SCALE_FLOOR))
        return _cast_scale(floored, scheme), torch.full_like(lo, 2 ** (bits - 1))
    amax = torch.maximum(lo.abs(), hi.abs())
    if scheme.kind == "sym":
        scale = _cast_scale((2 * amax / qmax).clamp(min=SCALE_FLOOR), scheme)
        if dq is not None:  # GGUF K-quants: scale = fp16 d * integer sc per super-block
            scale = double_quant_scale(scale, *dq)
        return scale, torch.full_like(lo, 2 ** (bits - 1))
    scale = _cast_scale((amax / (2 ** (bits - 1) - 1)).clamp(min=SCALE_FLOOR), scheme)  # sym_omni
    return scale, torch.full_like(lo, 2 ** (bits - 1) - 1)


def compute_qparams(
    w: Tensor,
    scheme: QuantScheme,
    *,
    gamma_hi: Tensor | None = None,
    gamma_lo: Tensor | None = None,
    zero_grad: str = "ste",
    double_quant: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-group (scale, zero), both fp32 [m, G], differentiable w.r.t. w and the clipping factors.

    The scale holds values representable in `scheme.scale_dtype`; the zero holds integers in [0, qmax].
    gamma_hi / gamma_lo (broadcastable to [m, G], None = 1) multiply hi and lo after the include_zero
    step. zero_grad="ste" lets gradients flow through the zero's rounding, "none" blocks them.
    double_quant=False leaves a K-quant's group scales (and mins) unquantized: each group's own fit, before
    llama.cpp's second quantization; such params are off the stored grid (searches only).
    """
    _check_matrix(w)
    if zero_grad not in _ZERO_GRAD_MODES:
        raise LowbitError(f"zero_grad={zero_grad!r} is not known: use one of {', '.join(_ZERO_GRAD_MODES)}")
    m, k = w.shape
    num_groups = scheme.num_groups(k)
    _check_param(gamma_hi, m, num_groups, "gamma_hi")
    _check_param(gamma_lo, m, num_groups, "gamma_lo")
    lo, hi = torch.aminmax(_grouped(w.float(), scheme.group_width(k)), dim=-1)
    if scheme.include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if gamma_hi is not None:
        hi = hi * gamma_hi.float()
    if gamma_lo is not None:
        lo = lo * gamma_lo.float()
    return _qparams_from_range(lo, hi, scheme, zero_grad, double_quant)


# ----------------------------------------------------------------------------------------------------------
# fake quantization and the export record


def _fake_quant_clamp_aware(
    w32: Tensor,
    scheme: QuantScheme,
    v: Tensor | None,
    gamma_hi: Tensor | None,
    gamma_lo: Tensor | None,
    zero_grad: str,
    double_quant: bool = True,
) -> Tensor:
    k = w32.shape[1]
    scale, zero = compute_qparams(
        w32, scheme, gamma_hi=gamma_hi, gamma_lo=gamma_lo, zero_grad=zero_grad, double_quant=double_quant
    )
    g = _width(k, scale.shape[1], scheme.group_size)
    s, z = scale[..., None], zero[..., None]
    vg = None if v is None else _grouped(v.float(), g)
    codes = _codes(_grouped(w32, g), s, z, vg, True, scheme)
    return _ungrouped(decode(codes, s, z, scheme), k)


def fake_quant(
    w: Tensor,
    scheme: QuantScheme,
    *,
    v: Tensor | None = None,
    gamma_hi: Tensor | None = None,
    gamma_lo: Tensor | None = None,
    ste: str = "clamp_aware",
    zero_grad: str = "ste",
    double_quant: bool = True,
) -> Tensor:
    """Quantize-dequantize w to an fp32 [m, k] tensor that a method trains or evaluates against.

    "clamp_aware": autograd through clamp and qparams (clipped weights get no gradient; s, z, gamma and
    v get theirs). "identity": gradient 1 w.r.t. w, qparams and v constant. Either way the value equals
    `quantize_weight(...).dequantize()` bit for bit (double_quant=False: see compute_qparams).
    """
    _check_matrix(w)
    if ste not in _STE_MODES:
        raise LowbitError(f"ste={ste!r} is not known: use one of {', '.join(_STE_MODES)}")
    _check_v(v, w.shape)
    w32 = w.float()
    if ste == "clamp_aware":
        return _fake_quant_clamp_aware(w32, scheme, v, gamma_hi, gamma_lo, zero_grad, double_quant)
    with torch.no_grad():
        q = _fake_quant_clamp_aware(w32, scheme, v, gamma_hi, gamma_lo, zero_grad, double_quant)
    # q + (w - w) is exactly q (w + (q - w) need not be), with gradient 1 w.r.t. w.
    return q + (w32 - w32.detach())


@dataclass
class QuantizedWeight:
    """What every method hands to export for one linear layer."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    scheme: QuantScheme
    g_idx: Tensor | None = None
    bias: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the quantized weight."""
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    def dequantize(self) -> Tensor:
        """The fp32 weight a loader reconstructs; equals the method's last fake-quant weight."""
        scheme = self.scheme
        return dequantize(
            self.codes, self.scale, self.zero, scheme.group_size, self.g_idx, offset=scheme.min_offset,
            codebook=scheme.codebook,
        )  # fmt: skip

    def validate(self) -> None:
        """Check dtypes, shapes, the symmetric zero and group use; raise ValueError naming the first violation."""
        for problem in record_problems(self):
            raise ValueError(f"invalid QuantizedWeight ({self.scheme.name}): {problem}")

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only; store `scheme.to_dict()` next to them as metadata."""
        state = {"codes": self.codes, "scale": self.scale, "zero": self.zero}
        if self.g_idx is not None:
            state["g_idx"] = self.g_idx
        if self.bias is not None:
            state["bias"] = self.bias
        return state

    @classmethod
    def from_state(cls, state: dict[str, Tensor], scheme: QuantScheme) -> QuantizedWeight:
        """Inverse of `state_dict`; the record is validated (ValueError when the tensors are inconsistent)."""
        missing = [key for key in ("codes", "scale", "zero") if key not in state]
        unknown = sorted(set(state) - {"codes", "scale", "zero", "g_idx", "bias"})
        if missing or unknown:
            raise LowbitError(
                f"quantized weight state has missing {missing} / unknown {unknown} keys: "
                "pass the dict that QuantizedWeight.state_dict() produced"
            )
        record = cls(state["codes"], state["scale"], state["zero"], scheme, state.get("g_idx"), state.get("bias"))
        record.validate()
        return record


def quantize_weight(
    w: Tensor,
    scheme: QuantScheme,
    *,
    v: Tensor | None = None,
    gamma_hi: Tensor | None = None,
    gamma_lo: Tensor | None = None,
    bias: Tensor | None = None,
) -> QuantizedWeight:
    """Build the export record; its `dequantize()` equals `fake_quant` with the same inputs, bit for bit."""
    _check_matrix(w)
    _check_v(v, w.shape)
    with torch.no_grad():
        if not bool(torch.isfinite(w).all()):
            raise LowbitError("weight contains NaN or Inf: fix the float model (or the method that produced it)")
        scale, zero = compute_qparams(w, scheme, gamma_hi=gamma_hi, gamma_lo=gamma_lo)
        codes = quantize_codes(w, scale, zero, scheme, v=v)
        stored = scale.to(scheme.torch_scale_dtype)
        if not bool(torch.isfinite(stored).all()):
            raise LowbitError(
                f"a scale overflows {scheme.scale_dtype}: use scale_dtype 'float32' or 'bfloat16' for this weight"
            )
        return QuantizedWeight(
            codes=codes.to(torch.uint8),
            scale=stored,
            zero=zero.to(torch.float32 if scheme.min_offset else torch.int32),
            scheme=scheme,
            bias=None if bias is None else bias.detach(),
        )
