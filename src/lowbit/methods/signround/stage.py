"""SignRound (arXiv 2309.05516): per-block SignSGD on rounding offsets V and clipping factors alpha, beta.

Spec: docs/methods.md, SignRound. The block output MSE against the float block's output is minimised one decoder block
at a time; the result is plain codes, scales and zero points (lm_head and embeddings stay float).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from tqdm.auto import tqdm

from lowbit.engine import BlockContext, BlockStage
from lowbit.engine.block_train import block_forward
from lowbit.engine.offload import to_device
from lowbit.engine.precision import TuneAutocast, resolve_autocast
from lowbit.errors import LowbitError
from lowbit.methods.common.energy import column_energy
from lowbit.methods.common.frozen import frozen
from lowbit.methods.imatrix.search import search_factors
from lowbit.methods.signround.tune import (
    TunedLinear,
    TuneResult,
    TuneSettings,
    check_holdout_size,
    split_holdout,
    tune_block,
)
from lowbit.presets import RecipePreset
from lowbit.record import loss_trace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignRoundOptions:
    """SignRound options; defaults follow the paper (200 steps, lr 1/iters = 5e-3, batch 8, asymmetric)."""

    iters: int = field(default=200, metadata={"help": "SignSGD steps per block (0 = plain RTN)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate for V; none = 1/iters (5e-3 at 200)"})
    minmax_lr: float | None = field(
        default=None, metadata={"help": "learning rate for the clipping factors alpha, beta; none = lr"}
    )
    batch_size: int = field(default=8, metadata={"help": "calibration samples per SignSGD step"})
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "samples per forward/backward inside a step (gradient accumulation); none = batch_size"},
    )
    quantized_input: bool | None = field(
        default=None,
        metadata={"help": "student sees the quantized chain (true) or the float chain (false); none = engine setting"},
    )
    target_from: Literal["float_chain", "student_input"] = field(
        default="float_chain",
        metadata={"help": "target: float block on the float chain (reference) or on the student's own input"},
    )
    use_best: bool = field(default=True, metadata={"help": "restore the parameters of the best measured loss"})
    clamp_v: bool = field(default=False, metadata={"help": "clamp V to [-0.5, 0.5] after every step"})
    mask_last_token: bool = field(
        default=False, metadata={"help": "exclude each sample's last position from the loss (reference label mask)"}
    )
    best_select: Literal["minibatch", "holdout"] = field(
        default="minibatch",
        metadata={
            "help": "best iteration by the current minibatch loss (paper) or a held-out subset (experimental: "
            "much worse at W3 on SmolLM2: benchmarks/results/signround.md)"
        },
    )
    holdout: int = field(default=16, metadata={"help": "held-out calibration samples when best_select=holdout"})
    holdout_every: int = field(default=10, metadata={"help": "evaluate the holdout loss every K iterations"})
    early_stop_patience: int = field(
        default=0, metadata={"help": "stop after N iterations without a new best (0 = off; reference dynamic_max_gap)"}
    )
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads while tuning (none = unchanged); 1 is far faster on a busy 2-core CPU"},
    )
    low_bit_lr_boost: bool = field(
        default=False, metadata={"help": "lr = 2/iters when iters >= 1000 and bits <= 3 (reference rule)"}
    )
    autocast: TuneAutocast = field(
        default="auto",
        metadata={
            "help": "block forward/backward in bf16 autocast or off (fp32); auto = engine.dtype, else bf16 where "
            "the hardware computes bf16 natively (AVX512-BF16/AMX CPU, bf16 GPU), fp32 elsewhere"
        },
    )
    init: Literal["minmax", "imatrix"] = field(
        default="minmax",
        metadata={
            "help": "start alpha/beta at 1 (min-max, the paper) or at imatrix's searched ranges (clipping part "
            "only: alpha, beta stay <= 1)"
        },
    )


def _start_from_imatrix(ctx: BlockContext, layers: list[TunedLinear]) -> None:
    """alpha/beta start at the clipping factors imatrix RTN searches (methods/imatrix), capped at 1 as SignSGD keeps
    them; a factor above 1 (a wider range than min-max) starts at 1."""
    if ctx.group.distributed:
        raise LowbitError("signround.init=imatrix does not reduce its importance over ranks yet: run in one process")
    energy = column_energy(ctx)
    with torch.no_grad():
        for layer in layers:
            hi, lo = search_factors(layer.weight, energy[layer.name].to(layer.weight.device), layer.scheme)
            layer.alpha.copy_(hi.clamp(max=1))
            layer.beta.copy_(lo.clamp(max=1))


class SignRound(BlockStage):
    """SignRound block quantizer: SignSGD on V, alpha, beta against the float block's outputs."""

    name: ClassVar[str] = "signround"
    kind: ClassVar[str] = "quantizer"
    needs_data: ClassVar[bool] = True
    summary: ClassVar[str] = "SignSGD-tuned rounding and clipping per block (SignRound / auto-round)"
    data_parallel: ClassVar[bool] = True  # global batches, losses and gradients summed over the ranks (tune.py)
    supports_experts: ClassVar[bool] = True  # an expert no token reaches gets no gradient: it keeps its RTN init
    supports_scheme_mix: ClassVar[bool] = True  # each TunedLinear carries its own scheme
    Options: ClassVar[type] = SignRoundOptions
    # what autocast=auto means where bf16 is native (precision.native_bf16), chosen by measurement: at auto-round's
    # light settings on SmolLM2 W2G128, bf16 tuned 1.69x faster than fp32 with perplexity 62.28 vs 63.22
    # (benchmarks/results/signround.md); `--opt engine.dtype=fp32` turns it off
    autocast_default: ClassVar[str] = "bf16"

    def __init__(self, options: SignRoundOptions, scheme) -> None:
        super().__init__(options, scheme)
        _validate(options)

    def preferred_quantized_input(self) -> bool | None:
        return self.options.quantized_input

    def replay_autocast(self, device: torch.device) -> str:
        # auto-round computes its targets and chain in its AMP dtype too; measured in benchmarks/results/speed-log.md
        # ("Speed (issue 16)": bf16 replays vs fp32 replays); `--opt engine.replay=fp32` keeps them fp32
        return self.settings(device).autocast

    def settings(self, device: torch.device | None = None) -> TuneSettings:
        """Resolve the learning rates (1/iters by default, the reference's low-bit boost on request) and the
        training precision on `device` (default CPU)."""
        opts = self.options
        lr = opts.lr
        if lr is None:
            lr = 1.0 / max(opts.iters, 1)
            if opts.low_bit_lr_boost and opts.iters >= 1000 and self.scheme.bits <= 3:
                lr = 2.0 / opts.iters
        return TuneSettings(
            iters=opts.iters,
            lr=lr,
            minmax_lr=lr if opts.minmax_lr is None else opts.minmax_lr,
            batch_size=opts.batch_size,
            micro_batch_size=opts.micro_batch_size or opts.batch_size,
            use_best=opts.use_best,
            clamp_v=opts.clamp_v,
            mask_last_token=opts.mask_last_token,
            best_select=opts.best_select,
            holdout=opts.holdout,
            holdout_every=opts.holdout_every,
            early_stop_patience=opts.early_stop_patience,
            autocast=resolve_autocast(opts.autocast, device or torch.device("cpu"), default=self.autocast_default),
        )

    @classmethod
    def check_run(cls, options: SignRoundOptions, *, nsamples: int, seqlen: int, depth: int) -> None:
        if options.best_select == "holdout":
            check_holdout_size(nsamples, options.holdout)

    def process_block(self, ctx: BlockContext) -> None:
        linears = ctx.linears()
        layers = [TunedLinear.wrap(name, linear, self.scheme_for(ctx.name, name)) for name, linear in linears.items()]
        if self.options.init == "imatrix":
            _start_from_imatrix(ctx, layers)
        settings = self.settings(ctx.device)
        if settings.iters > 0:
            self._tune(ctx, layers, settings)
        for layer in layers:
            ctx.quantized[layer.name] = layer.record()

    def _tune(self, ctx: BlockContext, layers: list[TunedLinear], settings: TuneSettings) -> None:
        if ctx.inputs is None or ctx.targets is None:
            raise LowbitError("signround needs calibration data; pass --dataset (or 'builtin')")
        started = time.perf_counter()
        targets = ctx.targets
        if self.options.target_from == "student_input":
            targets = ctx.run(ctx.inputs)
        block = ctx.block
        prefix = {layer.name: f"{layer.name}.weight" for layer in layers}
        forward = block_forward(block, prefix, ctx.device_kwargs(), compile=ctx.compile)
        inputs, targets = to_device(ctx.inputs, ctx.device), to_device(targets, ctx.device)  # chains on disk stay
        start, total = ctx.group.offset(ctx.nsamples)  # global sample indices: every rank draws the same batches
        all_indices = torch.arange(total)
        holdout = None
        if settings.best_select == "holdout":
            all_indices, holdout = split_holdout(total, settings.holdout, ctx.generator(salt=1))
        threads = torch.get_num_threads()
        if self.options.num_threads is not None:
            torch.set_num_threads(self.options.num_threads)
        quiet = None if ctx.group.is_main else True  # rank 0 shows the bar
        bar = tqdm(total=settings.iters, desc=f"signround {ctx.name}", unit="it", leave=False, disable=quiet)
        try:
            with frozen(block):  # gradients flow only into V, alpha, beta
                result = tune_block(
                    layers,
                    forward,
                    inputs,
                    targets,
                    all_indices,
                    holdout,
                    settings,
                    ctx.generator(),
                    progress=lambda _t, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3g}")),
                    group=ctx.group,
                    start=start,
                )
        finally:
            bar.close()
            torch.set_num_threads(threads)
        _check_finite(ctx, result)
        ctx.metrics.update(
            {
                "loss_first": _finite_or_none(result.losses[0]) if result.losses else None,
                "loss_last": _finite_or_none(result.losses[-1]) if result.losses else None,
                "best_loss": _finite_or_none(result.best_loss),
                "nonfinite_steps": result.nonfinite_steps,
                "loss_trace": loss_trace(result.losses),  # the report's per-block curve
                "best_iter": result.best_iter,
                "best_select": settings.best_select,
                "autocast": settings.autocast,
                "iters_run": len(result.losses),
                "tune_seconds": round(time.perf_counter() - started, 3),
            }
        )
        log.debug(
            "%s: loss %.4g -> best %.4g at iter %d", ctx.name, result.losses[0], result.best_loss, result.best_iter
        )


