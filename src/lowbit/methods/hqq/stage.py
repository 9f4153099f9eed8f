"""HQQ as a data-free block-scope quantizer stage (see docs/methods.md, HQQ): the half-quadratic solver per linear.

Every lowbit export stores integer zeros, so the stage writes integer grids in one of two ways (`zero` option):
- "integer" (default): `optimize_integer_grid`, the half-quadratic splitting with the zero kept an integer and the
  scale fitted by least squares, started from lowbit's min-max qparams (RTN's), best step per group;
- "round": the `hqq` library's own solver (fractional zero, fixed min-max scale), then the zero rounded to the
  nearest integer in [0, qmax] and the codes derived again at the stored scale. This is what a user of the library
  gets when they store its output in an integer-zero format; it loses most of HQQ's gain (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from lowbit.engine import BlockContext, BlockStage
from lowbit.errors import LowbitError
from lowbit.formats.gguf_types import double_quant_scale, fp16_offset_scale
from lowbit.methods.hqq.solver import (
    ProximalParams,
    minmax_init,
    optimize_integer_grid,
    optimize_proximal,
)
from lowbit.quantizer import SCALE_FLOOR, QuantizedWeight, _grouped, compute_qparams, quantize_codes
from lowbit.scheme import QuantScheme

ZERO_MODES = ("integer", "round")


@dataclass(frozen=True)
class HQQOptions:
    """HQQ's options; the solver defaults are the `hqq` library 0.2.8's default solver (docs/methods.md)."""

    zero: str = field(
        default="integer",
        metadata={"help": "integer: half-quadratic fit of scale and integer zero; round: the library's fractional "
                  "zero (scale fixed), rounded for storage"},
    )  # fmt: skip
    clip: bool = field(
        default=False,
        metadata={"help": "integer: let the scale fit clip a group's extremes (lower weight error; raised "
                  "perplexity at W4 and W3 on SmolLM2); off keeps them on the grid as min-max and the library do"},
    )  # fmt: skip
    lp_norm: float = field(default=0.7, metadata={"help": "p of the |error|^p the solver minimizes (0 < p <= 1)"})
    beta: float = field(default=10.0, metadata={"help": "starting half-quadratic penalty"})
    kappa: float = field(default=1.0, metadata={"help": "beta grows by this factor each step (library default: 1)"})
    iters: int = field(default=20, metadata={"help": "most solver steps (stops earlier when the error rises)"})
    keep_best: bool = field(
        default=False, metadata={"help": "round mode: keep the best zero seen (the library's v2 solver)"}
    )

    def params(self) -> ProximalParams:
        """The solver settings these options name."""
        return ProximalParams(self.lp_norm, self.beta, self.kappa, self.iters, self.keep_best)


def stored_scale(scale: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    """The value a [m, G] scale is stored as: the scheme's scale dtype and, for GGUF, its grid rules (an fp16
    offset s*z for Q4_1/Q5_1, d * integer sub-scales for K-quants), as `compute_qparams` applies them."""
    s = scale.to(scheme.torch_scale_dtype).to(torch.float32)
    if scheme.fp16_offset:
        s = fp16_offset_scale(s, zero)
    if scheme.double_quant is not None:
        s = double_quant_scale(s, *scheme.double_quant)
    return s


def _record(w: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Codes derived at the final (stored) scale and integer zero: dequantize() is exactly what a loader sees."""
    scale = stored_scale(scale, zero, scheme)
    codes = quantize_codes(w, scale, zero, scheme)
    record = QuantizedWeight(codes.to(torch.uint8), scale.to(scheme.torch_scale_dtype), zero.to(torch.int32), scheme)
    if not bool(torch.isfinite(record.scale).all()):
        raise LowbitError(f"a scale overflows {scheme.scale_dtype}: use scale_dtype 'float32' for this weight")
    return record


def _groups(w: Tensor, scheme: QuantScheme) -> Tensor:
    """[m, k] -> [m, G, g] (a partial last group padded with copies of the row's last column, as lowbit groups)."""
    return _grouped(w.float(), scheme.group_width(w.shape[1]))


