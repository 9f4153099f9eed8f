"""The planning pass of a mixed-precision run: one trip of the engine's block loop that measures, per linear and
option, the loss the knapsack weighs, before any stage rounds anything.

It is a block stage that changes nothing: the engine replays each block on the float chain (and, streamed, reads
and releases it as for any stage), so the planning pass needs no block loop of its own.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.engine import BlockContext, call_block
from lowbit.engine.stage import BlockStage
from lowbit.errors import LowbitError
from lowbit.methods.common.gram import gram_matrix
from lowbit.mixed.sensitivity import gradient_losses, hessian_losses
from lowbit.scheme import MixedBudget, QuantScheme

log = logging.getLogger(__name__)


class SensitivityPass(BlockStage):
    """Measures `losses[full linear name][option index]` with the budget's estimator; leaves the weights alone."""

    name: ClassVar[str] = "mixed-plan"
    kind: ClassVar[str] = "planner"
    needs_data: ClassVar[bool] = True
    summary: ClassVar[str] = "sensitivity of each linear at each option of an auto: scheme (no rounding)"
    uses_float_chain: bool = True

    def __init__(self, budget: MixedBudget, scheme: QuantScheme, estimator: str) -> None:
        super().__init__(None, scheme)
        self.budget = budget
        self.estimator = estimator  # hessian or gradient (block-local)
        self.losses: dict[str, list[float]] = {}

    def preferred_quantized_input(self) -> bool | None:
        return False  # nothing is quantized yet: every block sees the float chain

    def process_block(self, ctx: BlockContext) -> None:
        if ctx.fp_inputs is None or ctx.targets is None:
            raise LowbitError("an auto: scheme needs calibration data; pass --dataset (or 'builtin')")
        linears = ctx.linears()
        options = self.budget.options
        if self.estimator == "gradient":
            found = gradient_losses(ctx.block, linears, options, lambda: self._backward(ctx))
        else:
            grams, tokens = self._grams(ctx, linears)
            found = {name: hessian_losses(linears[name].weight, grams[name], tokens[name], options) for name in linears}
        for name, losses in found.items():
            self.losses[f"{ctx.name}.{name}"] = losses
        ctx.metrics["mixed_plan"] = {"estimator": self.estimator}

    @torch.no_grad()
    def _grams(self, ctx: BlockContext, linears: dict[str, nn.Linear]) -> tuple[dict[str, Any], dict[str, int]]:
        """X^T X (fp32, summed batch by batch) and token counts of each linear's inputs over the float chain.

        Linears that read the same tensor (q/k/v, gate/up) share one matrix, as GPTQ's Hessian pass does: a 7B block
        then holds three Gram matrices, not seven."""
        grams: dict[str, torch.Tensor] = {}
        tokens = dict.fromkeys(linears, 0)
        alias: dict[str, str] = {}  # linear -> the linear whose matrix it shares (same input tensor)
        seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, first linear that read it), per batch

        def hook_for(name: str):
            def hook(_module: nn.Module, args: tuple) -> None:
                x = args[0]
                tokens[name] += x.numel() // x.shape[-1]
                first = seen.get(id(x))
                if first is not None and first[0] is x:
                    alias.setdefault(name, first[1])
                    if alias[name] == first[1]:
                        return  # the owner's matrix already holds this batch
                seen[id(x)] = (x, name)
                gram = gram_matrix(x.detach().reshape(-1, x.shape[-1]).float())
                grams[name] = gram if name not in grams else grams[name] + gram

            return hook

        handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears.items()]
        kwargs = ctx.device_kwargs()
        try:
            for part in ctx.batches():
                seen.clear()
                call_block(ctx.block, ctx.batch(ctx.fp_inputs, part), kwargs)  # type: ignore[arg-type]
        finally:
            for handle in handles:
                handle.remove()
        for name, linear in linears.items():
            owner = alias.get(name)
            if owner is not None and name not in grams:
                grams[name] = grams[owner]
            elif name not in grams:  # never called: an MoE expert no token reached
                grams[name] = torch.zeros(linear.in_features, linear.in_features, device=ctx.device)
        return grams, tokens

    def _backward(self, ctx: BlockContext) -> None:
        """The block's MSE to its float outputs over all batches (mean per element), backpropagated."""
        kwargs = ctx.device_kwargs()
        count = ctx.targets.numel()  # type: ignore[union-attr]
        for part in ctx.batches():
            out = call_block(ctx.block, ctx.batch(ctx.fp_inputs, part), kwargs)  # type: ignore[arg-type]
            target = ctx.batch(ctx.targets, part)  # type: ignore[arg-type]
            (((out.float() - target) ** 2).sum() / count).backward()
