"""RTN: round-to-nearest with min-max qparams, every linear of every block; needs no data."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from lowbit.arch import ArchSpec
from lowbit.engine import BlockContext, BlockStage
from lowbit.quantizer import QuantizedWeight, quantize_weight
from lowbit.scheme import QuantScheme


class RTN(BlockStage):
    """Plain min-max rounding (docs/methods.md): the baseline every method must beat."""

    name: ClassVar[str] = "rtn"
    kind: ClassVar[str] = "quantizer"
    needs_data: ClassVar[bool] = False
    supports_act_quant: ClassVar[bool] = True  # the W-A baseline row (activations quantized at evaluation)
    supports_experts: ClassVar[bool] = True  # per-expert linears like any other (arch/moe.py)
    supports_scheme_mix: ClassVar[bool] = True
    uses_float_chain: bool = False
    summary: ClassVar[str] = "round-to-nearest with min-max scales (no data)"

    def process_block(self, ctx: BlockContext) -> None:
        for name, linear in ctx.linears().items():
            ctx.quantized[name] = quantize_weight(linear.weight.detach(), self.scheme_for(ctx.name, name))


def rtn_quantize_model(model: nn.Module, arch: ArchSpec, scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    """RTN applied directly to every block linear, outside the engine (a reference for tests)."""
    records = {}
    for index, block in enumerate(arch.blocks(model)):
        for name, linear in arch.linears(block).items():
            records[f"{arch.block_name(index)}.{name}"] = quantize_weight(linear.weight.detach(), scheme)
    return records


STAGES = (RTN,)
RECIPES: dict = {}
