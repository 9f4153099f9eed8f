"""The one run, from settings to a written export: what `lowbit quantize` and `lowbit.quantize_to` both call.

Order (the bad-input battery pins it): settings, format and target, the output location, the checkpoint directory,
the model, the preflight (export shapes, options against the model, free disk space) before any calibration or
forward, evaluation before, the run, evaluation after, and the export under the output lock. A user error anywhere
is a `LowbitError` raised before the long work where it can be checked there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.arch import arch_for
from lowbit.config import QuantizeConfig, build_config
from lowbit.distributed.group import Group
from lowbit.engine.pipeline import check_data_parallel
from lowbit.engine.workdir import WorkDir, clear_work_dir, estimate_checkpoint_bytes, work_dir_for
from lowbit.errors import LowbitError
from lowbit.export import AUTO_FORMAT, FORMATS, TARGETS, check_output_dir
from lowbit.export.atomic import output_lock
from lowbit.export.gguf import GGUF_FORMAT, check_gguf_scheme
from lowbit.export.preflight import preflight_export
from lowbit.export.shards import DEFAULT_MAX_SHARD_SIZE, parse_max_shard_size
from lowbit.export.space import check_free_space, estimate_export_bytes
from lowbit.export.validate import check_act_format
from lowbit.mixed.checks import preflight_mixed
from lowbit.models import LoadedModel, load_model, resolve_model_path
from lowbit.planner.plan import MemoryPlan, plan_run
from lowbit.planner.shape import ModelShape
from lowbit.quantization import check_run, run_quantization, settings_fingerprint
from lowbit.result import QuantizedModel
from lowbit.run_eval import EvalSettings, count_eval_windows, evaluate_perplexity, streamed_evaluation
from lowbit.safeload import check_model_dir
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSettings:
    """Where and how the export is written (`out=None`: quantize and evaluate only)."""

    out: str | Path | None = None
    format: str = AUTO_FORMAT
    target: str = "any"
    tp: int = 1
    ct_packing: str | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    checkpoint: bool = True  # keep every finished block next to `out`, so an interrupted run can resume
    resume: bool = False
    report: bool = False  # also write report.html (or report.md) into `out`


def quantize_to(
    out: str | Path | None,
    *,
    model: str | LoadedModel | None = None,
    recipe: str | None = None,
    scheme: str | QuantScheme | Mapping[str, Any] | None = None,
    dataset: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    recipe_file: str | Path | None = None,
    scheme_plan: str | Path | None = None,
    export: ExportSettings | None = None,
    evaluate: EvalSettings | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    group: Group | None = None,
) -> QuantizedModel:
    """Quantize `model` and write the export to `out`, failing in seconds on what would fail later.

    The settings are those of `lowbit.quantize`; `export` says how the export is written (its `out` is replaced by
    `out`) and `evaluate` adds perplexity before and after to the run record (`record["evaluation"]`). The
    returned result has been saved (`result.record["format"]` is the format written) unless `out` is None.
    `group`: this process's rank of a data-parallel run (lowbit/distributed; default: the single process); every
    rank calls this with the same arguments and rank 0 alone writes (the other ranks return the same result unsaved).
    """
    config = build_config(
        recipe=recipe,
        scheme=scheme,
        dataset=dataset,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        options=options,
        recipe_file=recipe_file,
        scheme_plan=scheme_plan,
    )
    settings = ExportSettings() if export is None else export
    settings = ExportSettings(**{**settings.__dict__, "out": out})
    group = Group() if group is None else group
    with output_lock(out) if out is not None and group.is_main else contextlib.nullcontext():
        return run(config, settings, model, evaluate, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                   group=group)  # fmt: skip


def run(
    config: QuantizeConfig,
    export: ExportSettings,
    model: str | LoadedModel | None,
    evaluate: EvalSettings | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    group: Group | None = None,
) -> QuantizedModel:
    """The run itself, under the caller's output lock (see the module docstring for the order)."""
    group = Group() if group is None else group
    config = check_ranks(config, export, group)
    check_export_settings(config, export)
    plan = plan_memory(config, export, model, evaluate, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if plan is not None and plan.stream:
        check_streamable(config, export, evaluate, group)
        return run_streamed(config, export, model, plan, evaluate, group)
    work_dir = prepare_work_dir(config, export) if group.is_main else resumed_work_dir(export)  # rank 0 writes
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    )
    preflight(config, export, loaded.model, checkpoints=work_dir is not None,  # before any calibration or forward
              tokenizer=loaded.tokenizer)  # fmt: skip
    group.barrier()  # every rank checked its settings before rank 0 writes anything another rank would check
    before = evaluate_perplexity(loaded.model, loaded.tokenizer, evaluate, group) if evaluate else {}
    result = run_quantization(loaded, config, work_dir=work_dir, resume=export.resume, plan=plan,
                              offload_dir=offload_dir(export), group=group, fmt=export.format,
                              ct_packing=export.ct_packing)  # fmt: skip
    if evaluate:
        after = evaluate_perplexity(result.model, result.tokenizer, evaluate, group)
        result.record["evaluation"] = {"before": before, "after": after}
    group.barrier()  # no rank still reads a checkpoint when rank 0 writes the export and removes them
    if export.out is not None and group.is_main:
        result.save(export.out, format=export.format, overwrite=export.overwrite, target=export.target, tp=export.tp,
                    ct_packing=export.ct_packing, max_shard_size=export.max_shard_size)  # fmt: skip
        if export.report:
            from lowbit.eval.report import report_from_dir

            result.report_path = report_from_dir(export.out)
    return result


