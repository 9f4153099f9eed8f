"""Train vs test during InvarExplore's search (issue 31): the test curve and best-on-holdout selection.

Hill climbing on one fixed calibration batch can fit that batch: the objective falls while unseen text gets worse.
Two watchers look at text the search never scores for its decisions:
- `TestCurve`: held-out perplexity of the current student (the in-loop quantizer applied, i.e. the model if the
  search stopped now) on evaluation datasets, at the start, every `heldout_every` steps and at the end, each row next
  to the train objective and CE: the paper's Figure 1.
- `HoldoutSelector`: the search objective on `holdout` calibration windows kept out of the search batch, every
  `holdout_every` steps; the search returns the state that was best there and may stop after `holdout_patience`
  checks without improvement. It checks at an interval, not on every accept: early on about 80% of steps accept, and
  a full pass over K windows costs about 2K/samples of an incremental step, so checking each accept would add ~50%
  at K = samples/4 where an interval of 50 steps adds ~1%; the selected state is then at most 49 steps off the best.
Neither changes a decision: each reads the model between steps through its own Evaluator (no cached streams, so no
extra [windows, L, d] x depth buffers) and draws no random number.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.methods.invarexplore.invariances import LayerState
from lowbit.methods.invarexplore.objective import Evaluator, Objective

if TYPE_CHECKING:
    from lowbit.methods.invarexplore.search import InvarSearch

log = logging.getLogger(__name__)

HOLDOUT = "invarexplore.holdout"
ReadStates = Callable[[dict[str, Tensor], str], list[LayerState]]


def side_evaluator(search: InvarSearch, ids: Tensor, monitored: list[int], head_bf16: bool) -> Evaluator:
    """An Evaluator of the search's model on other windows, full passes only (no incremental caches)."""
    o = search.options
    return Evaluator(
        search.model, search.arch, ids, monitored, o.batch_size, o.ce_chunk, search.evaluator.device,
        head_bf16=head_bf16, streams=False,
    )  # fmt: skip


@dataclass
class TestCurve:
    """Held-out perplexity of the current student per dataset, with the train objective, over the steps."""

    evaluators: dict[str, Evaluator]
    every: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def measure(self, search: InvarSearch, step: int, **extra: Any) -> None:
        started = time.perf_counter()
        row: dict[str, Any] = {
            "step": step,
            "objective": round(search.best, 7),
            "ce": round(search.objective.ce(search.evaluator.current), 6),
        }
        for name, evaluator in self.evaluators.items():
            score = evaluator.full()
            row[f"{name}_ppl"] = round(math.exp(score.ce_sum / evaluator.predictions), 4)
        row |= extra
        self.rows.append(row)
        search.timings["heldout"] += time.perf_counter() - started
        log.info("invarexplore test curve %s", row)


@dataclass
class HoldoutSelector:
    """The search objective on held-out calibration windows and the best state seen there."""

    evaluator: Evaluator
    alpha: float
    every: int
    patience: int | None
    objective: Objective | None = None
    best_value: float = math.inf
    best_step: int = -1
    best_accepts: int = 0
    best_states: list[LayerState] | None = None
    stale: int = 0
    restored: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)

    def prepare(self) -> None:
        """Normalise by the starting student (the RTN model, before any resumed state), as the search does."""
        self.objective = Objective.starting_at(self.evaluator.full(), self.evaluator, self.alpha)

    def check(self, search: InvarSearch, step: int) -> bool:
        """Score the current student; keep it if strictly best so far. True when patience is exhausted."""
        started = time.perf_counter()
        score = self.evaluator.full()
        value = self.objective(score)
        if value < self.best_value:
            self.best_value, self.best_step, self.best_accepts = value, step, search.counters.accepts
            self.best_states = [state.clone() for state in search.states]
            self.stale = 0
        else:
            self.stale += 1
        self.rows.append({
            "step": step, "holdout_objective": round(value, 7), "holdout_ce": round(self.objective.ce(score), 6),
            "best_step": self.best_step,
        })  # fmt: skip
        search.timings["holdout"] += time.perf_counter() - started
        return self.patience is not None and self.stale >= self.patience

    def record(self, names: list[str]) -> dict[str, Tensor]:
        """The best state and its bookkeeping, so that a resumed search selects as the straight one would."""
        out = {
            f"{HOLDOUT}.windows": torch.tensor([self.evaluator.ids.shape[0]]),
            f"{HOLDOUT}.best_step": torch.tensor([self.best_step]),
            f"{HOLDOUT}.best_accepts": torch.tensor([self.best_accepts]),
            f"{HOLDOUT}.best_value": torch.tensor([self.best_value], dtype=torch.float64),
            f"{HOLDOUT}.stale": torch.tensor([0 if self.restored else self.stale]),
        }
        for name, state in zip(names, self.best_states or [], strict=False):
            out[f"{HOLDOUT}.perm.{name}"] = state.perm.clone()
            out[f"{HOLDOUT}.scale.{name}"] = state.scale.clone()
            out[f"{HOLDOUT}.angle.{name}"] = state.angle.clone()
        return out

    def load(self, tensors: dict[str, Tensor], read_states: ReadStates, path: str) -> None:
        """The best state of a record written with holdout on; a record without one starts selecting afresh."""
        if f"{HOLDOUT}.best_step" not in tensors:
            return
        windows = int(tensors[f"{HOLDOUT}.windows"][0])
        if windows != self.evaluator.ids.shape[0]:
            raise LowbitError(
                f"the record at '{path}' was searched with invarexplore.holdout={windows}: resume with "
                f"--opt invarexplore.holdout={windows}, or start afresh without invarexplore.resume"
            )
        self.best_step = int(tensors[f"{HOLDOUT}.best_step"][0])
        self.best_accepts = int(tensors[f"{HOLDOUT}.best_accepts"][0])
        self.best_value = float(tensors[f"{HOLDOUT}.best_value"][0])
        self.stale = int(tensors[f"{HOLDOUT}.stale"][0])
        self.best_states = read_states(tensors, HOLDOUT)


