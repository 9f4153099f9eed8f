"""GPTQ as a block-scope quantizer stage (see docs/methods.md, GPTQ): true-sequential subsets, Hessians from hooks.

For each subset of `ArchSpec.sequential` the block runs on the engine's student inputs (`ctx.inputs`, the
quantized chain by default) with hooks accumulating one Hessian per linear of the subset; earlier subsets of the
block are already quantized at that point. The passes live in `methods/gptq/passes.py`, the math in
`methods/gptq/solve.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from lowbit.engine import BlockContext, BlockStage
from lowbit.engine.precision import TuneAutocast, resolve_autocast
from lowbit.methods.gptq.passes import (
    ModuleCalls,
    collect_hessians,
    entry_module,
    fits_in_memory,
    reduce_hessians,
    residual_chain,
    residual_norm,
)
from lowbit.methods.gptq.solve import GPTQResult, HessianAccumulator, gptq_quantize
from lowbit.quantizer import quantize_weight
from lowbit.scheme import ACT_BITS_OFF, QuantScheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's options; defaults follow the reference code (docs/methods.md), true_sequential is lowbit's decision."""

    percdamp: float = field(default=0.01, metadata={"help": "damping, as a fraction of mean(diag H)"})
    block_size: int = field(default=128, metadata={"help": "columns per lazy-batch update"})
    act_order: bool = field(default=False, metadata={"help": "quantize columns in order of decreasing diag(H)"})
    static_groups: bool = field(
        default=False, metadata={"help": "group qparams from the original weight (act_order without g_idx)"}
    )
    true_sequential: bool = field(
        default=True, metadata={"help": "collect each subset's Hessians after quantizing the earlier subsets"}
    )
    mse: bool = field(default=False, metadata={"help": "shrink-grid search of the group range (|err|^2.4)"})
    exact_hessian: bool = field(
        default=False,
        metadata={"help": "X^T X in fp64 and summed in fp64, normalized once: H no longer depends on how samples are "
                  "batched or split over ranks, so N ranks solve one process's H (fp64 Gram products; off = the "
                  "reference's running fp32 average)"},
    )  # fmt: skip
    autocast: TuneAutocast = field(
        default="auto",
        metadata={"help": "block forwards that collect the Hessians (and the engine's chain) in bf16 autocast or off "
                  "(fp32); X^T X, the damping and the column solve stay fp32; auto = engine.dtype, else fp32"},
    )  # fmt: skip
    min_tokens: int = field(
        default=1,
        metadata={"help": "a linear whose Hessian saw fewer calibration tokens (an MoE expert the router rarely picks) "
                  "is rounded with RTN instead, with a warning"},
    )  # fmt: skip


def _rtn_fallback(
    ctx: BlockContext, name: str, linear: nn.Linear, tokens: int, min_tokens: int, scheme: QuantScheme
) -> dict:
    """Round a linear its Hessian cannot describe with RTN, as auto-round and llm-compressor do for unused experts."""
    log.warning(
        "GPTQ %s.%s: its Hessian saw %d calibration token(s) (min_tokens %d): rounded with RTN instead",
        ctx.name, name, tokens, min_tokens,
    )  # fmt: skip
    ctx.quantized[name] = record = quantize_weight(linear.weight.detach(), scheme)
    with torch.no_grad():
        linear.weight.copy_(record.dequantize().to(linear.weight.dtype))
    return {"fallback": "rtn", "tokens": tokens}