def plan_memory(
    config: QuantizeConfig,
    export: ExportSettings,
    model: str | LoadedModel | None,
    evaluate: EvalSettings | None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> MemoryPlan | None:
    """The memory plan from config.json, before any weight is read: resident or streamed (`engine.stream`; auto
    streams when the resident run would not fit), the chains in RAM or on disk (`engine.offload`), and a refusal
    naming the fix when neither fits. None for a model passed in already loaded (resident by definition)."""
    if isinstance(model, LoadedModel):
        return None
    option = config.engine.stream
    if option == "auto" and export.out is None:
        option = "off"  # a streamed run writes its export as it goes: without --out, plan resident
    path = resolve_model_path(model)
    check_model_dir(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)  # as load_model, first
    try:
        shape = ModelShape.from_config(path)
    except (LowbitError, ValueError, TypeError, KeyError) as error:
        if option == "on":
            raise
        log.info("no memory plan (%s): the model loads resident", error)
        return None
    eval_plan = {} if evaluate is None else {"eval_seqlen": evaluate.seqlen, "eval_windows": count_eval_windows(
        path, evaluate, trust_remote_code=trust_remote_code)}  # fmt: skip
    plan = plan_run(shape, config, stream_option=option, evaluate=evaluate is not None, export_format=export.format,
                    **eval_plan)  # fmt: skip
    log.info("memory plan: %s%s, estimated peak %.0f MiB (%s)", "stream" if plan.stream else "resident",
             ", chains on disk" if plan.settings["chains_on_disk"] else "", plan.estimate / 2**20,
             plan.decision)  # fmt: skip
    return plan.check()


def check_ranks(config: QuantizeConfig, export: ExportSettings, group: Group) -> QuantizeConfig:
    """What a data-parallel run cannot do, refused before anything loads; the config each rank runs (progress bars
    on rank 0 only)."""
    if not group.distributed:
        return config
    if export.out is None:
        raise LowbitError(
            f"a data-parallel run ({group.world_size} ranks) keeps each rank's log in the work directory next to the "
            "export: pass --out"
        )
    stages = [spec.stage_class(spec.options, config.scheme) for spec in config.stages]
    check_data_parallel(stages, group.world_size)
    if not group.is_main:
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, progress=False))
    return config


def check_streamable(
    config: QuantizeConfig, export: ExportSettings, evaluate: EvalSettings | None, group: Group | None = None
) -> None:
    """What a streamed run cannot do, refused before anything loads."""
    if group is not None and group.distributed and export.resume:
        raise LowbitError(
            "a data-parallel streamed run keeps no checkpoints (each rank's activation chains would be needed): run "
            "it again with --overwrite instead of --resume, or in one process"
        )
    if group is not None and group.distributed and evaluate is not None:
        raise LowbitError(
            "--eval in a data-parallel streamed run is not supported yet: evaluate the export afterwards "
            "(lowbit eval DIR), or run in one process"
        )
    if export.out is None:
        raise LowbitError("a streamed run writes its export as the blocks finish: pass --out")
    if export.format == GGUF_FORMAT and export.resume:
        raise LowbitError(
            "a streamed GGUF export is one file written as the blocks finish and cannot resume: run again with "
            "--overwrite instead of --resume"
        )
    stages = [spec.stage_class(spec.options, config.scheme) for spec in config.stages]
    whole = [stage.name for stage in stages if stage.scope == "model"]
    if whole:
        raise LowbitError(
            f"{', '.join(whole)} needs the whole model's loss, which a streamed run never holds: use a block-scope "
            "recipe (--opt teq.loss=mse for TEQ), or --opt engine.stream=off on a machine that holds the model"
        )


