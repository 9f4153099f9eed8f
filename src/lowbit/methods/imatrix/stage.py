"""imatrix RTN as a block-scope quantizer stage: llama.cpp's importance-weighted scale search, then rounding.

One forward of the block over its calibration inputs records each linear's column energy (the mean square of its
inputs, llama.cpp's `imatrix`); `search.search_factors` then picks each group's clipping factors on the scheme's own
grid, and the linear is rounded to nearest there. This is the RTN llama.cpp's `llama-quantize --imatrix` and
auto-round's `iters=0` GGUF export run; lowbit's version works on every scheme, GGUF types and mixes included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lowbit.engine import BlockContext, BlockStage
from lowbit.errors import LowbitError
from lowbit.methods.common.energy import column_energy
from lowbit.methods.imatrix.search import STEP, STEPS, search_factors
from lowbit.quantizer import quantize_weight


@dataclass(frozen=True)
class IMatrixOptions:
    """The candidate clipping factors nmax / (nmax + step * i), i = -steps..steps; defaults are llama.cpp's."""

    steps: int = field(default=STEPS, metadata={"help": "candidates on each side of min-max (auto-round: 150)"})
    step: float = field(default=STEP, metadata={"help": "spacing of the candidates, in codes (auto-round: 0.08)"})
    refit: bool = field(
        default=True, metadata={"help": "also try each candidate's least-squares scale (and offset) fit (llama.cpp)"}
    )


class IMatrixRTN(BlockStage):
    """Round-to-nearest on group ranges searched against the calibration inputs' per-column energy (llama.cpp)."""

    name: ClassVar[str] = "imatrix"
    kind: ClassVar[str] = "quantizer"
    needs_data: ClassVar[bool] = True
    supports_experts: ClassVar[bool] = True  # an expert's hook sees only its routed tokens; none -> plain weights
    supports_scheme_mix: ClassVar[bool] = True
    uses_float_chain: bool = False
    summary: ClassVar[str] = "RTN on group ranges searched against input importance (llama.cpp's imatrix)"
    Options: ClassVar[type] = IMatrixOptions

    @classmethod
    def validate(cls, options: IMatrixOptions, scheme) -> None:
        if options.steps < 0 or not options.step > 0:
            raise LowbitError("imatrix needs steps >= 0 and step > 0")

    def process_block(self, ctx: BlockContext) -> None:
        energy = column_energy(ctx)
        for name, linear in ctx.linears().items():
            w = linear.weight.detach()
            scheme = self.scheme_for(ctx.name, name)
            opts = self.options
            hi, lo = search_factors(w, energy[name].to(w.device), scheme, opts.steps, opts.step, opts.refit)
            ctx.quantized[name] = quantize_weight(w, scheme, gamma_hi=hi.to(w.device), gamma_lo=lo.to(w.device))
