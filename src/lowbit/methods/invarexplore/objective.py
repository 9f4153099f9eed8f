"""InvarExplore's objective on the calibration batch: the fast incremental path and the naive one.

Objective: L = CE/CE₀ + α·MSE/MSE₀, CE the mean next-token cross-entropy, MSE the mean of clamp(H − H₀, ±100)²
over the monitored layers' outputs, normalised by the starting student's values.

A proposal changes one layer l's FFN. The incremental path keeps, for the accepted student, the residual stream
after attention h_mid[j] of every layer (captured at the FFN norm's input), the squared-error sum of each monitored
layer and the CE sum; it recomputes out_l = h_mid[l] + FFN'(norm(h_mid[l])), runs layers l+1.. and the head, and
reuses the cached errors of monitored layers before l. The head is chunked: final norm, lm_head and the
cross-entropy in fp32 over at most `ce_chunk` tokens at a time, never all logits at once. The naive path is the
reference's procedure: one full Hugging Face forward of the student (logits included) for every proposal; it is the
test oracle and the baseline of the speed comparison.

Data-parallel (`group` of several ranks): each rank's Evaluator holds its slice of the batch; every score's sums
(CE, each monitored layer's squared errors) are added over the ranks in rank order and the counts are global, so
every rank computes the objective one process computes (up to the sums' rounding order) and decides alike.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.arch import ArchSpec
from lowbit.distributed.group import Group
from lowbit.engine import call_block, capture_block_inputs
from lowbit.engine.context import move_to
from lowbit.engine.head import final_head
from lowbit.errors import LowbitError

CLAMP = 100.0


@dataclass
class Score:
    """Sums over the calibration batch for one student: CE (natural log) and squared errors per monitored layer."""

    ce_sum: float
    sse: dict[int, float]
    local: Score | None = None  # data-parallel: this rank's own sums (what an incremental pass starts from)


@dataclass(frozen=True)
class Objective:
    """L = CE/CE₀ + α·MSE/MSE₀ with the counts that turn sums into means."""

    ce0: float
    mse0: float
    alpha: float
    predictions: int
    elements: int  # monitored layers x tokens x hidden size

    @classmethod
    def starting_at(cls, base: Score, evaluator: Evaluator, alpha: float) -> Objective:
        """The objective normalised by `base`, the starting student's score on `evaluator`'s windows (L = 1 + α)."""
        ce0 = base.ce_sum / evaluator.predictions
        mse0 = sum(base.sse.values()) / evaluator.elements if evaluator.elements else 0.0
        return cls(ce0, mse0, alpha, evaluator.predictions, evaluator.elements)

    def ce(self, score: Score) -> float:
        return score.ce_sum / self.predictions

    def mse(self, score: Score) -> float:
        return sum(score.sse.values()) / self.elements if self.elements else 0.0

    def __call__(self, score: Score) -> float:
        value = self.ce(score) / self.ce0
        if self.elements and self.mse0 > 0:
            value += self.alpha * self.mse(score) / self.mse0
        return value


def ffn_output(arch: ArchSpec, block: nn.Module, x: Tensor) -> Tensor:
    """The FFN of one block on its normalised input, exactly as the block computes it (with the output norm of a
    sandwich-norm block, Gemma's post_feedforward_layernorm, so the result is what the residual adds)."""
    if arch.ffn.activation in ("swiglu", "geglu"):
        out = block.get_submodule(arch.ffn.contract.rpartition(".")[0])(x)
    else:
        fc1, fc2 = block.get_submodule(arch.ffn.expand[0]), block.get_submodule(arch.ffn.contract)
        out = fc2(block.activation_fn(fc1(x)))
    return out if arch.ffn_post_norm is None else block.get_submodule(arch.ffn_post_norm)(out)


def squared_error(out: Tensor, target: Tensor) -> float:
    """Σ clamp(out − target, ±100)² in float64 (the reference clamps before squaring)."""
    diff = (out.float() - target.to(out.device).float()).clamp(-CLAMP, CLAMP)
    return float(torch.sum(diff * diff, dtype=torch.float64))


@dataclass
class Evaluator:
    """The calibration batch, the teacher targets and the accepted student's cached streams for one model."""

    model: nn.Module
    arch: ArchSpec
    ids: Tensor
    monitored: list[int]
    batch_size: int
    ce_chunk: int
    device: torch.device
    head_bf16: bool = False  # lm_head matmul in bf16 (autocast): faster on CPUs with bf16 units, not exact
    streams: bool = True  # keep h_mid per layer for `incremental` (off: `full` only, no [n, L, d] x depth buffers)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    group: Group = field(default_factory=Group)  # the ranks whose slices of the batch make the whole (default: one)

    def __post_init__(self) -> None:
        self.windows = self.group.offset(self.ids.shape[0])[1]  # every rank's windows: the counts are global
        self.blocks = self.arch.blocks(self.model)
        self.depth = len(self.blocks)
        self.head = final_head(self.model, self.arch)
        captured = capture_block_inputs(self.model, self.arch, self.ids, batch_size=self.batch_size, device=self.device)
        self.inputs = captured.hidden
        moved: dict[int, Any] = {}  # equal kwargs of different blocks stay shared on the device

        def on_device(value: Any) -> Any:
            return moved.setdefault(id(value), move_to(value, self.device))

        self.kwargs = [{key: on_device(value) for key, value in kw.items()} for kw in captured.per_block]
        self.targets: dict[int, Tensor] = {}
        n, length, hidden = self.inputs.shape
        kept = self.depth if self.streams else 0
        self.mid = [torch.empty(n, length, hidden) for _ in range(kept)]
        self.spare = [torch.empty(n, length, hidden) for _ in range(kept)]
        self.current: Score | None = None
        self.fresh = False  # whether `mid` belongs to the student in the model

    @property
    def predictions(self) -> int:
        return self.windows * (self.ids.shape[1] - 1)

    @property
    def elements(self) -> int:
        return len(self.monitored) * self.windows * math.prod(self.inputs.shape[1:])

    def _summed(self, score: Score) -> Score:
        """`score` (this rank's sums) added over the ranks in rank order; the single process's as it is."""
        if not self.group.distributed:
            return score
        parts = self.group.gather_objects((score.ce_sum, score.sse))
        sse = {j: sum(part[1][j] for part in parts) for j in score.sse}
        return Score(sum(part[0] for part in parts), sse, local=score)

    def batches(self) -> Iterator[slice]:
        total = self.ids.shape[0]
        for start in range(0, total, self.batch_size):
            yield slice(start, min(start + self.batch_size, total))

    def _norm(self, index: int) -> nn.Module:
        return self.blocks[index].get_submodule(self.arch.ffn_input_norm)

    def _capture_mid(self, store: list[Tensor], layers: range, where: list[slice]) -> list[Any]:
        """Pre-hooks on the FFN norms of `layers` that copy h_mid of the current batch `where[0]` into `store`."""

        def hook_for(index: int):
            def hook(_module: nn.Module, args: tuple) -> None:
                part = store[index][where[0]]
                part.copy_(args[0].detach().reshape(part.shape))

            return hook

        return [self._norm(j).register_forward_pre_hook(hook_for(j)) for j in layers]

    def _check(self, value: float, what: str) -> None:
        if not torch.isfinite(torch.tensor(value)):
            raise LowbitError(f"InvarExplore's {what} became NaN/Inf; the model overflowed: load it in float32")

    @torch.no_grad()
    def head_ce(self, hidden: Tensor, part: slice) -> float:
        """Σ next-token CE of a batch of last-block outputs, in chunks of at most `ce_chunk` tokens (fp32)."""
        started = time.perf_counter()
        x = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = self.ids[part, 1:].reshape(-1).to(x.device)
        total = 0.0
        for start in range(0, x.shape[0], self.ce_chunk):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.head_bf16):
                logits = self.head(x[start : start + self.ce_chunk]).float()
            total += float(F.cross_entropy(logits, y[start : start + self.ce_chunk], reduction="sum"))
        self.timings["head"] += time.perf_counter() - started
        return total

    @torch.no_grad()
    def record_teacher(self) -> None:
        """Run the float model once and keep the monitored layers' outputs H₀ (on CPU)."""
        wanted = set(self.monitored)
        self.targets = {j: torch.empty_like(self.inputs) for j in self.monitored}
        for part in self.batches():
            hidden = self.inputs[part].to(self.device)
            for j in range(max(wanted, default=-1) + 1):
                hidden = call_block(self.blocks[j], hidden, self.kwargs[j])
                if j in wanted:
                    self.targets[j][part] = hidden.to("cpu", torch.float32)

    @torch.no_grad()
    def full(self) -> Score:
        """Block-wise pass of the student in the model from the cached block-0 inputs; refreshes every cache."""
        sse = dict.fromkeys(self.monitored, 0.0)
        ce_sum = 0.0
        where: list[slice] = [slice(0)]
        handles = self._capture_mid(self.mid, range(len(self.mid)), where)
        try:
            for part in self.batches():
                where[0] = part
                hidden = self.inputs[part].to(self.device)
                for j, block in enumerate(self.blocks):
                    hidden = call_block(block, hidden, self.kwargs[j])
                    if j in sse:
                        sse[j] += squared_error(hidden, self.targets[j][part])
                ce_sum += self.head_ce(hidden, part)
        finally:
            for handle in handles:
                handle.remove()
        self.current, self.fresh = self._summed(Score(ce_sum, sse)), self.streams
        self._check(self.current.ce_sum, "cross-entropy")
        return self.current

    @torch.no_grad()
    def incremental(self, layer: int) -> Score:
        """Score the student whose layer `layer` FFN (already in the model) changed, from the cached streams.

        New streams of layers > `layer` go to the spare buffers; `commit` swaps them in.
        """
        if not self.fresh or self.current is None:
            raise RuntimeError("incremental evaluation needs the caches of a full pass of the current student")
        mine = self.current.local or self.current  # this rank's errors of the layers before `layer`
        sse = {j: (value if j < layer else 0.0) for j, value in mine.sse.items()}
        ce_sum = 0.0
        block, norm = self.blocks[layer], self._norm(layer)
        where: list[slice] = [slice(0)]
        handles = self._capture_mid(self.spare, range(layer + 1, self.depth), where)
        try:
            for part in self.batches():
                where[0] = part
                started = time.perf_counter()
                mid = self.mid[layer][part].to(self.device)
                hidden = mid + ffn_output(self.arch, block, norm(mid))
                self.timings["ffn"] += time.perf_counter() - started
                if layer in sse:
                    sse[layer] += squared_error(hidden, self.targets[layer][part])
                started = time.perf_counter()
                for j in range(layer + 1, self.depth):
                    hidden = call_block(self.blocks[j], hidden, self.kwargs[j])
                    if j in sse:
                        sse[j] += squared_error(hidden, self.targets[j][part])
                self.timings["blocks"] += time.perf_counter() - started
                ce_sum += self.head_ce(hidden, part)
        finally:
            for handle in handles:
                handle.remove()
        score = self._summed(Score(ce_sum, sse))
        self._check(score.ce_sum, "cross-entropy")
        return score

    @torch.no_grad()
    def naive(self) -> Score:
        """The reference's evaluation: a full forward of the student (all logits), hooks on the monitored layers."""
        sse = dict.fromkeys(self.monitored, 0.0)
        ce_sum = 0.0
        where: list[slice] = [slice(0)]

        def hook_for(index: int):
            def hook(_module: nn.Module, _args: Any, out: Any) -> None:
                hidden = out[0] if isinstance(out, tuple) else out
                sse[index] += squared_error(hidden, self.targets[index][where[0]])

            return hook

        handles = [self.blocks[j].register_forward_hook(hook_for(j)) for j in self.monitored]
        started = time.perf_counter()
        try:
            for part in self.batches():
                where[0] = part
                ids = self.ids[part].to(self.device)
                logits = self.model(input_ids=ids, use_cache=False).logits.float()
                ce_sum += float(
                    F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                    )
                )
        finally:
            for handle in handles:
                handle.remove()
        self.timings["forward"] += time.perf_counter() - started
        score = self._summed(Score(ce_sum, sse))
        self._check(score.ce_sum, "cross-entropy")
        return score

    def commit(self, layer: int, score: Score, incremental: bool) -> None:
        """Make `score` (of the student now in the model) the current one; keep the new streams of an incremental
        evaluation, or mark the streams stale after a naive one."""
        if incremental:
            for j in range(layer + 1, self.depth):
                self.mid[j], self.spare[j] = self.spare[j], self.mid[j]
        else:
            self.fresh = False
        self.current = score
