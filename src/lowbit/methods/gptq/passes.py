"""GPTQ's Hessian passes over one block (see docs/methods.md, GPTQ): hooks, early stops, passes that start at a recorded
submodule, and the quantized chain rebuilt from the last pass's records.

A subset whose linears share a parent module that also holds the previous subset (LLaMA's down_proj in `mlp`
after up/gate, o_proj in `self_attn` after q/k/v) starts its pass at that module, on the calls recorded in the
previous pass: quantizing the previous subset cannot change the module's input, so the Hessians are those of a
whole-block pass without re-running what lies in front of it. Where the block's output is the residual entering the
MLP's norm plus the MLP's output (pre-norm LLaMA-style blocks, checked bit for bit on the first batch), the
quantized chain is that sum, without a last forward through the attention; where the inputs of the MLP's last
linear (recorded in the last pass) fit in memory, the MLP's output is that linear on them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.arch.base import ArchSpec
from lowbit.distributed.group import Group
from lowbit.engine import BlockContext, call_block
from lowbit.engine.context import move_to
from lowbit.engine.offload import Chain
from lowbit.engine.precision import autocast
from lowbit.errors import LowbitError
from lowbit.methods.gptq.solve import HessianAccumulator, input_gram


class _SubsetSeen(Exception):
    """Raised by the last hook of a subset: the rest of the block cannot change these Hessians, so skip it."""


@dataclass
class ModuleCalls:
    """One block submodule's call (positional args, kwargs) in each batch of a Hessian pass, in batch order."""

    path: str
    calls: list[tuple[tuple, dict]] = field(default_factory=list)


