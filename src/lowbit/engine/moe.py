"""Routing statistics of a sparse MoE block during calibration: how many calibration tokens reach each expert.

An expert's linears see only the tokens routed to it, so a rarely picked expert is calibrated on little data and
one never picked on none (GPTQ then rounds its linears with RTN, methods/gptq/stage.py). The block loop
records the counts of every sparse block in the run record, so a reader can tell which experts were calibrated on what.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from lowbit.arch.base import block_config
from lowbit.engine.context import BlockContext, call_block

log = logging.getLogger(__name__)


class _Routed(Exception):
    """Raised once the experts module received its routing: nothing after it changes the counts."""


@torch.no_grad()
def routing_metrics(ctx: BlockContext) -> dict[str, Any] | None:
    """Tokens routed to each expert of the block on `ctx.inputs` (None: a dense block, or no calibration data).

    A pre-hook on the experts module reads the (token, top-k) expert indices the router chose, so the forward stops
    before any expert runs. `routed` sums to tokens * top_k.
    """
    arch = ctx.arch
    count = arch.expert_count(ctx.block)
    if not count or ctx.inputs is None:
        return None
    arch.prepare_block(ctx.block)
    counts = torch.zeros(count, dtype=torch.long)

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        index = index.reshape(-1).to("cpu", torch.long)
        counts.add_(torch.bincount(index[index < count], minlength=count))
        raise _Routed

    handle = ctx.block.get_submodule(arch.experts.path).register_forward_pre_hook(hook, with_kwargs=True)
    kwargs = ctx.device_kwargs()
    try:
        for part in ctx.batches():
            with contextlib.suppress(_Routed):
                call_block(ctx.block, ctx.batch(ctx.inputs, part), kwargs)
    finally:
        handle.remove()
    tokens = int(ctx.inputs.shape[0] * ctx.inputs.shape[1])
    routed = counts.tolist()
    unrouted = [index for index, n in enumerate(routed) if n == 0]
    if unrouted:
        log.warning(
            "block %d: expert(s) %s received none of the %d calibration tokens: GPTQ rounds their linears with RTN, "
            "trained quantizers keep their initial rounding; more or longer calibration samples reach more experts",
            ctx.index,
            unrouted,
            tokens,
        )
    top_k = getattr(block_config(ctx.block), arch.experts.top_k_attr, None)
    return {"experts": count, "top_k": top_k, "tokens": tokens, "routed": routed, "unrouted": unrouted}
