"""The memory planner's decision: resident or streamed, whether the run fits, and the options that would make it
fit (each on its own, cheapest first) when it does not. The estimate itself is planner/estimate.py.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.engine.memory import MemoryPhases, available_memory, cgroup_available, gpu_free, peak_rss_phases
from lowbit.errors import LowbitError
from lowbit.planner.estimate import AUTO_STREAM_FRACTION, DEFAULT_EVAL_SEQLEN, StreamOption, estimate
from lowbit.planner.result import GIB, MIB, MemoryPlan, gib
from lowbit.planner.shape import ModelShape

if TYPE_CHECKING:
    from lowbit.config import QuantizeConfig

log = logging.getLogger(__name__)


# --- deciding, and what would fit -----------------------------------------------------------------------------


def plan_run(
    model_dir_or_config: str | Path | dict[str, Any] | Any,
    config: QuantizeConfig,
    *,
    stream_option: StreamOption = "auto",
    available: int | None = None,
    gpu_available: int | None = None,
    evaluate: bool = False,
    export_format: str = "auto",
    eval_seqlen: int = DEFAULT_EVAL_SEQLEN,
    eval_windows: int | None = None,
) -> MemoryPlan:
    """Plan a run before loading anything: resident or streamed (`auto`: stream when the resident run needs more than
    AUTO_STREAM_FRACTION of the available memory), the activation chains in RAM or on disk (engine.offload=auto: on
    disk when the chosen mode still needs more than that), whether it fits, and the fixes when it does not.

    `model_dir_or_config`: a model directory, its config.json, a config dict or `PretrainedConfig`, or a ModelShape.
    `available` / `gpu_available` (bytes) default to what this machine has now (`available_memory`, CUDA's free
    memory when engine.device is cuda)."""
    if stream_option not in ("auto", "on", "off"):
        raise LowbitError(f"stream must be auto, on or off, got '{stream_option}'")
    shape = model_dir_or_config if isinstance(model_dir_or_config, ModelShape) else (
        ModelShape.from_config(model_dir_or_config)
    )  # fmt: skip
    available = available_memory() if available is None else int(available)
    if gpu_available is None and config.engine.device.startswith("cuda"):
        gpu_available = gpu_free(config.engine.device)
    kwargs = {"evaluate": evaluate, "export_format": export_format, "available": available,
              "gpu_available": gpu_available,
              "eval_seqlen": eval_seqlen, "eval_windows": eval_windows}  # fmt: skip
    resident = estimate(shape, config, stream=False, **kwargs)
    if stream_option == "off":
        plan, decision = resident, "stream=off"
    elif stream_option == "on":
        plan, decision = estimate(shape, config, stream=True, **kwargs), "stream=on"
    else:
        streamed = estimate(shape, config, stream=True, **kwargs)
        threshold = AUTO_STREAM_FRACTION * available
        if resident.required <= threshold or streamed.blocked is not None:
            plan = resident
            decision = f"auto: resident needs {gib(resident.required)}, within {AUTO_STREAM_FRACTION:.0%} of available"
            if resident.required > threshold:
                decision = f"auto: resident ({streamed.blocked})"
        else:
            plan = streamed
            decision = (
                f"auto: resident would need {gib(resident.required)}, over {AUTO_STREAM_FRACTION:.0%} of "
                f"{gib(available)}; streaming needs {gib(streamed.required)}"
            )
    plan.decision = decision
    if config.engine.offload == "auto" and config.needs_data:
        plan = _offload_choice(shape, config, plan, kwargs)
    if not plan.fits:
        chosen = _with(config, engine_offload="disk") if plan.settings["chains_on_disk"] else config
        plan.fixes, plan.gpu_fixes = _fixes(shape, chosen, plan, kwargs)
    log.debug("memory plan: %s", plan.to_dict())
    return plan


def _offload_choice(shape: ModelShape, config: QuantizeConfig, plan: MemoryPlan, kwargs: dict[str, Any]) -> MemoryPlan:
    """engine.offload=auto: the chains go to disk when the chosen mode needs more than AUTO_STREAM_FRACTION of the
    available memory with them in RAM, and less with them on disk (files cost I/O, so not when they fit)."""
    if plan.required <= AUTO_STREAM_FRACTION * kwargs["available"]:
        return plan
    on_disk = estimate(shape, config, stream=plan.stream, chains_on_disk=True, **kwargs)
    if on_disk.required >= plan.required:
        return plan
    on_disk.decision = (
        f"{plan.decision}; chains on disk (offload auto: {gib(plan.required)} with them in RAM, "
        f"{gib(on_disk.required)} on disk)"
    )
    return on_disk


def _host_fits(plan: MemoryPlan) -> bool:
    return plan.blocked is None and (plan.available is None or plan.required <= plan.available)


def _gpu_fits(plan: MemoryPlan) -> bool:
    return plan.gpu_available is None or not plan.gpu_terms or plan.gpu_estimate <= plan.gpu_available


def _with(config: QuantizeConfig, **changes: Any) -> QuantizeConfig:
    engine = {k: changes.pop(k) for k in list(changes) if k.startswith("engine_")}
    if engine:
        changes["engine"] = dataclasses.replace(config.engine, **{k[7:]: v for k, v in engine.items()})
    return dataclasses.replace(config, **changes)


def _largest_fitting(low: int, high: int, fits: Callable[[int], bool]) -> int | None:
    """The largest value in [low, high] for which `fits` holds (monotone), or None."""
    if high < low or not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _host_options(shape: ModelShape, config: QuantizeConfig, stream: bool, kwargs: dict[str, Any]) -> list[str]:
    """Calibration-size and engine options that make the run fit in RAM in the given mode, cheapest first."""

    def fits(**changes: Any) -> bool:
        return _host_fits(estimate(shape, _with(config, **changes), stream=stream, **kwargs))

    found = []
    if config.needs_data:
        n = _largest_fitting(1, config.nsamples - 1, lambda v: fits(nsamples=v))
        if n is not None:
            found.append(f"--nsamples {n}")
        length = _largest_fitting(8, config.seqlen - 1, lambda v: fits(seqlen=v))
        if length is not None:
            found.append(f"--seqlen {length}")
        if config.engine.offload != "disk" and fits(engine_offload="disk"):
            found.append("engine.offload=disk (the activation chains in files)")
        if config.engine.batch_size > 1 and fits(engine_batch_size=1):
            found.append("engine.batch_size=1")
    return found


def _fixes(
    shape: ModelShape, config: QuantizeConfig, plan: MemoryPlan, kwargs: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Options that make the run fit, each on its own, cheapest first: streaming (or, where a stage cannot stream,
    resident), fewer samples, a shorter seqlen, the chains on disk, a smaller batch; for
    the accelerator, smaller batches, fewer samples or the CPU."""
    host: list[str] = []
    gpu: list[str] = []
    stream = plan.stream
    if not _host_fits(plan):
        other = estimate(shape, config, stream=not stream, **kwargs)
        if _host_fits(other):
            mode = "streaming (engine.stream=on" if not stream else "resident (engine.stream=off"
            host.append(f"{mode}, {gib(other.required)})")
        mode = stream if plan.blocked is None else not stream
        host += _host_options(shape, config, mode, kwargs)
        if not host and not stream and other.blocked is None:  # streaming alone is not enough: combined with them
            host += [f"engine.stream=on with {fix}" for fix in _host_options(shape, config, True, kwargs)]
        if not host and (plan.blocked or other.blocked):
            plan.notes.append(f"streaming cannot help: {plan.blocked or other.blocked}")
    if not _gpu_fits(plan):
        for name, options in (("signround", ("micro_batch_size",)), ("omniquant", ("batch_size",))):
            spec = next((s for s in config.stages if s.name == name), None)
            if spec is None:
                continue
            smaller = dataclasses.replace(spec.options, **dict.fromkeys(options, 1))
            stages = tuple(dataclasses.replace(s, options=smaller) if s is spec else s for s in config.stages)
            if _gpu_fits(estimate(shape, dataclasses.replace(config, stages=stages), stream=stream, **kwargs)):
                gpu.append(f"{name}.{options[0]}=1")
        smaller_batch = _with(config, engine_batch_size=1)
        if config.engine.batch_size > 1 and _gpu_fits(estimate(shape, smaller_batch, stream=stream, **kwargs)):
            gpu.append("engine.batch_size=1")
        n = _largest_fitting(
            1, config.nsamples - 1,
            lambda v: _gpu_fits(estimate(shape, _with(config, nsamples=v), stream=stream, **kwargs)),
        )  # fmt: skip
        if n is not None and config.needs_data:
            gpu.append(f"--nsamples {n}")
        on_cpu = estimate(shape, _with(config, engine_device="cpu"), stream=stream, **kwargs)
        if _host_fits(on_cpu):
            gpu.append(f"engine.device=cpu ({gib(on_cpu.required)} of RAM)")
    return host, gpu


__all__ = [
    "GIB",
    "MIB",
    "MemoryPhases",
    "MemoryPlan",
    "ModelShape",
    "available_memory",
    "cgroup_available",
    "estimate",
    "peak_rss_phases",
    "plan_run",
]
