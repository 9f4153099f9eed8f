"""InvarExplore's hill climbing over one model: the teacher, the in-loop student, the search
loop with its stopping rules and log, the fold, and the invariance record (save and resume).

The model's block linears hold the *student* (RTN of the teacher, fake-quant fp32) during the search; the teacher's
weights are kept aside. `fold()` puts the teacher back with the accepted states folded into the FFN weights, so the
model is a plain float model again, ready for the recipe's quantizer stage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec
from lowbit.distributed.group import Group
from lowbit.errors import LowbitError
from lowbit.formats.files import ARTIFACTS_FILE
from lowbit.methods.invarexplore.heldout import HeldoutWatch
from lowbit.methods.invarexplore.invariances import (
    LayerState,
    ProposalConfig,
    build_candidate,
    fold_weights,
    monitored_layers,
    neuron_roles,
    propose,
    quantize_rows,
)
from lowbit.methods.invarexplore.objective import Evaluator, Objective, Score
from lowbit.methods.invarexplore.options import InvarExploreOptions
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)

PREFIX = "invarexplore"


def step_generator(seed: int, step: int) -> torch.Generator:
    """One private RNG per step: a step's proposal depends only on (seed, step), so a resumed run replays exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1))


@dataclass
class SearchCounters:
    """What the loop has done so far (steps and accepts include those of a resumed record)."""

    steps: int = 0
    accepts: int = 0
    guard_rejects: int = 0
    noop_rejects: int = 0
    rejects_in_row: int = 0
    accepts_per_layer: list[int] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    window_steps: int = 0
    window_accepts: int = 0


def _same(new: dict[str, Tensor], old: dict[str, Tensor]) -> bool:
    return all(torch.equal(tensor, old[name]) for name, tensor in new.items())


def check_model(model: nn.Module, arch: ArchSpec, scale: bool) -> None:
    """Refuse layouts the objective does not cover: post-LN OPT (350m), non-ReLU OPT activations with scaling on."""
    config = model.config
    if arch.family == "opt":
        if not getattr(config, "do_layer_norm_before", True):
            raise LowbitError("InvarExplore needs pre-LN blocks; OPT-350m is post-LN: use another OPT size")
        if scale and getattr(config, "activation_function", "relu") != "relu":
            raise LowbitError("scaling is exact only for ReLU FFNs: set --opt invarexplore.scale=false")


