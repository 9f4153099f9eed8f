"""InvarExplore's options and their checks, apart from the stage so the search can import them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class InvarExploreOptions:
    """InvarExplore's options; defaults follow the reference README (swap 10%, σ_s 1e-2, σ_rot 1e-5, α 0.1)."""

    max_steps: int = field(default=10_000, metadata={"help": "total proposals, including those of a resumed record"})
    max_seconds: float | None = field(default=None, metadata={"help": "also stop after this many seconds of search"})
    patience: int | None = field(default=None, metadata={"help": "also stop after this many rejections in a row"})
    permute: bool = field(default=True, metadata={"help": "propose neuron permutations"})
    scale: bool = field(default=True, metadata={"help": "propose per-neuron scales (up rows / s, down columns * s)"})
    rotate: bool = field(default=True, metadata={"help": "propose 2x2 rotations of neuron pairs (near-invariant)"})
    rotation_target: Literal["up_down", "gate_up_down"] = field(
        default="up_down", metadata={"help": "SwiGLU: rotate up and down only, or gate too"}
    )
    swap_frac: float = field(default=0.1, metadata={"help": "fraction of a layer's neurons one proposal touches"})
    sigma_scale: float = field(default=1e-2, metadata={"help": "std of the additive scale random walk"})
    sigma_rot: float = field(default=1e-5, metadata={"help": "std of the angle random walk (radians)"})
    alpha: float = field(default=0.1, metadata={"help": "weight of the monitored-layer MSE term (CE weighs 1)"})
    monitored_layers: int = field(default=10, metadata={"help": "dilated subset of layers whose outputs are matched"})
    positive_scale_guard: bool = field(
        default=True, metadata={"help": "reject proposals with a scale <= min_scale (off = the reference)"}
    )
    min_scale: float = field(default=0.05, metadata={"help": "smallest scale the guard lets through"})
    samples: int = field(default=32, metadata={"help": "calibration windows in the search batch (paper: 32 x 512)"})
    seqlen: int | None = field(default=None, metadata={"help": "crop the search windows to this many tokens"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass inside one evaluation"})
    ce_chunk: int = field(default=1024, metadata={"help": "tokens per lm_head chunk of the cross-entropy"})
    head_bf16: bool = field(
        default=False, metadata={"help": "incremental path: lm_head in bf16 (faster, not exact; off = fp32)"}
    )
    evaluation: Literal["incremental", "naive"] = field(
        default="incremental", metadata={"help": "incremental (fast) or naive full re-evaluation (reference)"}
    )
    proxy: Literal["rtn"] = field(
        default="rtn", metadata={"help": "in-loop quantizer: RTN of the scheme (exact before rtn, a proxy otherwise)"}
    )
    heldout_eval: str = field(
        default="", metadata={"help": "test curve: held-out perplexity datasets, comma-separated (builtin,licenses)"}
    )
    heldout_every: int = field(default=100, metadata={"help": "steps between test-curve points (and step 0, the end)"})
    heldout_windows: int = field(default=8, metadata={"help": "test curve: windows per dataset (the first K)"})
    heldout_seqlen: int = field(default=512, metadata={"help": "test curve: tokens per window"})
    holdout: int = field(
        default=0, metadata={"help": "calibration windows after the search batch scored for selection (0 = off)"}
    )
    holdout_every: int = field(default=50, metadata={"help": "steps between holdout checks (best state is kept)"})
    holdout_patience: int | None = field(
        default=None, metadata={"help": "also stop after this many holdout checks without improvement"}
    )
    log_every: int = field(default=100, metadata={"help": "steps between log rows in the run record"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    resume: str | None = field(default=None, metadata={"help": "start from a saved record (file or export dir)"})
    checkpoint: str | None = field(default=None, metadata={"help": "write the record here every log_every steps"})

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def heldout_datasets(self) -> list[str]:
        """The test-curve datasets, in order (empty: no test curve)."""
        return [name.strip() for name in self.heldout_eval.split(",") if name.strip()]


def _validate(o: InvarExploreOptions) -> None:
    """One clear message per bad value, raised when the configuration is built (before any model is loaded)."""
    if o.max_steps < 1:
        raise LowbitError(
            f"invarexplore.max_steps={o.max_steps} gives the search no budget: set a positive step budget "
            "(e.g. --opt invarexplore.max_steps=1000), or drop invarexplore from the recipe"
        )
    if o.max_seconds is not None and o.max_seconds <= 0:
        raise LowbitError(f"invarexplore.max_seconds must be positive (or none), got {o.max_seconds}")
    for name in ("patience", "seqlen"):
        value = getattr(o, name)
        if value is not None and value < 1:
            raise LowbitError(f"invarexplore.{name} must be at least 1 (or none), got {value}")
    for name in ("samples", "batch_size", "ce_chunk", "log_every", "heldout_every", "heldout_windows", "holdout_every"):
        if getattr(o, name) < 1:
            raise LowbitError(f"invarexplore.{name} must be at least 1, got {getattr(o, name)}")
    if o.monitored_layers < 0:
        raise LowbitError(f"invarexplore.monitored_layers must be 0 or more, got {o.monitored_layers}")
    if not 0 < o.swap_frac <= 1:
        raise LowbitError(f"invarexplore.swap_frac must be in (0, 1], got {o.swap_frac}")
    if o.sigma_scale < 0 or o.sigma_rot < 0 or o.alpha < 0 or o.min_scale < 0:
        raise LowbitError("invarexplore.sigma_scale, sigma_rot, alpha and min_scale must not be negative")
    if not (o.permute or o.scale or o.rotate):
        raise LowbitError("invarexplore has nothing to search: enable at least one of permute, scale, rotate")
    _validate_heldout(o)


def _validate_heldout(o: InvarExploreOptions) -> None:
    """The test curve's datasets and the holdout selection's sizes."""
    names = o.heldout_datasets
    if len(set(names)) != len(names) or (o.heldout_eval.strip() and not names):
        raise LowbitError(
            f"invarexplore.heldout_eval='{o.heldout_eval}': give distinct dataset names separated by commas, "
            "e.g. heldout_eval=builtin,licenses (empty = no test curve)"
        )
    if names:
        from lowbit.data import resolve_name  # deferred: the data module is not needed to build options otherwise

        for name in names:
            resolve_name(name, role="eval")
    if o.heldout_seqlen < 2:
        raise LowbitError(f"invarexplore.heldout_seqlen must be at least 2 tokens, got {o.heldout_seqlen}")
    if o.holdout < 0:
        raise LowbitError(f"invarexplore.holdout must be 0 (off) or a number of windows, got {o.holdout}")
    if o.holdout_patience is not None and o.holdout_patience < 1:
        raise LowbitError(f"invarexplore.holdout_patience must be at least 1 (or none), got {o.holdout_patience}")
    if o.holdout_patience is not None and o.holdout == 0:
        raise LowbitError(
            "invarexplore.holdout_patience needs holdout windows to watch: set invarexplore.holdout=K (e.g. 8) "
            "or drop holdout_patience"
        )
