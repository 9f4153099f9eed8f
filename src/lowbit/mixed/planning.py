"""Where a mixed-precision run gets its plan: a plan file given with --scheme-plan, or the planning pass (the
engine's block loop with `SensitivityPass`) and the knapsack, before any stage runs."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from lowbit.arch import ArchSpec
from lowbit.engine.block_loop import EngineOptions, run_block_stages
from lowbit.engine.offload import ChainStore
from lowbit.engine.streaming import BlockSource
from lowbit.errors import LowbitError
from lowbit.mixed.plan import SchemePlan, make_plan, uniform_bits
from lowbit.mixed.sensitivity import lm_gradient_losses
from lowbit.mixed.stage import SensitivityPass
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)


def check_plan_covers(plan: SchemePlan, model: nn.Module, arch: ArchSpec) -> None:
    """A plan file must name exactly this model's block linears (an edited or foreign plan is refused)."""
    names = {f"{arch.block_name(i)}.{n}" for i, block in enumerate(arch.blocks(model)) for n in arch.linears(block)}
    missing, extra = sorted(names - set(plan.linears)), sorted(set(plan.linears) - names)
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"names {extra[0]}, which this model does not have"
        raise LowbitError(f"the scheme plan {what}: pass the plan.yaml a run of this model wrote")


def _lm_losses(
    model: nn.Module,
    arch: ArchSpec,
    scheme: QuantScheme,
    calibration: torch.Tensor | None,
    options: EngineOptions,
    source: BlockSource | None,
) -> dict[str, list[float]]:
    """The `lm` estimator over every block linear (resident models only: it backpropagates the whole model)."""
    if source is not None:
        raise LowbitError(f"{scheme.name} backpropagates the whole model, which a streamed run does not hold: use the "
                          "hessian or gradient estimator, or --opt engine.stream=off")  # fmt: skip
    if calibration is None:
        raise LowbitError("an auto: scheme needs calibration data; pass --dataset (or 'builtin')")
    budget = scheme.mixed
    assert budget is not None
    linears = {f"{arch.block_name(i)}.{name}": linear for i, block in enumerate(arch.blocks(model))
               for name, linear in arch.linears(block).items()}  # fmt: skip
    return lm_gradient_losses(model, linears, budget.options, calibration, options.batch_size)


def measure_and_plan(
    model: nn.Module,
    arch: ArchSpec,
    scheme: QuantScheme,
    calibration: torch.Tensor | None,
    options: EngineOptions,
    seed: int,
    fmt: str,
    *,
    ct_packing: str | None = None,
    source: BlockSource | None = None,
    chains: ChainStore | None = None,
) -> SchemePlan:
    """The planning pass over every block (float chain, nothing rounded), then the exact knapsack."""
    budget = scheme.mixed
    assert budget is not None
    started = time.perf_counter()
    arch.prepare(model)  # MoE: per-expert linears, as the stages will see them
    sizes = uniform_bits(model, arch, scheme, fmt, ct_packing)
    log.info("stored bits per weight of each option as %s: %s", fmt,
             ", ".join(f"{name} {bits:.4f}" for name, bits in sizes.items()))  # fmt: skip
    estimator = budget.estimator
    if estimator == "lm":  # one forward and backward of the whole model per option
        losses = _lm_losses(model, arch, scheme, calibration, options, source)
    else:  # block-local estimators: the engine's block loop on the float chain (streamed models too)
        measure = SensitivityPass(budget, scheme, estimator)
        run_block_stages(model, arch, [measure], scheme, calibration, options, seed, source=source, chains=chains)
        losses = measure.losses
    plan = make_plan(model, arch, scheme, losses, fmt, ct_packing, estimator)
    counts: dict[str, int] = {}
    for option in plan.linears.values():
        counts[option] = counts.get(option, 0) + 1
    log.info("mixed-precision plan (%s estimator): %.4f bits per weight stored as %s (budget %s) in %.1fs: %s",
             estimator, plan.bits_per_weight, plan.format, budget.bits, time.perf_counter() - started,
             ", ".join(f"{n} x {o}" for o, n in sorted(counts.items())))  # fmt: skip
    return plan
