"""The quantization itself, on a loaded model: calibration data, the stages, and the run record.

`lowbit.run` wraps it with what a run to a directory needs (checks, loading, evaluation, the export); the
fingerprints here decide whether checkpoints can be reused.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.actquant import activation_record, install_activation_quant, installed_act_bits
from lowbit.arch import ArchSpec, arch_for, window_bos_id
from lowbit.config import QuantizeConfig
from lowbit.data import load_calibration
from lowbit.distributed.group import Group, shard_bounds
from lowbit.engine.memory import MemoryPhases, peak_rss_phases
from lowbit.engine.offload import ChainStore, Offload, remove_stale_chains
from lowbit.engine.pipeline import run_stages
from lowbit.engine.precision import resolve_compile
from lowbit.engine.streaming import BlockObserver, BlockSink, BlockSource
from lowbit.engine.workdir import WorkDir, model_digest, tensor_digest
from lowbit.errors import LowbitError
from lowbit.formats.files import ARTIFACTS_FILE
from lowbit.mixed.plan import PLAN_FILE, SchemePlan
from lowbit.mixed.planning import check_plan_covers, measure_and_plan
from lowbit.models import LoadedModel
from lowbit.planner.plan import MemoryPlan
from lowbit.record import determinism_record, package_versions, peak_rss_mb
from lowbit.result import QuantizedModel

log = logging.getLogger(__name__)


def check_run(config: QuantizeConfig, model: torch.nn.Module) -> None:
    """Stage options against the calibration size and the model's depth, and the compiler `engine.compile=on`
    needs: before any data is loaded or forward run."""
    resolve_compile(config.engine.compile, torch.device(config.engine.device))
    depth = len(arch_for(model).blocks(model))
    for spec in config.stages:
        spec.stage_class.check_run(spec.options, nsamples=config.nsamples, seqlen=config.seqlen, depth=depth)


def settings_fingerprint(config: QuantizeConfig) -> dict[str, Any]:
    """The settings part of a run's fingerprint (checkable before the model is loaded)."""
    settings = config.to_dict()
    settings["options"]["engine"].pop("progress", None)  # display only
    settings["options"]["engine"].pop("stream", None)  # a streamed run writes the same bytes as a resident one
    settings["options"]["engine"].pop("offload", None)  # chains on disk hold the same bits as in RAM
    return settings


def resolve_offload(option: str, plan: MemoryPlan | None) -> Offload:
    """Where this run keeps its activation chains: the option, or with `auto` what the memory plan chose (RAM
    without a plan: a model passed in already loaded)."""
    if option in ("ram", "disk"):
        return option
    return "disk" if plan is not None and plan.settings.get("chains_on_disk") else "ram"


def run_fingerprint(loaded: LoadedModel, config: QuantizeConfig, calibration: torch.Tensor | None) -> dict[str, Any]:
    """What must match for checkpoints to be reused: model files, settings, calibration tokens, versions."""
    versions = package_versions()
    return {
        "model": {"name": loaded.name, "files": model_digest(loaded.path) if loaded.path.is_dir() else None},
        "config": settings_fingerprint(config),
        "calibration_sha256": tensor_digest(calibration),
        "versions": {key: versions[key] for key in ("lowbit", "torch", "transformers")},
    }


def _scheme_plan(
    loaded: LoadedModel,
    arch: ArchSpec,
    config: QuantizeConfig,
    calibration: torch.Tensor | None,
    fmt: str,
    ct_packing: str | None,
    source: BlockSource | None,
    plan: MemoryPlan | None,
    offload_dir: str | Path | None,
) -> SchemePlan:
    """The plan file's choices, or the planning pass's (chains per engine.offload, in `offload_dir`)."""
    if config.scheme_plan is not None:
        check_plan_covers(config.scheme_plan, loaded.model, arch)
        return config.scheme_plan
    with ChainStore(resolve_offload(config.engine.offload, plan), offload_dir) as chains:
        return measure_and_plan(loaded.model, arch, config.scheme, calibration, config.engine, config.seed, fmt,
                                ct_packing=ct_packing, source=source, chains=chains)  # fmt: skip


