"""The one block loop: capture, cache float targets, run block-scope stages, chain the inputs."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec
from lowbit.distributed.group import Group
from lowbit.engine.capture import capture_block_inputs
from lowbit.engine.causal_attention import block_attention, resolve_attention
from lowbit.engine.context import BlockContext
from lowbit.engine.moe import routing_metrics
from lowbit.engine.offload import ChainStore
from lowbit.engine.precision import replay_autocast as resolve_replay
from lowbit.engine.precision import resolve_compile
from lowbit.engine.stage import BlockStage
from lowbit.engine.streaming import BlockObserver, BlockSink, BlockSource, without_codes
from lowbit.engine.workdir import GroupCheckpoint
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
    attention: Literal["auto", "sdpa", "chunked"] = field(
        default="auto",
        metadata={
            "help": "attention kernel of every block forward where the model uses SDPA: sdpa (torch's), chunked "
            "(causal attention in query chunks, faster on CPU: engine/causal_attention.py), auto = chunked on CPU"
        },
    )
    compile: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "torch.compile the block forward/backward of the tuning stages (SignRound, OmniQuant, DESV): "
            "fuses their elementwise ops; the first block pays the compile; auto = off"
        },
    )
    stream: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "read each block from the checkpoint when the loop reaches it and write it to the export as it "
            "finishes, so memory does not grow with depth (needs --out; block-scope stages only); auto = on when "
            "the memory planner says the model does not fit in memory"
        },
    )
    offload: Literal["auto", "ram", "disk"] = field(
        default="auto",
        metadata={
            "help": "where the activation chains (float input, quantized input, float targets) live: ram, or disk "
            "(raw fp32 files in the work directory, read and written a batch at a time, so memory does not grow "
            "with nsamples x seqlen); auto = disk when the memory planner says the chains do not fit in memory"
        },
    )
    replay: Literal["auto", "fp32"] = field(
        default="auto",
        metadata={
            "help": "precision of the engine's block replays (float targets, quantized chain): auto = the tuning "
            "stages' autocast when they all ask for the same (SignRound: bf16 where native), fp32 = always fp32"
        },
    )


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


@dataclass
class GroupResult:
    """What a group of stages produced: quantized records by full module name, metrics, artifacts restored from
    checkpoints (the live stages' `artifacts()` hold only what they computed in this process)."""

    records: dict[str, QuantizedWeight] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)
    checkpoint_seconds: float = 0.0  # time spent writing checkpoints (the cost of being resumable)


def _all_artifacts(stages: list[BlockStage]) -> dict[str, torch.Tensor]:
    return {name: t for stage in stages for name, t in stage.artifacts().items()}


def _restore_block(checkpoint: GroupCheckpoint, ctx: BlockContext, result: GroupResult) -> None:
    """Put a block finished by an interrupted run back (parameters, records, artifacts, metrics)."""
    state = checkpoint.load_block(ctx.index, ctx.block)
    result.records.update({f"{ctx.name}.{key}": record for key, record in state.records.items()})
    result.artifacts.update(state.artifacts)
    result.metrics.append(state.metrics)


def _restore_streamed(sink: BlockSink, index: int, result: GroupResult) -> None:
    """A block a streamed run finished before it was interrupted: its records (codes on meta), artifacts, metrics."""
    state = sink.restore(index)
    result.records.update(state.records)
    result.artifacts.update(state.artifacts)
    result.metrics.append(state.metrics)