def run_streamed(
    config: QuantizeConfig,
    export: ExportSettings,
    model: str | None,
    plan: MemoryPlan | None = None,
    evaluate: EvalSettings | None = None,
    group: Group | None = None,
) -> QuantizedModel:
    """Read each block from the checkpoint as the loop reaches it and write it to the export as it finishes;
    `evaluate` runs the evaluation windows through each block as read and as finished (eval/streamed.py).

    Data-parallel (`group`): every rank streams every block from the checkpoint (the model is not split) and
    runs the stages on its slice of the calibration; rank 0 alone writes the export, the others hand their blocks
    to a sink that keeps nothing. No checkpoints (a resume would need every rank's chains), as for a GGUF file."""
    group = Group() if group is None else group
    if not group.is_main:
        return _streamed_rank(config, export, model, plan, group)
    from lowbit.engine.stream_checkpoint import StreamCheckpoint
    from lowbit.engine.streaming import CheckpointBlocks
    from lowbit.export.atomic import atomic_output_dir, resumable_output_dir
    from lowbit.export.streamed import StreamedExport
    from lowbit.models import load_streamed

    assert export.out is not None
    gguf_file = export.format == GGUF_FORMAT  # one file written as the blocks finish: no checkpoints to resume from
    no_checkpoints = gguf_file or group.distributed
    work_dir = None if no_checkpoints else prepare_work_dir(config, export)  # the partial export is the checkpoint
    loaded, streamed = load_streamed(model)
    preflight(config, export, loaded.model, checkpoints=False, tokenizer=loaded.tokenizer)
    group.barrier()  # every rank checked its settings before rank 0 makes the output directory
    fmt = stream_format(config, export, loaded.model)
    ct_packing = export.ct_packing or ("dense" if export.format == AUTO_FORMAT else None)
    needed = estimate_export_bytes(loaded.model, config.scheme, fmt)
    checkpoint = StreamCheckpoint(work_dir) if work_dir is not None else None
    output = (
        atomic_output_dir(export.out, export.overwrite, needed_bytes=needed)
        if checkpoint is None
        else resumable_output_dir(export.out, export.overwrite, checkpoint.export_dir, needed_bytes=needed)
    )
    with output as directory:
        max_shard_bytes = parse_max_shard_size(export.max_shard_size)
        if gguf_file:
            from lowbit.export.gguf.streamed import GgufStreamedExport

            header = {"model": loaded.name, "config": config.to_dict()}  # what the file's metadata names
            sink = GgufStreamedExport(directory, loaded.model, loaded.tokenizer, config.scheme, header)
        else:
            sink = StreamedExport(directory, fmt, loaded.model, max_shard_bytes=max_shard_bytes,
                                  ct_packing=ct_packing, act_bits=config.scheme.act_bits,
                                  checkpoint=checkpoint)  # fmt: skip
        source = CheckpointBlocks(streamed)
        evaluation = streamed_evaluation(loaded, config, evaluate, source) if evaluate else None
        result = run_quantization(loaded, config, work_dir=work_dir, resume=export.resume, plan=plan,
                                  source=source, sink=sink, observer=evaluation,
                                  offload_dir=offload_dir(export), group=group, fmt=export.format,
                                  ct_packing=export.ct_packing)  # fmt: skip
        if evaluation is not None:
            result.record["evaluation"] = evaluation.results()
        result.streamed = True
        result.record["stream"] = {"source_dtype": str(streamed.source_dtype).removeprefix("torch.")}
        result.finish_streamed(sink, export.out, target=export.target, tp=export.tp, ct_packing=ct_packing)
    if result.work is not None:
        result.work.remove()
        result.work = None
    log.info("wrote %s export to %s (streamed)", fmt, export.out)
    if export.report:
        from lowbit.eval.report import report_from_dir

        result.report_path = report_from_dir(export.out)
    return result


def _streamed_rank(
    config: QuantizeConfig, export: ExportSettings, model: str | None, plan: MemoryPlan | None, group: Group
) -> QuantizedModel:
    """A rank other than 0 of a data-parallel streamed run: the same blocks read and the same stages run on its
    slice of the calibration (its reductions meet rank 0's), each finished block handed to a sink that keeps
    nothing; it writes no file."""
    from lowbit.engine.streaming import CheckpointBlocks, DiscardingSink
    from lowbit.models import load_streamed

    loaded, streamed = load_streamed(model)
    preflight(config, export, loaded.model, checkpoints=False, tokenizer=loaded.tokenizer)
    group.barrier()
    result = run_quantization(loaded, config, plan=plan, source=CheckpointBlocks(streamed), sink=DiscardingSink(),
                              offload_dir=offload_dir(export), group=group)  # fmt: skip
    result.streamed = True
    return result


