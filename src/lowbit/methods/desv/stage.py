"""LSI and DESV ("Compensate Quantization Errors+", arXiv 2407.15508; see docs/methods.md), on top of OmniQuant.

One quantizer stage, `desv`, with OmniQuant underneath: per block, OmniQuant's LET and LWC are warm-started (from a
saved OmniQuant run with `--opt desv.warm_start=DIR`, else trained on this block first, in the same block loop),
then a banded increment U B Vh of each linear's thin SVD is trained *together with* LET and LWC: AdamW with three
groups (band 1.5e-4, LET/LWC at OmniQuant's rates, weight decay 0), OmniQuant's epochs and aug_loss for the
setting. LSI is the same stage with n = 0. The final weights fold into ordinary codes/scales/zeros: U, Vh and B
are discarded. All of OmniQuant's options apply (`--opt desv.epochs=...`, `desv.let=...`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.engine import BlockContext
from lowbit.errors import LowbitError
from lowbit.methods.desv.band import BandedIncrement
from lowbit.methods.omniquant.block import OmniQuantBlock
from lowbit.methods.omniquant.stage import CPU_OPTIONS, OmniQuant, OmniQuantOptions, Resolved
from lowbit.presets import RecipePreset
from lowbit.scheme import QuantScheme

DESV_LR = 1.5e-4


@dataclass(frozen=True)
class DESVOptions(OmniQuantOptions):
    """DESV's own options on top of OmniQuant's (which keep their meaning: epochs, let, lwc, aug_loss, ...)."""

    n: int = field(default=100, metadata={"help": "diagonals on each side of the main one (0 = LSI)"})
    lr: float = field(default=DESV_LR, metadata={"help": "AdamW learning rate of the band"})
    band_inclusive: bool = field(default=True, metadata={"help": "|i-j| <= n (2n+1 diagonals); false: 2n-1 (Eq. 8)"})
    single_lr: bool = field(default=False, metadata={"help": "train LET and LWC at the band's lr too"})
    desv_only: bool = field(
        default=False, metadata={"help": "only the band, on plain min/max RTN from the float weights (Table 7)"}
    )
    omniquant_epochs: int | None = field(
        default=None, metadata={"help": "OmniQuant epochs before DESV when not warm-started; none = desv epochs"}
    )


class _Trainable:
    """OmniQuant's block with the band as a third parameter group (the trainer's `Trainable`)."""

    def __init__(self, omni: OmniQuantBlock, bands: dict[str, BandedIncrement], lr: float, single_lr: bool) -> None:
        self.omni, self.bands, self.lr, self.single_lr = omni, bands, lr, single_lr
        omni.delta = lambda: {name: band.delta() for name, band in bands.items()}

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [band.p for band in self.bands.values()], "lr": self.lr, "name": "desv"}]
        for group in self.omni.parameter_groups():
            groups.append({**group, "lr": self.lr} if self.single_lr else group)
        return groups

    def block_params(self) -> dict[str, torch.Tensor]:
        return self.omni.block_params()

    def after_step(self) -> None:
        self.omni.after_step()
        for band in self.bands.values():
            band.apply_mask()


class DESV(OmniQuant):
    """DESV / LSI block quantizer: OmniQuant's LET + LWC plus a banded singular-value increment per linear."""

    name: ClassVar[str] = "desv"
    summary: ClassVar[str] = "OmniQuant + learnable banded singular-value increments (DESV; n=0: LSI)"
    Options: ClassVar[type] = DESVOptions
    supports_scheme_mix: ClassVar[bool] = False  # its band increments are not validated under per-linear schemes

    @classmethod
    def validate(cls, options: DESVOptions, scheme: QuantScheme) -> None:
        if options.n < 0:
            raise LowbitError(f"desv.n must be >= 0, got {options.n}")
        if options.lr <= 0:
            raise LowbitError(f"desv.lr must be > 0, got {options.lr}")
        if options.omniquant_epochs is not None and options.omniquant_epochs < 0:
            raise LowbitError(f"desv.omniquant_epochs must be >= 0, got {options.omniquant_epochs}")
        super().validate(options, scheme)

    def resolve(self, ctx: BlockContext) -> Resolved:
        resolved = super().resolve(ctx)
        if not self.options.desv_only:
            return resolved
        block = dataclasses.replace(resolved.block, lwc=False, let=False, shift=False)
        return dataclasses.replace(resolved, block=block)

    def process_block(self, ctx: BlockContext) -> None:
        self.require_data(ctx)
        started = time.perf_counter()
        opts = self.options
        resolved = self.resolve(ctx)
        omni = self.make_block(ctx, resolved)
        metrics: dict[str, Any] = {"recipe": resolved.to_metrics(), "n": opts.n, "desv_only": opts.desv_only}
        warm = None if opts.desv_only else self.warm_state(ctx)
        if warm is not None:
            omni.load_state_dict(warm)
            metrics["warm_start"] = "saved"
        elif not opts.desv_only:
            epochs = resolved.epochs if opts.omniquant_epochs is None else opts.omniquant_epochs
            metrics["omniquant"] = self.train(ctx, omni, resolved, epochs, "omniquant")
            metrics["warm_start"] = "same run"
        svd_started = time.perf_counter()
        bands = {
            name: BandedIncrement.from_weight(omni.base[f"{name}.weight"], opts.n, opts.band_inclusive)
            for name in omni.linears
        }
        metrics["svd_seconds"] = round(time.perf_counter() - svd_started, 3)
        metrics["live_parameters"] = sum(band.live_parameters() for band in bands.values())
        trainable = _Trainable(omni, bands, opts.lr, opts.single_lr)
        metrics["desv"] = self.train(ctx, trainable, resolved, resolved.epochs, "desv")
        metrics["delta_seconds"] = round(sum(band.seconds for band in bands.values()), 3)
        metrics["delta_ms_per_step"] = round(
            1000 * metrics["delta_seconds"] / max(1, next(iter(bands.values())).calls), 2
        )
        metrics["svd_memory_mb"] = round(
            sum((band.u.numel() + band.vh.numel()) * 4 for band in bands.values()) / 2**20, 2
        )
        self.emit(ctx, omni)  # folds W0 + U B Vh through LET and LWC; U, Vh, P are dropped with `bands`
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        ctx.metrics["desv"] = metrics


def _preset(name: str, options: dict, nsamples: int, seqlen: int, summary: str) -> RecipePreset:
    return RecipePreset(name, "desv", options, nsamples, seqlen, summary)


RECIPES: dict[str, RecipePreset] = {
    preset.name: preset
    for preset in (
        _preset("lsi", {"n": 0}, None, None, "LSI: DESV with n = 0 (a diagonal singular-value increment)"),
        _preset("desv-only", {"desv_only": True}, None, None, "DESV without LET/LWC, on min/max RTN (Table 7)"),
        _preset("desv-cpu", CPU_OPTIONS, 16, 256, "DESV on omniquant-cpu's settings (2 epochs, 16 x 256, ...)"),
    )
}