def entry_module(subset: tuple[str, ...], previous: tuple[str, ...]) -> str | None:
    """The submodule a subset's pass may start at: the deepest common parent of its linears, provided it holds
    every linear of the previous subset too (so that quantizing them leaves its input unchanged); None if none."""
    parents = [name.split(".")[:-1] for name in subset]
    common: list[str] = []
    for parts in zip(*parents, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    path = ".".join(common)
    if not path or not previous or not all(name.startswith(path + ".") for name in previous):
        return None
    return path


def _record_calls(block: nn.Module, record: ModuleCalls):
    """A pre-hook on `record.path` that keeps a copy of each call's tensor arguments on CPU (activations stay on
    CPU, as the engine's); the caller checks there was exactly one call per batch."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        record.calls.append((tuple(_cpu_copy(a) for a in args), kwargs))

    # prepended: it runs before a Hessian pre-hook on the same module stops the batch
    return block.get_submodule(record.path).register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def fits_in_memory(nbytes: int) -> bool:
    """Whether a cache of `nbytes` takes at most a quarter of the memory available now (False where unknown)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return nbytes <= available // 4


def _cpu_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def collect_hessians(
    ctx: BlockContext,
    names: tuple[str, ...],
    precision: str = "off",
    *,
    start: ModuleCalls | None = None,
    record: tuple[ModuleCalls, ...] = (),
    exact: bool = False,
) -> dict[str, HessianAccumulator]:
    """Run the block (current weights) on `ctx.inputs` and accumulate the input Hessian of each named linear.

    With `precision` "bf16" the block runs under bf16 autocast; the Gram products of its (bf16) inputs are fp32.

    Each batch stops as soon as every named linear has been called, before the last one computes (the
    true-sequential subsets of the early linears then cost a fraction of a block forward); the Hessians are those
    of a full forward. Linears called on the same input tensor in a batch (q/k/v, gate/up) share one X^T X
    product (in fp64 with `exact`: HessianAccumulator). With `start`, each batch runs that submodule on its
    recorded call instead of the whole block. Each of `record` gets its submodule's calls, for a later pass (left
    empty unless it ran exactly once per batch).
    """
    if ctx.inputs is None:
        raise LowbitError("GPTQ needs calibration data; pass --dataset (or 'builtin' for the offline default)")
    linears = ctx.linears()
    accumulators = {
        name: HessianAccumulator(linears[name].in_features, device=ctx.device, exact=exact) for name in names
    }
    pending: set[str] = set()
    grams: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # id(input) -> (input, X^T X, n), per batch

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            cached = grams.get(id(x))
            if cached is None or cached[0] is not x:  # the identity check guards against a reused id
                cached = grams[id(x)] = (x, *input_gram(x.detach(), exact))
            accumulators[name].add_gram(cached[1], cached[2])
            accumulators[name].tokens += x.numel() // x.shape[-1]
            pending.discard(name)
            if not pending:
                raise _SubsetSeen

        return hook

    # pre-hooks: the last linear of the subset stops the batch before its own product
    handles = [linears[name].register_forward_pre_hook(hook_for(name)) for name in names]
    recorders = {id(calls): _record_calls(ctx.block, calls) for calls in record}
    entry = ctx.block.get_submodule(start.path) if start is not None else None
    kwargs = ctx.device_kwargs()
    try:
        for index, part in enumerate(ctx.batches()):
            pending.update(names)
            grams.clear()
            with contextlib.suppress(_SubsetSeen), autocast(precision, ctx.device):
                if entry is not None:
                    args, call_kwargs = start.calls[index]
                    entry(*move_to(args, ctx.device), **call_kwargs)
                else:
                    call_block(ctx.block, ctx.batch(ctx.inputs, part), kwargs)
            for calls in record:
                if id(calls) in recorders and len(calls.calls) != index + 1:  # not once per batch: unusable
                    recorders.pop(id(calls)).remove()
                    calls.calls.clear()
    finally:
        for handle in (*handles, *recorders.values()):
            handle.remove()
    return accumulators


def reduce_hessians(accumulators: dict[str, HessianAccumulator], group: Group) -> dict[str, HessianAccumulator]:
    """The Hessians of every rank's samples together (a data-parallel run; the single process's are returned as is).

    Exact accumulators hold fp64 Gram sums: those are added in rank order, and H is normalized by the global count
    once, as one process does. Running ones hold each rank's H_r = (2/n_r) * its Gram sum: the global
    H = sum_r (n_r / N) H_r is weighted in fp64 in rank order (deterministic), then back to fp32 as the solver takes
    it. Token counts are summed, so `min_tokens` sees every rank's tokens.
    """
    if not group.distributed:
        return accumulators
    counts = group.gather_objects({name: (acc.nsamples, acc.tokens) for name, acc in accumulators.items()})
    for name, accumulator in accumulators.items():
        total = sum(rank_counts[name][0] for rank_counts in counts)
        merged = torch.zeros_like(accumulator.sum, dtype=torch.float64)
        for rank_counts, part in zip(counts, group.gather(accumulator.sum), strict=True):
            if rank_counts[name][0]:
                merged.add_(part.double(), alpha=1.0 if accumulator.exact else rank_counts[name][0] / total)
        accumulator.sum = merged if accumulator.exact else merged.to(torch.float32)
        accumulator.nsamples = total
        accumulator.tokens = sum(rank_counts[name][1] for rank_counts in counts)
    return accumulators


def residual_norm(arch: ArchSpec, mlp: str) -> str | None:
    """The norm in front of module `mlp` (the scale group it inspects), whose input is the block's residual."""
    for group in arch.scale_groups:
        if group.inspect == mlp and group.prev_kind == "norm":
            return group.prev
    return None


@torch.no_grad()
def residual_chain(ctx: BlockContext, mlp: ModuleCalls, residual: ModuleCalls) -> Chain | None:
    """The block's outputs on `ctx.inputs` with its current weights, as residual + mlp(recorded input), when the
    first batch shows that is exactly (bit for bit) what the block computes; None otherwise. `mlp` is the MLP
    module or its last linear; both records come from passes after which only linears inside it changed. The
    outputs fill a chain of `ctx.chains` batch by batch."""
    module = ctx.block.get_submodule(mlp.path)
    outputs = None
    with autocast(ctx.autocast, ctx.device):
        for index, part in enumerate(ctx.batches()):
            args, kwargs = mlp.calls[index]
            out = module(*move_to(args, ctx.device), **kwargs)
            if not isinstance(out, torch.Tensor):  # e.g. an MoE block's (hidden, router logits)
                return None
            out = move_to(residual.calls[index][0][0], ctx.device) + out
            if index == 0 and not torch.equal(
                out, call_block(ctx.block, ctx.batch(ctx.inputs, part), ctx.device_kwargs())
            ):
                return None
            rows = ctx.checked(out.to("cpu", torch.float32))
            if outputs is None:
                outputs = ctx.chains.new((ctx.nsamples, *rows.shape[1:]))
            outputs[part] = rows
    return outputs
