"""Run a recipe's stages in order: consecutive block-scope stages share one block loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.arch import ArchSpec
from lowbit.distributed.group import Group
from lowbit.engine.block_loop import EngineOptions, run_block_stages
from lowbit.engine.offload import ChainStore
from lowbit.engine.stage import BlockStage, ModelContext, ModelStage, Stage
from lowbit.engine.streaming import BlockObserver, BlockSink, BlockSource
from lowbit.engine.workdir import GroupCheckpoint, WorkDir
from lowbit.errors import LowbitError
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme


@dataclass
class PipelineResult:
    """Quantized records by full module name, metrics per stage group, and every stage's artifacts (also those
    of groups and blocks restored from checkpoints, which the live stages never computed)."""

    records: dict[str, QuantizedWeight] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)
    checkpoint_seconds: float = 0.0


def stage_groups(stages: list[Stage]) -> list[list[Stage]]:
    """Consecutive block-scope stages form one group (one block loop); each model-scope stage is its own."""
    groups: list[list[Stage]] = []
    for stage in stages:
        # dispatch on the instance's scope: a stage may pick its scope from its options (TEQ's loss)
        if stage.scope == "block" and isinstance(stage, BlockStage):
            if groups and groups[-1][0].scope == "block":
                groups[-1].append(stage)
            else:
                groups.append([stage])
        elif stage.scope == "model" and isinstance(stage, ModelStage):
            groups.append([stage])
        else:
            raise TypeError(f"stage {stage.name} is neither a BlockStage nor a ModelStage")
    return groups


def check_data_parallel(stages: list[Stage], world_size: int) -> None:
    """Refuse, before any work, a stage that would be silently wrong on a slice of the samples."""
    waiting = [stage.name for stage in stages if stage.needs_data and not stage.data_parallel]
    if waiting:
        from lowbit.methods import STAGES

        ready = ", ".join(name for name, cls in STAGES.items() if cls.data_parallel or not cls.needs_data)
        raise LowbitError(
            f"{', '.join(waiting)} does not run data-parallel yet ({world_size} ranks): run it in one process "
            f"(without --nproc or torchrun); data-parallel stages: {ready}"
        )


def _model_done(checkpoint: GroupCheckpoint | None, group: Group | None) -> bool:
    """Whether a model-scope stage finished in an earlier run: rank 0's checkpoints decide for every rank."""
    done = checkpoint is not None and checkpoint.model_done()
    return group.broadcast_object(done) if group is not None else done


def run_stages(
    model: nn.Module,
    arch: ArchSpec,
    stages: list[Stage],
    scheme: QuantScheme,
    calibration: torch.Tensor | None,
    options: EngineOptions,
    seed: int,
    work: WorkDir | None = None,
    source: BlockSource | None = None,
    sink: BlockSink | None = None,
    observer: BlockObserver | None = None,
    chains: ChainStore | None = None,
    tokenizer: Any = None,
    group: Group | None = None,
) -> PipelineResult:
    """Apply every stage to `model` in place. With `work`, finished groups and blocks are checkpointed and an
    interrupted run resumes after them. A streamed run (`source`, `sink`: engine/streaming.py) is one group of
    block-scope stages: a later group would need the blocks an earlier one released. `chains` makes the block loops'
    activation chains (default: per `options.offload`, see `run_block_stages`); `tokenizer` reaches model-scope
    stages that read evaluation text. `group`: the ranks of a data-parallel run (`calibration` is then this rank's
    slice); only stages with `data_parallel` run there."""
    groups = stage_groups(stages)
    if source is not None and (len(groups) > 1 or groups[0][0].scope != "block"):
        raise LowbitError(
            "a streamed run takes block-scope stages only (model-scope stages such as TEQ with the cross-entropy "
            "loss or InvarExplore need the whole model): use --opt engine.stream=off on a machine that holds it"
        )
    if group is not None and group.distributed:
        check_data_parallel(stages, group.world_size)
    for stage in stages:
        reason = stage.refuses(arch)
        if reason:
            raise LowbitError(f"stage '{stage.name}' does not support the {arch.family} family: {reason}")
    arch.prepare(model)  # MoE: fused experts become per-expert linears before any capture or checkpoint restore
    result = PipelineResult()
    records, metrics, artifacts = result.records, result.metrics, result.artifacts
    for index, members in enumerate(groups):
        checkpoint = work.group(index) if work else None
        name = "+".join(stage.name for stage in members)
        stage = members[0]
        if stage.scope == "block":
            found = run_block_stages(model, arch, members, scheme, calibration, options, seed, checkpoint,
                                     source=source, sink=sink, chains=chains, observer=observer,
                                     group=group)  # fmt: skip
            records.update(found.records)
            result.checkpoint_seconds += found.checkpoint_seconds
            artifacts.update(found.artifacts)
            metrics[name] = found.metrics
        elif _model_done(checkpoint, group):
            saved, metrics[name] = checkpoint.load_model(model)
            artifacts.update(saved)
        else:
            stage_dir = checkpoint.stage_dir() if checkpoint else None
            device = torch.device(options.device)
            ctx = ModelContext(model, arch, scheme, calibration, device, seed, work_dir=stage_dir, tokenizer=tokenizer,
                               group=group or Group())  # fmt: skip
            stage.process_model(ctx)
            metrics[name] = ctx.metrics
            if checkpoint and (group is None or group.is_main):  # rank 0 writes
                saving = time.perf_counter()
                checkpoint.save_model(model, stage.artifacts(), ctx.metrics)
                result.checkpoint_seconds += time.perf_counter() - saving
        for stage in members:
            artifacts.update(stage.artifacts())
    return result