def _validate(options: SignRoundOptions) -> None:
    checks = [
        (options.iters >= 0, f"signround.iters must be >= 0, got {options.iters}"),
        (options.batch_size >= 1, f"signround.batch_size must be >= 1, got {options.batch_size}"),
        (options.micro_batch_size is None or options.micro_batch_size >= 1, "signround.micro_batch_size must be >= 1"),
        (options.lr is None or options.lr > 0, f"signround.lr must be > 0, got {options.lr}"),
        (options.minmax_lr is None or options.minmax_lr >= 0, "signround.minmax_lr must be >= 0"),
        (options.num_threads is None or options.num_threads >= 1, "signround.num_threads must be >= 1"),
        (options.holdout_every >= 1, "signround.holdout_every must be >= 1"),
        (options.early_stop_patience >= 0, "signround.early_stop_patience must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise LowbitError(message)


# Named recipes: one flag selects the stage, its option overrides and the calibration size.
RECIPES: dict[str, RecipePreset] = {
    preset.name: preset
    for preset in (
        RecipePreset(
            "signround-paper",
            "signround",
            {"iters": 200, "lr": 5e-3, "batch_size": 8},
            512,
            2048,
            "paper defaults: 200 steps, lr 5e-3, batch 8, 512 x 2048 tokens",
        ),
        RecipePreset(
            "signround-fast", "signround", {"iters": 200}, 128, 2048, "auto-round default: 200 steps, 128 x 2048 tokens"
        ),
        RecipePreset(
            "signround-best",
            "signround",
            {"iters": 1000, "low_bit_lr_boost": True},
            512,
            2048,
            "auto-round-best: 1000 steps, 512 x 2048, lr 2/iters at <= 3 bits",
        ),
        RecipePreset(
            "signround-light",
            "signround",
            {"iters": 50, "lr": 5e-3},
            128,
            2048,
            "auto-round-light: 50 steps, lr 5e-3, 128 x 2048",
        ),
        RecipePreset(
            "signround-cpu",
            "signround",
            {"iters": 50, "batch_size": 8},
            64,
            512,
            "CPU-sized: 50 steps, batch 8, 64 x 512 tokens",
        ),
    )
}


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Inf: a non-finite loss is recorded as null (and counted in `nonfinite_steps`)."""
    return value if math.isfinite(value) else None


def _check_finite(ctx: BlockContext, result: TuneResult) -> None:
    """Every loss non-finite: the block cannot be tuned, say so instead of exporting RTN silently."""
    if result.losses and result.nonfinite_steps == len(result.losses):
        raise LowbitError(
            f"SignRound's loss was NaN/Inf at every step of block {ctx.index}: the quantized block overflows; check "
            "the model's weights for extreme values, lower --opt signround.lr, or use --recipe gptq for this model"
        )
    if result.nonfinite_steps:
        log.warning("%s: %d of %d SignRound steps had a NaN/Inf loss (skipped)", ctx.name, result.nonfinite_steps,
                    len(result.losses))  # fmt: skip
