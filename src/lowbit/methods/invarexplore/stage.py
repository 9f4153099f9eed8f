"""InvarExplore as a model-scope transform stage (see docs/methods.md, InvarExplore; paper arXiv 2502.06844).

Hill climbing over FFN-neuron permutations, per-neuron scales and 2x2 rotations: one random layer per step, a
proposal on 10% of its neurons, RTN-quantized and scored by L = CE/CE₀ + α·MSE/MSE₀ on the calibration batch;
strict improvements only. The accepted states are folded into the float weights at the end (no runtime op), and
the invariance record (π, s, θ per block, fp32) is returned by `artifacts()`, so it is written next to every export
(`lowbit_artifacts.safetensors`) and a later run resumes from it (`--opt invarexplore.resume=DIR_OR_FILE`).

Recipe shape (one engine, no special case): invarexplore is a *transform* that must sit right before the recipe's
single quantizer, after any other transforms: the teacher is the float model after those transforms, the in-loop
quantizer is RTN of the run's scheme (`proxy=rtn`), and the quantizer stage then quantizes the folded teacher.
- `awq+invarexplore+rtn`: the paper's main row and the reference code. The rtn stage reproduces the final in-loop
  student bit for bit (checked at the fold: `fold_check` in the run record).
- `invarexplore+gptq`, `awq+invarexplore+gptq`, `invarexplore+signround`, ...: the `rtn_proxy`, RTN in the
  loop on the float (or transformed) teacher, the base quantizer once on the folded model. `gptq_exact` and
  OmniQuant's frozen-LWC inner quantizer are not implemented (OmniQuant's LWC is a quantizer, so it cannot run
  before this stage in a recipe).
A recipe with a transform after invarexplore, without a quantizer after it, or with it twice is refused when the
recipe is parsed. Strict-improvement acceptance means the objective never rises above the base's; the run record
holds the initial and final objective.

Evaluation: `evaluation=incremental` (default) re-quantizes only the changed rows / groups and re-runs only the
changed layer's FFN, the layers after it and a chunked head (`methods/invarexplore/objective.py`); `naive` is the
reference's full re-evaluation (same decisions, the speed baseline). A step budget is deterministic for a seed; a
time budget is not (the record says which).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch

from lowbit.arch import ArchSpec
from lowbit.data import load_eval
from lowbit.engine import ModelContext, ModelStage
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import cut_windows
from lowbit.methods.invarexplore.invariances import monitored_layers, neuron_roles
from lowbit.methods.invarexplore.options import InvarExploreOptions
from lowbit.methods.invarexplore.search import InvarSearch
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)


class InvarExplore(ModelStage):
    """Discrete search over FFN invariances with a quantizer in the loop (Algorithm 1 of the paper)."""

    name: ClassVar[str] = "invarexplore"
    kind: ClassVar[str] = "transform"
    needs_data: ClassVar[bool] = True
    summary: ClassVar[str] = "InvarExplore: search FFN permutations/scales/rotations with RTN in the loop, folded"
    experts_reason: ClassVar[str] = (
        "its neuron permutations, scalings and rotations act on one dense FFN per block, and a mixture-of-experts "
        "block has one per expert behind a router: not implemented"
    )
    Options: ClassVar[type] = InvarExploreOptions
    data_parallel: ClassVar[bool] = True  # the search batch split over the ranks, every score summed (objective.py)

    def __init__(self, options: InvarExploreOptions, scheme: QuantScheme) -> None:
        super().__init__(options, scheme)
        self.record: dict[str, torch.Tensor] = {}

    @classmethod
    def refuses(cls, arch: ArchSpec) -> str | None:
        """FFN neurons over the row slices of a fused gate_up_proj (Phi-3) are not implemented."""
        if reason := super().refuses(arch):
            return reason
        try:
            neuron_roles(arch.ffn)
        except LowbitError as error:
            return str(error)
        return None

    @classmethod
    def check_recipe(cls, names: tuple[str, ...], kinds: list[str]) -> None:
        """invarexplore once, right before the recipe's quantizer (see the module docstring)."""
        recipe = "+".join(names)
        if names.count(cls.name) > 1:
            raise LowbitError(f"recipe '{recipe}' has invarexplore twice; keep one (raise its max_steps instead)")
        index = names.index(cls.name)
        if index == len(names) - 1:
            raise LowbitError(
                f"recipe '{recipe}' ends with invarexplore, which searches for the quantizer that follows it: end "
                "the recipe with one, e.g. awq+invarexplore+rtn or invarexplore+gptq"
            )
        if kinds[index + 1] != "quantizer":
            raise LowbitError(
                f"recipe '{recipe}' puts {names[index + 1]} after invarexplore; it would change the weights the search "
                f"optimised: put invarexplore last, right before the quantizer (e.g. {names[index + 1]}+invarexplore+"
                f"{names[-1]})"
            )

    @classmethod
    def check_run(cls, options: InvarExploreOptions, *, nsamples: int, seqlen: int, depth: int) -> None:
        monitored_layers(depth, options.monitored_layers)
        if options.samples + options.holdout > nsamples:
            need = f"{options.samples} + holdout {options.holdout}" if options.holdout else str(options.samples)
            raise LowbitError(
                f"invarexplore.samples={need} but the run has {nsamples} calibration windows: "
                f"raise --nsamples to {options.samples + options.holdout} or lower invarexplore.samples"
                + (" or invarexplore.holdout" if options.holdout else "")
            )
        if options.seqlen is not None and options.seqlen > seqlen:
            raise LowbitError(
                f"invarexplore.seqlen={options.seqlen} is longer than the calibration windows ({seqlen}): "
                "raise --seqlen or lower invarexplore.seqlen"
            )

    def artifacts(self) -> dict[str, torch.Tensor]:
        """The invariance record (`invarexplore.{perm,scale,angle}.<block>`, steps, accepts)."""
        return self.record

    def _windows(self, ctx: ModelContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The search batch (the first `samples` windows) and the holdout (the next `holdout`, maybe none).

        Data-parallel: the search batch is split evenly over the ranks (not the calibration: the batch is only its
        first `samples` windows, which could all lie on rank 0), each rank scoring its contiguous slice; the
        holdout is whole on every rank (it reads the student between steps and is not split)."""
        o, calibration, group = self.options, ctx.calibration, ctx.group
        if calibration is None:
            raise LowbitError("InvarExplore needs calibration data; pass --dataset (or 'builtin')")
        if group.distributed:  # every rank's windows, in order (token ids: small)
            calibration = torch.cat(group.gather_objects(calibration))
        n, length = calibration.shape
        self.check_run(o, nsamples=n, seqlen=length, depth=len(ctx.arch.blocks(ctx.model)))
        if o.samples < group.world_size:
            raise LowbitError(
                f"invarexplore.samples={o.samples} cannot be split over {group.world_size} ranks: raise it to "
                f"{group.world_size} or use fewer ranks"
            )
        windows = calibration[: o.samples, : o.seqlen]
        return windows[group.shard(o.samples)], calibration[o.samples : o.samples + o.holdout, : o.seqlen]

    def _heldout(self, ctx: ModelContext) -> dict[str, torch.Tensor]:
        """The test curve's windows: the first `heldout_windows` of each evaluation dataset, as `lowbit eval` cuts
        them (BOS-first where the family needs it), at `heldout_seqlen` tokens."""
        o = self.options
        if not o.heldout_datasets:
            return {}
        if ctx.tokenizer is None:
            raise LowbitError("invarexplore.heldout_eval needs the model's tokenizer: run through lowbit quantize")
        return {
            name: cut_windows(ctx.model, load_eval(ctx.tokenizer, name).input_ids, seqlen=o.heldout_seqlen,
                              max_windows=o.heldout_windows, bos=None).ids
            for name in o.heldout_datasets
        }  # fmt: skip

    def process_model(self, ctx: ModelContext) -> None:
        o = self._with_work_dir(ctx)
        windows, holdout = self._windows(ctx)
        search = InvarSearch(
            ctx.model, ctx.arch, self.scheme, windows, o, ctx.seed, ctx.device, self._heldout(ctx), holdout, ctx.group
        )
        resume, start, accepts = ({}, 0, 0) if o.resume is None else search.load_record(o.resume)
        search.prepare(resume)
        search.counters.steps, search.counters.accepts = start, accepts
        reason = search.run(start)
        ctx.metrics.update(self._metrics(search, start, reason))
        self.record = search.record()
        mismatches = search.fold()
        ctx.metrics["fold_check"] = "bit-identical" if mismatches == 0 else f"{mismatches} FFN weights differ"
        if mismatches:
            log.warning("InvarExplore fold: %d FFN weights differ from the in-loop student after RTN", mismatches)

    def _with_work_dir(self, ctx: ModelContext) -> InvarExploreOptions:
        """Options that checkpoint the record into the run's work dir (every log_every steps) and resume from it."""
        o = self.options
        checkpoint, resume = o.checkpoint, o.resume
        if ctx.work_dir is not None and checkpoint is None:  # (only rank 0 has a work dir unless resumed)
            record = ctx.work_dir / "invarexplore.safetensors"
            checkpoint = str(record)
            resume = str(record) if resume is None and record.is_file() else resume
        resume = ctx.group.broadcast_object(resume)  # rank 0's record decides; rank 0 alone writes it
        return dataclasses.replace(o, checkpoint=checkpoint if ctx.group.is_main else None, resume=resume)

    def _metrics(self, search: InvarSearch, start: int, reason: str) -> dict[str, Any]:
        counters, objective, score = search.counters, search.objective, search.evaluator.current
        done = counters.steps - start
        timings = {key: round(value, 2) for key, value in sorted(search.timings.items())}
        timings["other"] = round(search.seconds - sum(search.timings.values()), 2)
        ids = search.evaluator.ids
        return {
            "method": "invarexplore",
            "evaluation": self.options.evaluation,
            "inner_quantizer": f"rtn {self.scheme.name} (proxy={self.options.proxy})",
            "windows": list(ids.shape),
            "monitored": search.monitored,
            "ce0": round(objective.ce0, 6),
            "mse0": float(f"{objective.mse0:.6g}"),
            "initial_objective": search.initial,
            "final_objective": search.best,
            "final_ce": objective.ce(score),
            "final_mse": objective.mse(score),
            "resumed_from": self.options.resume,
            "start_step": start,
            "steps": counters.steps,
            "accepts": counters.accepts,
            "acceptance_rate": round(counters.accepts / max(counters.steps, 1), 4),
            "guard_rejects": counters.guard_rejects,
            "unchanged_rejects": counters.noop_rejects,
            "accepts_per_layer": counters.accepts_per_layer,
            "seconds": round(search.seconds, 2),
            "steps_per_s": round(done / search.seconds, 4) if search.seconds > 0 else None,
            "stop_reason": reason,
            "deterministic": self.options.max_seconds is None,
            "time_breakdown_s": timings,
            "log": counters.log,
            **search.watch.metrics(),
        }