def hqq_integer(
    w: Tensor, scheme: QuantScheme, params: ProximalParams, *, clip: bool = False
) -> tuple[QuantizedWeight, int]:
    """`zero="integer"`: start at lowbit's min-max qparams and fit scale (and an asym zero) half-quadratically."""
    start_scale, start_zero = compute_qparams(w, scheme, zero_grad="none")

    def store(scale: Tensor, zero: Tensor) -> Tensor:
        return stored_scale(scale[..., 0], zero[..., 0], scheme)[..., None]

    scale, zero, steps = optimize_integer_grid(
        _groups(w, scheme), start_scale[..., None], start_zero[..., None], scheme.qmax, params,
        fit_zero=scheme.kind == "asym", stored=store, floor=SCALE_FLOOR, clip=clip,
    )  # fmt: skip
    return _record(w, scale[..., 0], zero[..., 0], scheme), steps


def hqq_round(w: Tensor, scheme: QuantScheme, params: ProximalParams) -> tuple[QuantizedWeight, int]:
    """`zero="round"`: the library's solver as it is (round_zero at 4 bits, as its default config), then the
    fractional zero rounded into [0, qmax] and the codes derived again at the stored scale."""
    groups = _groups(w, scheme)
    inv_scale, zero = minmax_init(groups, scheme.qmax, round_zero=scheme.bits == 4)
    inv_scale, zero, steps = optimize_proximal(groups, inv_scale, zero, scheme.qmax, params)
    scale = (1.0 / inv_scale[..., 0]).clamp(min=SCALE_FLOOR)
    return _record(w, scale, torch.round(zero[..., 0]).clamp(0, scheme.qmax), scheme), steps


class HQQ(BlockStage):
    """Half-quadratic quantization (Badri & Shaji 2023): an lp-norm (p < 1) fit of each group's grid, no data."""

    name: ClassVar[str] = "hqq"
    kind: ClassVar[str] = "quantizer"
    needs_data: ClassVar[bool] = False
    supports_experts: ClassVar[bool] = True  # each expert's linear is a weight like any other; no routing needed
    supports_scheme_mix: ClassVar[bool] = True
    uses_float_chain: bool = False
    summary: ClassVar[str] = "HQQ: half-quadratic lp-norm fit of scale and zero per group (no data)"
    Options: ClassVar[type] = HQQOptions

    @classmethod
    def validate(cls, options: Any, scheme: QuantScheme) -> None:
        if options.zero not in ZERO_MODES:
            raise LowbitError(f"hqq.zero={options.zero!r} is not known: use one of {', '.join(ZERO_MODES)}")
        if options.zero == "round" and scheme.kind != "asym":
            raise LowbitError(
                f"hqq.zero=round fits the library's fractional zero, which a {scheme.kind} scheme does not have: use "
                f"an asymmetric scheme (w{scheme.bits}g{scheme.group_size}) or hqq.zero=integer"
            )
        if scheme.codebook is not None:
            raise LowbitError(
                f"hqq fits uniform grids, not the non-uniform levels of GGUF {scheme.gguf}: use another quantizer "
                "(rtn, imatrix, gptq, signround) for this type, or a GGUF type or mix without it"
            )
        if scheme.min_offset:
            other = scheme.gguf_type.kinds[1]  # type: ignore[union-attr]
            raise LowbitError(
                f"hqq fits integer zero points, not the offsets of GGUF {scheme.gguf}'s default grid: use "
                f"--scheme gguf:{scheme.gguf}-{other} or another quantizer"
            )
        options.params()  # raises on bad solver settings

    def process_block(self, ctx: BlockContext) -> None:
        params, steps = self.options.params(), {}
        for name, linear in ctx.linears().items():
            weight, scheme = linear.weight.detach(), self.scheme_for(ctx.name, name)
            if not bool(torch.isfinite(weight).all()):
                raise LowbitError("weight contains NaN or Inf: fix the float model (or the method that produced it)")
            if self.options.zero == "round":
                ctx.quantized[name], steps[name] = hqq_round(weight, scheme, params)
            else:
                ctx.quantized[name], steps[name] = hqq_integer(weight, scheme, params, clip=self.options.clip)
        ctx.metrics["hqq_steps"] = steps