def run_quantization(
    loaded: LoadedModel,
    config: QuantizeConfig,
    *,
    work_dir: str | Path | None = None,
    resume: bool = False,
    source: BlockSource | None = None,
    sink: BlockSink | None = None,
    plan: MemoryPlan | None = None,
    observer: BlockObserver | None = None,
    offload_dir: str | Path | None = None,
    group: Group | None = None,
    fmt: str = "compressed-tensors",
    ct_packing: str | None = None,
) -> QuantizedModel:
    """Run a validated config on a loaded model (in place) and assemble the result with its run record; a
    streamed run passes the block `source` and the export `sink` (engine/streaming.py). Chains offloaded to disk
    (`engine.offload`) go to a private directory in the work directory, else in `offload_dir`, else in the system's
    temp directory, removed when the stages end (also on error). With a `group` of several ranks every rank loads
    the same calibration windows (the fingerprint is theirs) and keeps its contiguous slice of them. `fmt` and
    `ct_packing`: the export an `auto:` scheme's budget counts stored bytes in (lowbit/mixed)."""
    group = Group() if group is None else group
    started = time.perf_counter()
    phases = MemoryPhases()
    phases.mark("loaded")  # the high-water mark as each phase ends: the phase where it rises holds the peak
    arch = arch_for(loaded.model)
    check_run(config, loaded.model)
    if installed_act_bits(loaded.model, arch) != 16:
        raise LowbitError(
            "this model runs with activation quantization installed (a reloaded W-A export): quantize the float model"
        )
    calibration = None
    data_meta: dict[str, Any] = {}
    if config.needs_data:
        data = load_calibration(
            loaded.tokenizer,
            config.dataset,
            nsamples=config.nsamples,
            seqlen=config.seqlen,
            seed=config.seed,
            bos_id=window_bos_id(loaded.model),  # Gemma: every window starts with BOS (recorded in the meta)
        )
        calibration, data_meta = data.input_ids, data.meta
    data_seconds = time.perf_counter() - started

    stages = [spec.stage_class(spec.options, config.scheme) for spec in config.stages]
    if config.scheme.gguf_mix is not None:  # each linear's GGUF type, before any tuning (export/gguf/mixes.py)
        from lowbit.export.gguf.mixes import mix_schemes

        linear_schemes = mix_schemes(loaded.model, arch, config.scheme)
        for spec, stage in zip(config.stages, stages, strict=True):  # each type the mix gives a linear, checked
            for each in sorted(set(linear_schemes.values()), key=lambda s: s.name):
                spec.stage_class.validate(spec.options, each)
            stage.linear_schemes = linear_schemes
    outside = {}
    if config.scheme.gguf is not None:  # token embedding / output on llama.cpp's grids, before calibration sees them
        from lowbit.export.gguf.embeddings import round_outside

        outside = round_outside(loaded.model, config.scheme)
        if sink is not None:
            sink.add_outside(outside)
    scheme_plan = None
    if config.scheme.mixed is not None:  # each linear's option, before any rounding (lowbit/mixed)
        scheme_plan = _scheme_plan(loaded, arch, config, calibration, fmt, ct_packing, source, plan, offload_dir)
        for stage in stages:
            stage.linear_schemes = scheme_plan.schemes()
    work = None
    if work_dir is not None and group.is_main:
        work = WorkDir.open(work_dir, run_fingerprint(loaded, config, calibration), resume=resume)
    elif work_dir is not None:  # another rank of a resumed run: reads the blocks rank 0 says are finished
        work = WorkDir(Path(work_dir))
    offload = resolve_offload(config.engine.offload, plan) if config.needs_data else "ram"
    if work is not None and group.is_main:
        remove_stale_chains(work.path)
    if calibration is not None and group.distributed:
        if calibration.shape[0] < group.world_size:
            raise LowbitError(
                f"{calibration.shape[0]} calibration windows cannot be split over {group.world_size} ranks: pass "
                f"--nsamples {group.world_size} or more, or fewer ranks"
            )
        calibration = calibration[group.shard(calibration.shape[0])]
    tuned = time.perf_counter()
    try:
        groups = work if source is None else None  # a streamed run checkpoints through its sink
        chain_dir = work.path if work is not None and group.is_main else offload_dir  # rank 0 clears stale ones
        with ChainStore(offload, chain_dir) as chains:
            found = run_stages(loaded.model, arch, stages, config.scheme, calibration, config.engine, config.seed,
                               groups, source=source, sink=sink, chains=chains, observer=observer,
                               tokenizer=loaded.tokenizer, group=group)  # fmt: skip
    except BaseException:
        if work is not None and group.is_main and not work.holds_progress():
            work.remove()  # nothing to resume: leave no trace
        raise
    records, metrics = found.records, found.metrics
    quantize_seconds = time.perf_counter() - tuned
    phases.mark("stages")  # capture and the block loop (a streamed run's export writes happen in here)
    log.info("quantized %d linears with %s in %.1fs", len(records), config.recipe, quantize_seconds)
    # A W-A result *is* a W-A model: its activation quantizers stay installed for every later forward (perplexity,
    # generate, lm-eval), so it is never evaluated weight-only by accident.
    act_handle = None
    if config.scheme.quantizes_activations:
        act_handle = install_activation_quant(loaded.model, arch, config.scheme.act_bits)
        log.info("activation quantization installed: %d-bit per-token asymmetric", config.scheme.act_bits)
    record = {
        "model": loaded.name,
        "model_path": str(loaded.path),
        "architecture": arch.family,
        "config": config.to_dict(),
        "calibration": data_meta,
        "versions": package_versions(),
        "timings": {
            "data_seconds": round(data_seconds, 3),
            "quantize_seconds": round(quantize_seconds, 3),
            "checkpoint_seconds": round(found.checkpoint_seconds, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        },
        "stages": metrics,
        "quantized_linears": len(records),
        "activation": activation_record(config.scheme.act_bits),
        "determinism": determinism_record(),
    }
    if group.distributed:
        sizes = [stop - start for start, stop in (shard_bounds(config.nsamples, rank, group.world_size)
                                                  for rank in range(group.world_size))]  # fmt: skip
        record["distributed"] = {"world_size": group.world_size, "backend": group.backend,
                                 "samples_per_rank": sizes if config.needs_data else None}  # fmt: skip
    if config.needs_data:
        record["chains"] = {"offload": offload, "option": config.engine.offload}
        if group.distributed:  # every rank's share of the chains (a collective: every rank builds its record)
            record["chains"]["peak_bytes_per_rank"] = group.gather_objects(chains.peak_bytes)
    if plan is not None:  # the planner's estimate next to what this process measured (quantization done)
        record["memory"] = {"plan": plan.to_dict(), "measured_mib": {**peak_rss_phases(), "phases": phases.to_dict()}}
    if work is not None:
        record["checkpoints"] = {"work_dir": str(work.path), "resumed": resume}
    if scheme_plan is not None:
        record["mixed_precision"] = scheme_plan.record_entry(from_file=config.scheme_plan is not None)
        if work is not None and group.is_main:
            scheme_plan.write(work.path / PLAN_FILE)
    artifacts = found.artifacts
    if artifacts:
        record["artifacts"] = {"file": ARTIFACTS_FILE, "tensors": len(artifacts)}
    if outside:
        record["gguf_outside"] = {name: r.scheme.gguf for name, r in outside.items()}
    return QuantizedModel(loaded.model, loaded.tokenizer, records, config, record, artifacts, act_handle, work,
                          outside=outside)  # fmt: skip
