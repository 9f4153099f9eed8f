"""Each block linear's input energy per column (llama.cpp's importance matrix), from one block forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.engine import BlockContext
from lowbit.engine.context import call_block
from lowbit.engine.precision import autocast
from lowbit.errors import LowbitError


def column_energy(ctx: BlockContext) -> dict[str, Tensor]:
    """Each linear's mean square input per column [in_features] over the block's calibration inputs (zeros for a
    linear no token reached, e.g. an expert the router never picked)."""
    if ctx.inputs is None:
        raise LowbitError(
            "the importance search needs calibration data; pass --dataset (or 'builtin' for the offline default)"
        )
    linears = ctx.linears()
    sums = {name: torch.zeros(linear.in_features, dtype=torch.float64) for name, linear in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += (x.float() ** 2).sum(dim=0, dtype=torch.float64).cpu()
            counts[name] += x.shape[0]

        return hook

    handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears.items()]
    kwargs = ctx.device_kwargs()
    try:  # batch by batch, keeping no output chain: only the hooks' sums are wanted
        with torch.no_grad(), autocast(ctx.autocast, ctx.device):
            for part in ctx.batches():
                call_block(ctx.block, ctx.batch(ctx.inputs, part), kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / max(counts[name], 1)).float() for name in linears}
