"""The one block loop: capture, cache float targets, run block-scope stages, chain the inputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec
from lowbit.engine.capture import capture_block_inputs
from lowbit.engine.context import BlockContext
from lowbit.engine.stage import BlockStage
from lowbit.errors import LowbitError
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How the block loop runs; set as `--opt engine.NAME=VALUE`."""

    batch_size: int = field(default=8, metadata={"help": "samples per forward pass when replaying a block"})
    quantized_input: bool = field(
        default=True,
        metadata={"help": "feed block i+1 the quantized chain (true) or the float chain (false)"},
    )
    device: str = field(default="cpu", metadata={"help": "compute device for one block (activations stay on CPU)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar per block"})


def _write_quantized(ctx: BlockContext) -> dict[str, QuantizedWeight]:
    """Check the quantizer covered every linear, then put the dequantized weights into the block."""
    linears = ctx.linears()
    missing = sorted(set(linears) - set(ctx.quantized))
    if missing:
        raise RuntimeError(f"quantizer left {missing} of block {ctx.index} unquantized")
    records = {}
    for name, linear in linears.items():
        record = ctx.quantized[name]
        if linear.bias is not None:
            record.bias = linear.bias.detach().clone()
        with torch.no_grad():
            linear.weight.copy_(record.dequantize().to(linear.weight.dtype))
        records[f"{ctx.name}.{name}"] = record
    return records


def _chain_choice(stages: list[BlockStage], default: bool) -> bool:
    """The stages' preferred input chain (`preferred_quantized_input`), else the engine option."""
    wanted = {choice for stage in stages if (choice := stage.preferred_quantized_input()) is not None}
    if len(wanted) > 1:
        raise LowbitError(
            "the stages of this recipe disagree on quantized_input: set it to the same value for each of them"
        )
    return wanted.pop() if wanted else default


def run_block_stages(
    model: nn.Module,
    arch: ArchSpec,
    stages: list[BlockStage],
    scheme: QuantScheme,
    calibration: torch.Tensor | None,
    options: EngineOptions,
    seed: int,
) -> tuple[dict[str, QuantizedWeight], list[dict[str, Any]]]:
    """Run block-scope stages over every decoder block, in place on `model`.

    Returns the quantized records (full module name -> record; empty when no stage is a quantizer) and the
    per-block metrics for the run record. With `quantized_input`, block i+1 sees the quantized block i's output
    on its own (quantized-chain) input; otherwise it sees the float chain.
    """
    device = torch.device(options.device)
    quantized_input = _chain_choice(stages, options.quantized_input)
    has_quantizer = any(stage.kind == "quantizer" for stage in stages)
    needs_data = any(stage.needs_data for stage in stages)
    float_chain = needs_data and (
        not (quantized_input and has_quantizer) or any(stage.uses_float_chain for stage in stages)
    )
    fp_in = q_in = None
    kwargs: dict[str, Any] = {}
    if needs_data:
        if calibration is None:
            raise LowbitError(
                "this recipe needs calibration data; pass --dataset (or 'builtin' for the offline default)"
            )
        captured = capture_block_inputs(model, arch, calibration, batch_size=options.batch_size, device=device)
        fp_in = q_in = captured.hidden
        kwargs = captured.kwargs

    blocks = arch.blocks(model)
    records: dict[str, QuantizedWeight] = {}
    metrics: list[dict[str, Any]] = []
    bar = tqdm(range(len(blocks)), desc="blocks", unit="block", disable=not options.progress)
    for index in bar:
        start = time.perf_counter()
        ctx = BlockContext(
            index=index,
            name=arch.block_name(index),
            block=blocks[index],
            arch=arch,
            scheme=scheme,
            kwargs=kwargs,
            device=device,
            batch_size=options.batch_size,
            seed=seed,
            inputs=q_in,
            fp_inputs=fp_in if float_chain else None,
        )
        if float_chain:
            ctx.targets = ctx.run(fp_in)
        for stage in stages:
            stage.process_block(ctx)
        if has_quantizer:
            records.update(_write_quantized(ctx))
        if needs_data:
            fp_in = ctx.targets
            if quantized_input and has_quantizer:
                with ctx.act_quant():  # the student chain runs W-A; the float targets above never do
                    q_in = ctx.run(q_in)
            else:
                q_in = fp_in
        ctx.metrics["seconds"] = round(time.perf_counter() - start, 3)
        metrics.append({"block": index, **ctx.metrics})
        log.debug("block %d done in %.2fs", index, ctx.metrics["seconds"])
    return records, metrics