class GPTQ(BlockStage):
    """Hessian-aware column-wise rounding with error feedback (Frantar et al.; IST-DASLab/gptq)."""

    name: ClassVar[str] = "gptq"
    kind: ClassVar[str] = "quantizer"
    needs_data: ClassVar[bool] = True
    # W-A: Hessians come from the block's float activations on the (W-A) quantized chain, as QuaRot runs GPTQ
    # before enabling its activation quantizers.
    supports_act_quant: ClassVar[bool] = True
    supports_experts: ClassVar[bool] = True  # per-expert linears like any other (arch/moe.py)
    supports_scheme_mix: ClassVar[bool] = True
    summary: ClassVar[str] = "GPTQ: Hessian-based error compensation, true-sequential, act-order option"
    uses_float_chain: bool = False
    # each rank's Hessians reduced in rank order (passes.reduce_hessians), each solve on one rank and broadcast
    data_parallel: ClassVar[bool] = True
    Options: ClassVar[type] = GPTQOptions

    # what autocast=auto means where bf16 is native; "off" until measured (benchmarks/results/speed-log.md)
    autocast_default: ClassVar[str] = "off"

    def precision(self, device: torch.device) -> str:
        """The resolved autocast of the Hessian forwards on `device`."""
        return resolve_autocast(self.options.autocast, device, default=self.autocast_default)

    def replay_autocast(self, device: torch.device) -> str:
        return self.precision(device)

    def _records_for(
        self, ctx: BlockContext, subsets: tuple[tuple[str, ...], ...], index: int, chain: bool
    ) -> dict[str, ModuleCalls]:
        """What pass `index` records: the calls of the module the next pass starts at ("entry"); before the last
        pass, the residual entering the MLP's norm ("residual"); in the last pass, with a residual + MLP chain in
        view, the inputs of a single last linear ("last_input"). Each only where it fits in a quarter of the free
        memory (with the records kept beside it) and the chains are in RAM (each record is a chain-sized tensor in
        RAM, which engine.offload=disk is there to avoid): else the passes run the whole block, as without records."""
        on_disk = ctx.chains.on_disk

        def keep(nbytes: int) -> bool:
            return not on_disk and fits_in_memory(nbytes)

        subset = subsets[index]
        following = subsets[index + 1] if index + 1 < len(subsets) else ()
        token_bytes = math.prod(ctx.inputs.shape[:-1]) * ctx.inputs.element_size()  # a chain that is in RAM or not
        hidden_bytes = token_bytes * ctx.inputs.shape[-1]  # one record of a hidden-size activation
        path = entry_module(following, subset) if following and keep(hidden_bytes) else None
        records = {"entry": ModuleCalls(path)} if path is not None else {}
        norm = residual_norm(ctx.arch, path) if path is not None and index + 2 == len(subsets) else None
        if norm is not None and self.scheme.act_bits >= ACT_BITS_OFF and keep(2 * hidden_bytes):
            records["residual"] = ModuleCalls(norm)
        if chain and not following and len(subset) == 1:
            linear = ctx.linears()[subset[0]]
            if keep(token_bytes * linear.in_features):
                records["last_input"] = ModuleCalls(subset[0])
        return records

    def _solved(
        self, ctx: BlockContext, subset: tuple[str, ...], hessians: dict[str, HessianAccumulator]
    ) -> Iterator[tuple[str, GPTQResult | None]]:
        """Each linear of `subset` in order with its GPTQ solve (consuming its Hessian), or None where the Hessian
        saw fewer than `min_tokens` tokens (the caller rounds it with RTN); one process yields each as it is solved.

        In a data-parallel run the k-th solvable linear is solved by rank k % N alone and its result broadcast once
        every rank has solved its own: every rank holds the same reduced H, so this is what solving on every rank
        gives, in about 1/N of the time."""
        opts: GPTQOptions = self.options
        linears, group = ctx.linears(), ctx.group
        solvable = [name for name in subset if hessians[name].tokens >= opts.min_tokens]
        owners = {name: k % group.world_size for k, name in enumerate(solvable)}
        mine: dict[str, GPTQResult] = {}
        for name in subset:
            if name not in owners:
                if not group.distributed:
                    yield name, None
                continue
            hessian = hessians.pop(name)
            if owners[name] == group.rank:
                mine[name] = gptq_quantize(
                    linears[name].weight.detach(),
                    hessian.H,
                    self.scheme_for(ctx.name, name),
                    percdamp=opts.percdamp,
                    block_size=opts.block_size,
                    act_order=opts.act_order,
                    static_groups=opts.static_groups,
                    mse=opts.mse,
                    consume_h=True,  # popped above: nothing reads this Hessian again
                )
            del hessian
            if not group.distributed:
                yield name, mine.pop(name)
        for name in subset if group.distributed else ():
            yield name, group.broadcast_object(mine.pop(name, None), src=owners[name]) if name in owners else None

    def process_block(self, ctx: BlockContext) -> None:
        opts: GPTQOptions = self.options
        linears = ctx.linears()
        subsets = ctx.arch.sequential_for(ctx.block) if opts.true_sequential else (tuple(linears),)
        layer_metrics: dict[str, dict] = {}
        start = chain = None
        for index, subset in enumerate(subsets):
            records = self._records_for(ctx, subsets, index, chain is not None)
            hessians = collect_hessians(
                ctx, subset, self.precision(ctx.device), start=start, record=tuple(records.values()),
                exact=opts.exact_hessian,
            )  # fmt: skip
            hessians = reduce_hessians(hessians, ctx.group)  # every rank solves the same H: the same codes
            start = records["entry"] if "entry" in records and records["entry"].calls else None
            if "residual" in records and start is not None and records["residual"].calls:
                chain = (start, records["residual"])  # the last pass starts at the MLP: chain = residual + MLP?
            if chain is not None and "last_input" in records and records["last_input"].calls:
                chain = (records["last_input"], chain[1])  # ... = residual + its last linear, on its inputs
            for name, result in self._solved(ctx, subset, hessians):
                linear = linears[name]
                if result is None:  # an MoE expert no calibration token was routed to
                    tokens = hessians.pop(name).tokens
                    scheme = self.scheme_for(ctx.name, name)
                    layer_metrics[name] = _rtn_fallback(ctx, name, linear, tokens, opts.min_tokens, scheme)
                    continue
                for note in result.notes:
                    log.warning("GPTQ %s.%s: %s", ctx.name, name, note)
                ctx.quantized[name] = result.record
                with torch.no_grad():
                    linear.weight.copy_(result.weight.to(linear.weight.dtype))
                layer_metrics[name] = {"loss": round(result.loss, 6), "percdamp": result.percdamp}
                if result.retries:
                    layer_metrics[name]["retries"] = result.retries
                if result.fallback_rtn:
                    layer_metrics[name]["fallback"] = "rtn"
                if result.dead_columns:
                    layer_metrics[name]["dead_columns"] = result.dead_columns
        if chain is not None:
            ctx.outputs = residual_chain(ctx, *chain)
        ctx.metrics["gptq_chain"] = f"residual + {chain[0].path}" if ctx.outputs is not None else "block forward"
        ctx.metrics["gptq"] = layer_metrics
        ctx.metrics["gptq_autocast"] = self.precision(ctx.device)