class InvarSearch:
    """The search on one model (in place). `options` is the stage's InvarExploreOptions."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchSpec,
        scheme: QuantScheme,
        ids: Tensor,
        options: InvarExploreOptions,
        seed: int,
        device: str | torch.device,
        heldout: dict[str, Tensor] | None = None,
        holdout: Tensor | None = None,
        group: Group | None = None,
    ) -> None:
        """`heldout`: evaluation windows per dataset for the test curve; `holdout`: calibration windows kept out of
        `ids` for best-on-holdout selection (heldout.py). Neither changes a decision. `group`: the ranks of a
        data-parallel run, `ids` this rank's slice of the batch (the scores are summed over the ranks: every rank
        takes the same decisions and holds the same student; `heldout` and `holdout` are whole on every rank)."""
        check_model(model, arch, options.scale)
        self.model, self.arch, self.scheme, self.options, self.seed = model, arch, scheme, options, seed
        self.blocks = arch.blocks(model)
        self.depth = len(self.blocks)
        self.roles = neuron_roles(arch.ffn, options.rotation_target)
        self.monitored = monitored_layers(self.depth, options.monitored_layers)
        self.width = self.blocks[0].get_submodule(self.roles.contract).in_features
        self.proposals = ProposalConfig(
            options.swap_frac, options.sigma_scale, options.sigma_rot, options.permute, options.scale, options.rotate
        )
        if self.proposals.pairs_touched(self.width) < 1:
            raise LowbitError(
                f"invarexplore.swap_frac={options.swap_frac} touches no neuron pair of the {self.width}-neuron FFN: "
                "raise it (the reference uses 0.1)"
            )
        self.evaluator = Evaluator(
            model, arch, ids, self.monitored, options.batch_size, options.ce_chunk, torch.device(device),
            head_bf16=options.head_bf16, group=group or Group(),
        )  # fmt: skip
        self.is_main = group is None or group.is_main
        self.states = [LayerState.identity(self.width) for _ in range(self.depth)]
        self.counters = SearchCounters(accepts_per_layer=[0] * self.depth)
        self.teacher: list[dict[str, Tensor]] = []
        self.teacher_bias: list[dict[str, Tensor]] = []
        self.dtype = self.blocks[0].get_submodule(self.roles.contract).weight.dtype
        self.quantize = partial(quantize_rows, scheme=scheme, dtype=self.dtype)
        self.objective: Objective | None = None
        self.best = math.inf
        self.initial = math.inf
        self.seconds = 0.0
        self.timings = self.evaluator.timings
        self.watch = HeldoutWatch.build(self, heldout, holdout)

    # -- the student in the model ------------------------------------------------------------------------

    def _linears(self, layer: int) -> dict[str, nn.Linear]:
        return self.arch.linears(self.blocks[layer])

    def student(self, layer: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The FFN weights and biases the model holds now for `layer`."""
        linears = self._linears(layer)
        weights = {name: linears[name].weight.data for name in self.roles.linears}
        biases = {name: linears[name].bias.data for name, _, _ in self.roles.expand if linears[name].bias is not None}
        return weights, biases

    def _install(self, layer: int, weights: dict[str, Tensor], biases: dict[str, Tensor]) -> None:
        linears = self._linears(layer)
        for name, w in weights.items():
            linears[name].weight.data = w
        for name, b in biases.items():
            linears[name].bias.data = b

    def prepare(self, resume: dict[int, LayerState] | None = None) -> None:
        """Teacher targets, the RTN student, CE₀ and MSE₀ on it; then the resumed states, if any."""
        evaluator = self.evaluator
        evaluator.record_teacher()
        self.watch.record_teacher()
        for layer in range(self.depth):
            linears = self._linears(layer)
            self.teacher.append({name: linear.weight.detach().clone() for name, linear in linears.items()})
            self.teacher_bias.append(
                {n: linears[n].bias.detach().clone() for n, _, _ in self.roles.expand if linears[n].bias is not None}
            )
            for linear in linears.values():
                linear.weight.data = self.quantize(linear.weight.detach()).to(self.dtype)
        base = self._full_score()
        self.objective = Objective.starting_at(base, evaluator, self.options.alpha)
        self.watch.prepare()
        self.initial = self.best = self.objective(base)
        if resume:
            self.restore(resume)
        self.timings.clear()  # the breakdown covers the search loop only
        log.info(
            "InvarExplore start: CE0 %.4f, MSE0 %.4g, objective %.6f (%d monitored layers)",
            self.objective.ce0, self.objective.mse0, self.best, len(self.monitored),
        )  # fmt: skip

    def restore(self, states: dict[int, LayerState]) -> None:
        """Put these layers' states (rebuilt from the teacher) into the student and rescore it in full."""
        for layer, state in states.items():
            self.states[layer] = state.clone()
            self._install(layer, *self._candidate(layer, state, None))
        self.best = self.objective(self._full_score())

    def _full_score(self) -> Score:
        """Score the whole current student (and refresh the incremental caches), by the configured path."""
        if self.options.evaluation == "naive":
            score = self.evaluator.naive()
            self.evaluator.commit(0, score, incremental=False)
            return score
        return self.evaluator.full()

    def _candidate(
        self, layer: int, state: LayerState, touched: Tensor | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        weights, biases = self.student(layer)
        return build_candidate(
            self.teacher[layer], self.teacher_bias[layer], weights, biases, state, touched, self.roles,
            self.quantize, self.scheme,
        )  # fmt: skip

    # -- one step ----------------------------------------------------------------------------------------

    def step(self, step: int) -> tuple[int, bool]:
        """Propose, build, score and accept or reject once; returns (layer, accepted)."""
        started = time.perf_counter()
        generator = step_generator(self.seed, step)
        layer = int(torch.randint(self.depth, (1,), generator=generator))
        state, touched = propose(self.states[layer], generator, self.proposals)
        if self.options.positive_scale_guard and bool((state.scale[touched] <= self.options.min_scale).any()):
            self.counters.guard_rejects += 1
            return layer, False
        naive = self.options.evaluation == "naive"
        weights, biases = self._candidate(layer, state, None if naive else touched)
        old = self.student(layer)
        self.timings["build"] += time.perf_counter() - started
        if not naive and _same(weights, old[0]) and _same(biases, old[1]):
            self.counters.noop_rejects += 1  # the same student scores the same loss: not a strict improvement
            return layer, False
        self._install(layer, weights, biases)
        score = self.evaluator.naive() if naive else self.evaluator.incremental(layer)
        value = self.objective(score)
        if value < self.best:  # strict improvement only
            self.evaluator.commit(layer, score, incremental=not naive)
            self.states[layer], self.best = state, value
            return layer, True
        self._install(layer, *old)
        return layer, False

    def run(self, start: int = 0) -> str:
        """Steps from `start` until max_steps, max_seconds, patience or holdout_patience; returns why it stopped.
        The held-out watchers measure between steps; at the end the best-on-holdout state (if any) is restored."""
        options, counters = self.options, self.counters
        counters.steps = start
        started = time.perf_counter()
        reason = "max_steps"
        bar = tqdm(
            total=options.max_steps, initial=start, desc="invarexplore", unit="step",
            disable=not options.progress or not self.is_main,
        )  # fmt: skip
        self.watch.begin(self, start)
        try:
            for step in range(start, options.max_steps):
                layer, accepted = self.step(step)
                counters.steps = step + 1
                counters.window_steps += 1
                if accepted:
                    counters.accepts += 1
                    counters.window_accepts += 1
                    counters.accepts_per_layer[layer] += 1
                    counters.rejects_in_row = 0
                else:
                    counters.rejects_in_row += 1
                elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(
                    acc=counters.accepts, rate=f"{counters.accepts / counters.steps:.2f}", obj=f"{self.best:.5f}",
                    refresh=False,
                )  # fmt: skip
                done = counters.steps - start
                if counters.steps % options.log_every == 0:
                    self._log_row(elapsed, done)
                stop = self.watch.after_step(self, counters.steps)  # before the checkpoint: it saves the selection
                if options.checkpoint and self.is_main and counters.steps % options.log_every == 0:
                    self.save_record(options.checkpoint)
                if options.max_seconds is not None and elapsed >= options.max_seconds:
                    reason = "max_seconds"
                    break
                if options.patience is not None and counters.rejects_in_row >= options.patience:
                    reason = "patience"
                    break
                if stop is not None:
                    reason = stop
                    break
        finally:
            bar.close()
        if counters.window_steps:
            self._log_row(time.perf_counter() - started, counters.steps - start)
        if options.checkpoint and self.is_main:
            self.save_record(options.checkpoint)  # the state reached, so a resume continues the straight run
        self.watch.finish(self)  # may put the best-on-holdout state back
        self.seconds = time.perf_counter() - started  # with the last held-out measurements (in the breakdown)
        return reason if start < options.max_steps else "record already at max_steps"

    def _log_row(self, elapsed: float, done: int) -> None:
        counters, evaluator = self.counters, self.evaluator
        score = evaluator.current
        row = {
            "step": counters.steps,
            "accepts": counters.accepts,
            "acceptance_rate": round(counters.accepts / max(counters.steps, 1), 4),
            "window_acceptance_rate": round(counters.window_accepts / max(counters.window_steps, 1), 4),
            "objective": round(self.best, 7),
            "ce": round(self.objective.ce(score), 6),
            "mse": float(f"{self.objective.mse(score):.6g}"),
            "seconds": round(elapsed, 2),
            "steps_per_s": round(done / elapsed, 4) if elapsed > 0 else None,
        }
        counters.log.append(row)
        counters.window_steps = counters.window_accepts = 0
        log.info("invarexplore %s", row)

    # -- fold and record ---------------------------------------------------------------------------------

    @torch.no_grad()
    def fold(self) -> int:
        """Restore the teacher with every state folded into its FFN weights; returns how many FFN weights differ
        from the in-loop student after RTN (0: the rtn stage reproduces the student bit for bit)."""
        mismatches = 0
        for layer in range(self.depth):
            student, _ = self.student(layer)
            weights, biases = fold_weights(
                self.teacher[layer], self.teacher_bias[layer], self.states[layer], self.roles
            )
            for name, w in weights.items():
                mismatches += int(not torch.equal(self.quantize(w).to(self.dtype), student[name]))
            linears = self._linears(layer)
            for name, linear in linears.items():
                linear.weight.data = weights.get(name, self.teacher[layer][name])
            for name, b in biases.items():
                linears[name].bias.data = b
        self.teacher, self.teacher_bias = [], []
        return mismatches

    def record(self) -> dict[str, Tensor]:
        """The invariance record (fp32 scales and angles, int64 permutations per block, and the step count)."""
        names = [self.arch.block_name(layer) for layer in range(self.depth)]
        steps, accepts, extra = self.watch.record(names, self.counters.steps, self.counters.accepts)
        out: dict[str, Tensor] = {
            f"{PREFIX}.steps": torch.tensor([steps]),
            f"{PREFIX}.accepts": torch.tensor([accepts]),
            **extra,
        }
        for layer, state in enumerate(self.states):
            name = self.arch.block_name(layer)
            out[f"{PREFIX}.perm.{name}"] = state.perm.clone()
            out[f"{PREFIX}.scale.{name}"] = state.scale.clone()
            out[f"{PREFIX}.angle.{name}"] = state.angle.clone()
        return out

    def save_record(self, path: str | Path) -> None:
        """Write the record atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.partial")
        save_file({k: v.contiguous() for k, v in self.record().items()}, str(temp))
        temp.replace(path)

    def load_record(self, source: str | Path) -> tuple[dict[int, LayerState], int, int]:
        """States, steps and accepts from a record file or an export directory holding one."""
        path = Path(source)
        if path.is_dir():
            path = path / ARTIFACTS_FILE
        if not path.is_file():
            raise LowbitError(f"invarexplore.resume: no invariance record at '{source}': pass a record file or export")
        tensors = load_file(str(path))
        if f"{PREFIX}.steps" not in tensors:
            raise LowbitError(f"'{path}' holds no InvarExplore record: pass the export of an invarexplore run")
        read = partial(self._read_states, path=path)
        states = {layer: state for layer, state in enumerate(read(tensors, PREFIX)) if not state.is_identity()}
        self.counters.accepts_per_layer = [0] * self.depth
        if self.watch.selector is not None:
            self.watch.selector.load(tensors, read, str(path))
        return states, int(tensors[f"{PREFIX}.steps"][0]), int(tensors[f"{PREFIX}.accepts"][0])

    def _read_states(self, tensors: dict[str, Tensor], prefix: str, path: Path) -> list[LayerState]:
        """One checked state per block under `prefix` (the search's, or the holdout's best)."""
        states = []
        for layer in range(self.depth):
            name = self.arch.block_name(layer)
            keys = [f"{prefix}.{kind}.{name}" for kind in ("perm", "scale", "angle")]
            if any(key not in tensors for key in keys):
                raise LowbitError(f"the record at '{path}' has no state for {name}: resume from a record of this model")
            state = LayerState(tensors[keys[0]].long(), tensors[keys[1]].float(), tensors[keys[2]].float())
            state.check(self.width, name)
            states.append(state)
        return states
