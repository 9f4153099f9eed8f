"""AWQ's options, typed once: the CLI's `--opt awq.NAME=VALUE`, recipe files and the Python API all read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lowbit.engine.precision import TuneAutocast


@dataclass(frozen=True)
class AWQOptions:
    """AWQ's options; defaults follow mit-han-lab/llm-awq (docs/methods.md, AWQ)."""

    n_grid: int = field(default=20, metadata={"help": "scale-search ratios r = i/n_grid, i < n_grid"})
    duo_scaling: bool = field(default=False, metadata={"help": "llm-compressor's s = xbar^r / wbar^(1-r)"})
    clip: bool = field(default=True, metadata={"help": "run the auto-clip search after scaling"})
    clip_grid: int = field(default=20, metadata={"help": "clip candidates t0 * (1 - i/clip_grid)"})
    clip_max_shrink: float = field(default=0.5, metadata={"help": "smallest clip is (1 - max_shrink) * max"})
    clip_tokens: int = field(default=512, metadata={"help": "tokens sub-sampled for the clip search"})
    include_zero: bool = field(
        default=False, metadata={"help": "the search quantizer's include_zero (False = AWQ's raw min/max preset)"}
    )
    linear_loss: Literal["gram", "replay"] = field(
        default="gram",
        metadata={
            "help": "v->o / up->down search loss: gram = tr(E H E^T) with H = X^T X once (exact, no per-point "
            "replay); replay = re-run the linear on every token per grid point (the reference's way)"
        },
    )
    search_inputs: Literal["float", "student"] = field(
        default="student",
        metadata={
            "help": "block inputs of the search: student = the quantized chain the following quantizer sees (as "
            "llm-compressor; benchmarks/results/gptq-awq.md), "
            "float = the float chain (llm-awq's reference way)"
        },
    )
    search_samples: int | None = field(
        default=8,
        metadata={
            "help": "calibration samples (whole sequences) the attention/MLP replay searches use, evenly spaced; "
            "None = all, as llm-awq (8: benchmarks/results/gptq-awq.md)"
        },
    )
    autocast: TuneAutocast = field(
        default="auto",
        metadata={
            "help": "scale-search forwards in bf16 autocast or off (fp32; the targets and the gram loss stay fp32/"
            "fp64); auto = engine.dtype, else fp32"
        },
    )