def stream_format(config: QuantizeConfig, export: ExportSettings, model: torch.nn.Module) -> str:
    """The format a streamed run writes, fixed before its first block: `auto` takes the first of AUTO_ORDER the
    preflight accepts (the checks that read codes run per block and at the end)."""
    if export.format != AUTO_FORMAT:
        return export.format
    from lowbit.export import AUTO_ORDER

    arch = arch_for(model)
    for fmt in AUTO_ORDER:
        try:
            preflight_export(model, arch, config.scheme, fmt, export.target, export.tp, export.ct_packing or "dense",
                             config.act_order_groups)  # fmt: skip
        except LowbitError as error:
            log.info("format auto: not %s (%s)", fmt, error)
            continue
        return fmt
    return "fake"


def check_export_settings(config: QuantizeConfig, export: ExportSettings) -> None:
    """What needs no model: format, target, shard size, the scheme against the format, the output location."""
    if export.report and export.out is None:
        raise LowbitError("--report writes report.html into the export: pass --out")
    if export.format not in (AUTO_FORMAT, *FORMATS):
        raise LowbitError(f"unknown --format '{export.format}'; available: {AUTO_FORMAT}, {', '.join(FORMATS)}")
    if export.target not in TARGETS:
        raise LowbitError(f"unknown --target '{export.target}'; available: {', '.join(TARGETS)}")
    parse_max_shard_size(export.max_shard_size)
    check_act_format(export.format, config.scheme)  # W-A schemes a packed format cannot hold: before any work
    check_gguf_scheme(export.format, config.scheme)  # --format gguf needs a gguf:<type> scheme
    if export.out is not None:
        check_output_dir(export.out, export.overwrite)


def prepare_work_dir(config: QuantizeConfig, export: ExportSettings) -> Path | None:
    """The checkpoint directory next to `out` (None without `out` or checkpoints), checked before the model loads."""
    if export.resume and (export.out is None or not export.checkpoint):
        raise LowbitError("--resume continues the checkpoints kept next to --out: pass the same --out as the first run")
    if export.out is None or not export.checkpoint:
        return None
    work = work_dir_for(export.out)
    if work.exists() and export.overwrite and not export.resume:
        log.warning("--overwrite: discarding the checkpoints of an earlier run in %s", work)
        clear_work_dir(work)
    WorkDir.check(work, settings_fingerprint(config), resume=export.resume)
    return work


def resumed_work_dir(export: ExportSettings) -> Path | None:
    """Where a rank other than 0 reads the checkpoints of a resumed data-parallel run (rank 0 checks and writes
    them); None for a fresh run, whose blocks every rank computes."""
    if export.resume and export.out is not None and export.checkpoint:
        return work_dir_for(export.out)
    return None


def offload_dir(export: ExportSettings) -> Path | None:
    """Where chains offloaded to disk go without a work directory: next to --out (the disk the user chose for the
    run's files), else the system's temp directory (None)."""
    if export.out is None:
        return None
    parent = Path(export.out).expanduser().parent
    return parent if parent.is_dir() else None


def preflight(
    config: QuantizeConfig, export: ExportSettings, model: torch.nn.Module, *, checkpoints: bool, tokenizer: Any = None
) -> None:
    """Refuse in seconds what would fail only at export: the format against the scheme and the model's shapes
    (e.g. compressed-tensors g128 on in_features 576), an unsupported family, options against the model, too little
    free space for the export (and its checkpoints)."""
    arch = arch_for(model)
    check_run(config, model)
    if config.scheme.mixed is not None:  # every option storable, the budget above the cheapest plan
        preflight_mixed(model, arch, config.scheme, export.format, export.target, export.tp, export.ct_packing,
                        config.act_order_groups)  # fmt: skip
    elif export.format != AUTO_FORMAT:  # auto falls back to a format that works; an explicit one must work
        preflight_export(model, arch, config.scheme, export.format, export.target, export.tp, export.ct_packing,
                         config.act_order_groups, tokenizer)  # fmt: skip
    if export.out is not None:
        needed = estimate_export_bytes(model, config.scheme, "fake" if export.format == AUTO_FORMAT else export.format)
        if checkpoints:
            needed += estimate_checkpoint_bytes(model)
        check_free_space(export.out, needed)