@dataclass
class HeldoutWatch:
    """Both watchers behind the calls the search makes (each a no-op when its watcher is off)."""

    curve: TestCurve | None = None
    selector: HoldoutSelector | None = None

    @classmethod
    def build(cls, search: InvarSearch, heldout: dict[str, Tensor] | None, holdout: Tensor | None) -> HeldoutWatch:
        o = search.options
        curve = selector = None
        if heldout:
            evaluators = {name: side_evaluator(search, ids, [], head_bf16=False) for name, ids in heldout.items()}
            curve = TestCurve(evaluators, o.heldout_every)
        if holdout is not None and holdout.shape[0]:
            evaluator = side_evaluator(search, holdout, search.monitored, o.head_bf16)
            selector = HoldoutSelector(evaluator, o.alpha, o.holdout_every, o.holdout_patience)
        return cls(curve, selector)

    def record_teacher(self) -> None:
        """Teacher targets of the holdout windows' monitored layers (the model must still be the float teacher)."""
        if self.selector is not None:
            self.selector.evaluator.record_teacher()

    def prepare(self) -> None:
        if self.selector is not None:
            self.selector.prepare()

    def begin(self, search: InvarSearch, start: int) -> None:
        if self.curve is not None:
            self.curve.measure(search, start)
        if self.selector is not None and self.selector.best_states is None:
            self.selector.check(search, start)

    def after_step(self, search: InvarSearch, step: int) -> str | None:
        """Measure what is due at `step`; the stop reason when the holdout's patience ran out."""
        if self.curve is not None and step % self.curve.every == 0:
            self.curve.measure(search, step)
        if self.selector is not None and step % self.selector.every == 0 and self.selector.check(search, step):
            return "holdout_patience"
        return None

    def finish(self, search: InvarSearch) -> None:
        """The last point of each curve; then the best-on-holdout state goes back into the model."""
        last = search.counters.steps
        if self.curve is not None and self.curve.rows[-1]["step"] != last:
            self.curve.measure(search, last)
        selector = self.selector
        if selector is None:
            return
        if not selector.rows or selector.rows[-1]["step"] != last:
            selector.check(search, last)
        if selector.best_step != last:
            log.info("InvarExplore: returning the state of step %d (best on the holdout windows)", selector.best_step)
            search.restore(dict(enumerate(selector.best_states)))
            selector.restored = True
            if self.curve is not None:
                self.curve.measure(search, last, selected_step=selector.best_step)

    def record(self, names: list[str], steps: int, accepts: int) -> tuple[int, int, dict[str, Tensor]]:
        """Steps, accepts and extra tensors of the record: once restored, the search as it was at the best step."""
        if self.selector is None:
            return steps, accepts, {}
        extra = self.selector.record(names)
        if self.selector.restored:
            steps, accepts = self.selector.best_step, self.selector.best_accepts
        return steps, accepts, extra

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.curve is not None:
            out["test_curve"] = self.curve.rows
        if self.selector is not None:
            selector = self.selector
            out["holdout"] = {
                "windows": selector.evaluator.ids.shape[0],
                "every": selector.every,
                "patience": selector.patience,
                "best_step": selector.best_step,
                "best_objective": selector.best_value,
                "restored": selector.restored,
                "curve": selector.rows,
            }
        return out