def run_block_stages(
    model: nn.Module,
    arch: ArchSpec,
    stages: list[BlockStage],
    scheme: QuantScheme,
    calibration: torch.Tensor | None,
    options: EngineOptions,
    seed: int,
    checkpoint: GroupCheckpoint | None = None,
    *,
    source: BlockSource | None = None,
    sink: BlockSink | None = None,
    observer: BlockObserver | None = None,
    chains: ChainStore | None = None,
    group: Group | None = None,
) -> GroupResult:
    """Run block-scope stages over every decoder block, in place on `model`.

    With a `source` (a streamed model) each block is read when the loop reaches it and released after; with a
    `sink` each finished block is handed over before that, and the result keeps only its records' metadata
    (codes on the meta device), so memory does not grow with depth. An `observer` (a streamed run's evaluation)
    sees each block as read and with its final weights, and its chains are checkpointed with the loop's.

    Returns the quantized records (full module name -> record; empty when no stage is a quantizer) and the
    per-block metrics for the run record. With `quantized_input`, block i+1 sees the quantized block i's output
    on its own (quantized-chain) input; otherwise it sees the float chain. With a `checkpoint`, every finished
    block is saved and an interrupted run continues after its last finished block. The chains are made by `chains`
    (default: in RAM, or in a temp directory removed at the end with `engine.offload=disk`). In a data-parallel run
    `calibration` is this rank's slice and `group` (passed to every stage) reduces across the ranks.
    """
    if chains is None:
        with ChainStore("disk" if options.offload == "disk" else "ram") as owned:
            return run_block_stages(model, arch, stages, scheme, calibration, options, seed, checkpoint,
                                    source=source, sink=sink, chains=owned, observer=observer,
                                    group=group)  # fmt: skip
    group = Group() if group is None else group
    device = torch.device(options.device)
    quantized_input = _chain_choice(stages, options.quantized_input)
    has_quantizer = any(stage.kind == "quantizer" for stage in stages)
    replay_autocast = resolve_replay(stages, options.replay, device)
    attention = resolve_attention(options.attention, device)
    compiled = resolve_compile(options.compile, device)
    needs_data = any(stage.needs_data for stage in stages)
    float_chain = needs_data and (
        not (quantized_input and has_quantizer) or any(stage.uses_float_chain for stage in stages)
    )
    blocks = arch.blocks(model)
    result = GroupResult()
    first = len(checkpoint.finished_blocks()) if checkpoint else sink.done if sink else 0
    first = group.broadcast_object(first)  # rank 0's checkpoints decide where every rank resumes
    fp_in = q_in = None
    per_block: list[dict[str, Any]] = [{} for _ in blocks]
    resumed_stream = sink is not None and first > 0 and (needs_data or observer is not None)
    saved = sink.chains(first - 1, chains) if resumed_stream else {}  # the chains the last finished block left
    if needs_data and first < len(blocks):
        if calibration is None:
            raise LowbitError(
                "this recipe needs calibration data; pass --dataset (or 'builtin' for the offline default)"
            )
        captured = capture_block_inputs(
            model, arch, calibration, batch_size=options.batch_size, device=device, source=source, chains=chains
        )
        fp_in = q_in = captured.hidden
        per_block = captured.per_block  # each block replays with its own layer's kwargs (sliding/global, rotary)
        del captured  # the chain is released as soon as the loop moves past it
        if saved:  # a resumed streamed run
            q_in = saved["q"]
            fp_in = saved.get("fp", q_in)
    if observer is not None:
        observer.begin()
        if resumed_stream:
            observer.restore(saved)
    del saved
    if first and checkpoint:
        log.info(
            "resuming: blocks 0-%d are reloaded from %s (their input chain is replayed)", first - 1, checkpoint.path
        )
    elif first:
        log.info("resuming a streamed run after block %d (its export and chains are kept)", first - 1)
    bar = tqdm(range(len(blocks)), desc="blocks", unit="block", disable=not options.progress or not group.is_main)
    for index in bar:
        start = time.perf_counter()
        if sink is not None and index < first:  # finished by the interrupted run: nothing to read or replay
            _restore_streamed(sink, index, result)
            continue
        if source is not None:
            source.materialize(index)
        ctx = BlockContext(
            index=index,
            name=arch.block_name(index),
            block=blocks[index],
            arch=arch,
            scheme=scheme,
            kwargs=per_block[index],
            device=device,
            batch_size=options.batch_size,
            seed=seed,
            inputs=q_in,
            fp_inputs=fp_in if float_chain else None,
            autocast=replay_autocast,
            compile=compiled,
            chains=chains,
            group=group,
        )
        if first == len(blocks):  # everything finished before: no forward needed
            _restore_block(checkpoint, ctx, result)
            continue
        if observer is not None:  # on the model's own attention kernel, as a resident evaluation runs
            observer.float_block(index, ctx.block)
        # every forward of this block (targets, stages, chain) on the chosen attention kernel
        with block_attention(ctx.block, arch.attention, attention) as chunked:
            if float_chain:
                with contextlib.ExitStack() as observers:
                    for stage in stages if index >= first else ():
                        observers.enter_context(stage.observe_targets(ctx))
                    ctx.targets = ctx.run(fp_in)
            block_records: dict[str, QuantizedWeight] = {}
            if index < first:
                _restore_block(checkpoint, ctx, result)  # instead of the stages: the chain below replays exactly
            else:
                known = set(_all_artifacts(stages)) if checkpoint or sink else set()
                if needs_data and (routing := routing_metrics(ctx)) is not None:
                    ctx.metrics["routing"] = routing  # tokens per expert of a sparse MoE block (engine/moe.py)
                if needs_data and replay_autocast != "off":
                    ctx.metrics["replay_autocast"] = replay_autocast
                if needs_data and chunked:
                    ctx.metrics["attention"] = "chunked"
                for stage in stages:
                    ctx.outputs = None  # only the last stage's outputs describe the final block
                    stage.process_block(ctx)
                block_records = _write_quantized(ctx) if has_quantizer else {}
                if sink is not None:
                    sink.add_block(index, ctx.name, ctx.block, block_records)
                    result.records.update({name: without_codes(r) for name, r in block_records.items()})
                else:
                    result.records.update(block_records)
            if needs_data:
                fp_in = ctx.targets
                if quantized_input and has_quantizer and ctx.outputs is not None:
                    q_in = ctx.outputs  # computed by the last stage with the final weights
                elif quantized_input and has_quantizer:
                    with ctx.act_quant():  # the student chain runs W-A; the float targets above never do
                        q_in = ctx.run(q_in)
                else:
                    q_in = fp_in
        if index < first:
            continue
        if observer is not None:
            with ctx.act_quant():
                observer.final_block(index, ctx.block)
        ctx.metrics["seconds"] = round(time.perf_counter() - start, 3)
        result.metrics.append({"block": index, **ctx.metrics})
        if sink is not None:
            fresh = {k: t for k, t in _all_artifacts(stages).items() if k not in known}
            next_inputs = {"q": q_in} if q_in is not None else {}
            if float_chain and fp_in is not None and fp_in is not q_in:
                next_inputs["fp"] = fp_in
            if observer is not None:
                next_inputs.update(observer.chains())
            sink.block_done(index, next_inputs, fresh, result.metrics[-1])
            del next_inputs
        if checkpoint and group.is_main:
            fresh = {k: t for k, t in _all_artifacts(stages).items() if k not in known}
            relative = {key.removeprefix(f"{ctx.name}."): record for key, record in block_records.items()}
            saving = time.perf_counter()
            checkpoint.save_block(index, ctx.block, relative, fresh, result.metrics[-1])
            result.checkpoint_seconds += time.perf_counter() - saving
        log.debug("block %d done in %.2fs", index, ctx.metrics["seconds"])
        if source is not None:
            del ctx, block_records
            source.release(index)
    return result
