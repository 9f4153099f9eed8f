"""TEQ: trainable equivalent per-channel scales, trained with fake quantization and folded (docs/methods.md, TEQ).

Paper-faithful mode (`loss=ce`, model scope): whole-model causal-LM cross-entropy on calibration windows, Adam
(lr 1e-3, betas 0.9/0.9), batch 1, linear schedule with 5% warm-up, 1000 steps; both initialisations trained and
the one with the lower calibration loss kept (`init=best_of_both`). `loss=mse` is a cheaper block-wise variant on
the engine (block output MSE, SignRound's data flow) and is NOT the paper's method: it is labelled
`teq-blockwise` in the run record.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec
from lowbit.engine import BlockContext, BlockStage, ModelContext, ModelStage, call_block
from lowbit.engine.block_train import backward_over_ranks, share_mse
from lowbit.engine.precision import TuneAutocast, autocast, resolve_autocast
from lowbit.errors import LowbitError
from lowbit.methods.common.frozen import frozen
from lowbit.methods.teq.scales import ScaleSet, fold_scale_set, make_scale_set, unwrap_block, wrap_block
from lowbit.methods.teq.train import (
    CheckpointedBlocks,
    TrainingCheckpoint,
    linear_warmup_lr,
    ranked_calibration_loss,
    sample_index,
    share_state,
)
from lowbit.record import loss_trace
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)

INITS = ("ones", "inv_sqrt_wmax")


@dataclass(frozen=True)
class TEQOptions:
    steps: int | None = field(
        default=None, metadata={"help": "training steps (None: 1000 for ce, 200 per block for mse)"}
    )
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (betas 0.9, 0.9)"})
    warmup: float = field(default=0.05, metadata={"help": "fraction of steps with linear warm-up from 0"})
    batch_size: int | None = field(default=None, metadata={"help": "samples per step (None: 1 for ce, 4 for mse)"})
    seqlen: int | None = field(default=None, metadata={"help": "crop calibration windows to this many tokens"})
    init: Literal["ones", "inv_sqrt_wmax", "best_of_both"] = field(
        default="best_of_both", metadata={"help": "initial scales; best_of_both trains both, keeps the lower loss"}
    )
    loss: Literal["ce", "mse"] = field(
        default="ce", metadata={"help": "ce: whole-model cross-entropy (paper); mse: block-wise (not the paper)"}
    )
    groups: Literal["all", "paper"] = field(
        default="all", metadata={"help": "all exact groups, or only the paper's Table-9 groups"}
    )
    eval_samples: int = field(default=8, metadata={"help": "calibration windows that score an initialisation"})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "recompute block activations in backward (None: on above 1B params)"}
    )
    checkpoint_dir: str | None = field(default=None, metadata={"help": "save training state here; a rerun resumes"})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between training checkpoints"})
    autocast: TuneAutocast = field(
        default="auto",
        metadata={"help": "training forward/backward in bf16 autocast or off (fp32); auto = engine.dtype, else fp32"},
    )


class TEQ(BlockStage, ModelStage):
    """TEQ as a transform stage; its scope follows `loss` (ce: model scope, mse: block scope)."""

    name: ClassVar[str] = "teq"
    kind: ClassVar[str] = "transform"
    scope: ClassVar[str] = "model"
    needs_data: ClassVar[bool] = True
    summary: ClassVar[str] = "trainable equivalent per-channel scales, folded (loss=ce: paper; mse: block-wise)"
    experts_reason: ClassVar[str] = (
        "its FFN scales fold into the norm that also feeds the float mixture-of-experts router, and per-expert "
        "scale groups are not implemented"
    )
    Options: ClassVar[type] = TEQOptions
    supports_scheme_mix: ClassVar[bool] = True  # each TEQLinear trains against its linear's scheme (_schemes)
    # global rows, each rank's share of the loss, gradients summed over the ranks before each step, in both scopes
    data_parallel: ClassVar[bool] = True

    def __init__(self, options: TEQOptions, scheme: QuantScheme) -> None:
        super().__init__(options, scheme)
        _validate(options)
        self.scope = "block" if options.loss == "mse" else "model"
        self.steps = options.steps if options.steps is not None else (200 if options.loss == "mse" else 1000)
        self.batch_size = options.batch_size if options.batch_size is not None else (4 if options.loss == "mse" else 1)
        self.inits = INITS if options.init == "best_of_both" else (options.init,)

    def _schemes(self, arch: ArchSpec, index: int) -> dict[str, QuantScheme]:
        """Block `index`'s linears -> the scheme each trains against (its own under a per-linear plan)."""
        return {name: self.scheme_for(arch.block_name(index), name) for name in arch.linear_names}

    # --- paper mode: whole-model cross-entropy --------------------------------------------------------

    def process_model(self, ctx: ModelContext) -> None:
        windows = self._windows(ctx.calibration)
        if ctx.group.distributed:  # every rank's windows in order (token ids: small); each trains on its own
            windows = torch.cat(ctx.group.gather_objects(windows))
        blocks = ctx.arch.blocks(ctx.model)
        outcomes = {}
        with frozen(ctx.model):  # entered before wrapping: gradients flow only into the scales
            for init in self.inits:
                sets = [make_scale_set(ctx.arch, block, self.options.groups, init) for block in blocks]
                for index, scale_set in enumerate(sets):
                    wrap_block(ctx.arch, scale_set, self.scheme, schemes=self._schemes(ctx.arch, index))
                try:
                    outcomes[init] = self._train_ce(ctx, sets, windows, init)
                finally:
                    for block in blocks:
                        unwrap_block(ctx.arch, block)
        best = min(outcomes, key=lambda init: outcomes[init]["final_loss"])
        for scale_set in outcomes[best].pop("sets"):
            fold_scale_set(scale_set)
        for outcome in outcomes.values():
            outcome.pop("sets", None)
        ctx.metrics.update({"method": "teq", "chosen_init": best, "inits": outcomes, "steps": self.steps})
        log.info("TEQ kept init '%s' (calibration CE %.4f)", best, outcomes[best]["final_loss"])

    def _train_ce(self, ctx: ModelContext, sets: list[ScaleSet], windows: torch.Tensor, init: str) -> dict[str, Any]:
        """Adam on every block's scales against the model's cross-entropy on the calibration windows.

        Data-parallel: `windows` are every rank's; a step's rows are drawn over all of them and each rank runs the
        rows of its own contiguous slice (`group.shard`), its share of the batch's loss and the scales' gradients
        summed over the ranks before the step. At the default batch of 1 one rank holds the row and the others add
        zeros, so the step is one process's exactly. Rank 0 alone checkpoints; a resumed state reaches every rank."""
        group = ctx.group
        params = [p for scale_set in sets for p in scale_set.parameters()]
        if not params:
            raise LowbitError("TEQ found no absorbable group in this model; use another recipe")
        optimizer = torch.optim.Adam(params, lr=self.options.lr, betas=(0.9, 0.9), weight_decay=0.0)
        mine = group.shard(windows.shape[0])
        scored = range(min(self.options.eval_samples, windows.shape[0]))
        initial = ranked_calibration_loss(ctx.model, windows, scored, mine, ctx.device, group)
        directory = self.options.checkpoint_dir or ctx.work_dir  # the run's work dir: resumable with --resume
        checkpoint = TrainingCheckpoint.at(directory, f"teq-ce-{init}", self._fingerprint(windows))
        checkpoint = checkpoint if group.is_main else None  # rank 0 writes; its state reaches the others below
        start = checkpoint.restore(sets, optimizer) if checkpoint else 0
        start = share_state(group, start, params, optimizer)
        use_checkpointing = self._use_gradient_checkpointing(ctx.model)
        precision = resolve_autocast(self.options.autocast, ctx.device)
        trace = []
        quiet = None if group.is_main else True
        with CheckpointedBlocks(ctx.arch.blocks(ctx.model), enabled=use_checkpointing):
            for step in tqdm(
                range(start, self.steps), desc=f"teq ({init})", unit="step", initial=start, total=self.steps,
                disable=quiet,
            ):  # fmt: skip
                lr = linear_warmup_lr(step, self.steps, self.options.lr, self.options.warmup)
                for group_lr in optimizer.param_groups:
                    group_lr["lr"] = lr
                rows = [
                    sample_index(step * self.batch_size + i, windows.shape[0], ctx.seed) for i in range(self.batch_size)
                ]
                here = [row for row in rows if mine.start <= row < mine.stop]
                loss = None
                if here:
                    batch = windows[here].to(ctx.device)
                    with autocast(precision, ctx.device):  # transformers computes the loss on fp32 logits
                        loss = ctx.model(input_ids=batch, labels=batch, use_cache=False).loss.float()
                    if group.distributed:  # this rank's share of the batch's mean (windows of equal length)
                        loss = loss * (len(here) / len(rows))
                value = backward_over_ranks(group, loss, params)
                _check_finite(value, step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step % 10 == 0 or step == self.steps - 1:
                    trace.append((step, round(value, 5)))
                if checkpoint and ((step + 1) % self.options.checkpoint_every == 0 or step + 1 == self.steps):
                    checkpoint.save(step + 1, sets, optimizer)
        final = ranked_calibration_loss(ctx.model, windows, scored, mine, ctx.device, group)
        values = torch.cat([clamped_values(p) for p in params])
        return {
            "initial_loss": round(initial, 5),
            "final_loss": round(final, 5),
            "loss_trace": trace,
            "scale_min": round(values.min().item(), 4),
            "scale_max": round(values.max().item(), 4),
            "scale_mean": round(values.mean().item(), 4),
            "parameters": sum(p.numel() for p in params),
            "autocast": precision,
            "sets": sets,
        }

    # --- block-wise variant (not the paper) -------------------------------------------------------------

    def process_block(self, ctx: BlockContext) -> None:
        outcomes = {}
        with frozen(ctx.block):  # entered before wrapping, so the scales stay trainable
            for init in self.inits:
                scale_set = make_scale_set(ctx.arch, ctx.block, self.options.groups, init)
                wrap_block(ctx.arch, scale_set, self.scheme, schemes=self._schemes(ctx.arch, ctx.index))
                try:
                    outcomes[init] = (self._train_block(ctx, scale_set), scale_set)
                finally:
                    unwrap_block(ctx.arch, ctx.block)
        best = min(outcomes, key=lambda init: outcomes[init][0]["final_loss"])
        fold_scale_set(outcomes[best][1])
        ctx.metrics["teq"] = {"method": "teq-blockwise", "chosen_init": best, **{k: v[0] for k, v in outcomes.items()}}

    def _train_block(self, ctx: BlockContext, scale_set: ScaleSet) -> dict[str, Any]:
        """Adam on the scales against the block-output MSE. Data-parallel: the rows are drawn in global sample
        indices (every rank draws one process's), each rank's share of a batch's loss and the gradients are summed
        over the ranks before each step (engine/block_train.py), and the scoring losses too, so every rank keeps the
        same initialisation."""
        params = scale_set.parameters()
        if not params:
            return {"initial_loss": 0.0, "final_loss": 0.0, "parameters": 0}
        optimizer = torch.optim.Adam(params, lr=self.options.lr, betas=(0.9, 0.9), weight_decay=0.0)
        kwargs = ctx.device_kwargs()
        group, here = ctx.group, ctx.nsamples
        start, n = group.offset(here)
        per_sample = math.prod(ctx.inputs.shape[1:])
        precision = resolve_autocast(self.options.autocast, ctx.device)

        def loss_on(rows: list[int], mode: str = "off") -> torch.Tensor | None:
            """This rank's share of the fp32 MSE to the fp32 targets on global `rows` (None: it holds none of them);
            `mode` is the forward's precision (the scoring losses stay fp32)."""
            mine = [row - start for row in rows if start <= row < start + here]
            if not mine:
                return None
            with autocast(mode, ctx.device):
                out = call_block(ctx.block, ctx.batch(ctx.inputs, mine), kwargs)
            return share_mse(out, ctx.batch(ctx.targets, mine), len(rows) * per_sample, group)

        def score() -> float:
            with torch.no_grad():
                loss = loss_on(list(range(min(n, self.batch_size))))
            return sum(group.gather_objects(0.0 if loss is None else loss.item()))

        initial = score()
        losses = []  # the report's per-block curve
        for step in range(self.steps):
            lr = linear_warmup_lr(step, self.steps, self.options.lr, self.options.warmup)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            rows = [sample_index(step * self.batch_size + i, n, ctx.seed + ctx.index) for i in range(self.batch_size)]
            value = backward_over_ranks(group, loss_on(rows, precision), params)
            _check_finite(value, step)
            losses.append(value)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        final = score()
        return {
            "initial_loss": initial,
            "final_loss": final,
            "parameters": sum(p.numel() for p in params),
            "loss_trace": loss_trace(losses),
            "autocast": precision,
        }

    # --- helpers ------------------------------------------------------------------------------------------

    def _windows(self, calibration: torch.Tensor | None) -> torch.Tensor:
        if calibration is None:
            raise LowbitError("TEQ needs calibration data; pass --dataset")
        seqlen = self.options.seqlen
        if seqlen is not None:
            if seqlen > calibration.shape[1]:
                raise LowbitError(
                    f"teq.seqlen={seqlen} is longer than the calibration windows ({calibration.shape[1]}); "
                    f"raise --seqlen to {seqlen} or lower teq.seqlen"
                )
            calibration = calibration[:, :seqlen]
        return calibration

    def _fingerprint(self, windows: torch.Tensor) -> dict[str, Any]:
        return {
            "scheme": self.scheme.to_dict(),
            "options": {k: getattr(self.options, k) for k in ("lr", "warmup", "groups", "seqlen")},
            "steps": self.steps,
            "batch_size": self.batch_size,
            "windows": list(windows.shape),
            "windows_sum": int(windows.sum().item()),
        }

    def _use_gradient_checkpointing(self, model: torch.nn.Module) -> bool:
        if self.options.gradient_checkpointing is not None:
            return self.options.gradient_checkpointing
        return sum(p.numel() for p in model.parameters()) > 1_000_000_000


def clamped_values(p: torch.Tensor) -> torch.Tensor:
    return p.detach().clamp(min=1e-5).reshape(-1)


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise LowbitError(f"TEQ loss became NaN/Inf at step {step}; lower --opt teq.lr or check the model")


def _validate(options: TEQOptions) -> None:
    for name in ("steps", "batch_size", "seqlen"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise LowbitError(f"teq.{name} must be at least 1, got {value}")
    if not 0 <= options.warmup < 1:
        raise LowbitError(f"teq.warmup must be in [0, 1), got {options.warmup}")
    if options.lr <= 0:
        raise LowbitError(f"teq.lr must be positive, got {options.lr}")
    if options.checkpoint_every < 1 or options.eval_samples < 1:
        raise LowbitError("teq.checkpoint_every and teq.eval_samples must be at least 1")
