"""The stage contract: every method is a transform or a quantizer, working per block or on the whole model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.arch import ArchSpec
from lowbit.distributed.group import Group
from lowbit.engine.context import BlockContext
from lowbit.scheme import QuantScheme


@dataclass(frozen=True)
class NoOptions:
    """Options of a stage that has none."""


class Stage:
    """A method. Subclasses set the class attributes and implement `process_block` or `process_model`.

    `Options` is a frozen dataclass whose fields (with defaults and a `help` metadata string) are the stage's
    options: the CLI (`--opt NAME.FIELD=VALUE`), recipe files and the Python API all build it through
    `lowbit.config`, so they cannot drift apart.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "transform" | "quantizer"
    scope: ClassVar[str]  # "block" | "model"
    needs_data: ClassVar[bool]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # Whether the stage is correct for weight-activation schemes (act_bits < 16): it quantizes weights that are
    # meant to see quantized activations (the engine chains W-A block outputs; a training stage wraps its student
    # forwards in `ctx.act_quant()`). build_config refuses a W-A scheme with any stage that leaves it False.
    supports_act_quant: ClassVar[bool] = False
    # Whether the stage is correct on sparse mixture-of-experts blocks (ArchSpec.experts): per-expert linears that
    # see only the tokens routed to them (possibly none), a float router between the FFN norm and the experts. A
    # stage that leaves it False is refused on such families by `refuses`, with `experts_reason` as the why.
    supports_experts: ClassVar[bool] = False
    experts_reason: ClassVar[str] = "not validated on mixture-of-experts blocks (per-expert linears, float router)"
    # Whether the stage is correct in a data-parallel run (lowbit/distributed): its block context holds one rank's
    # slice of the samples and it reduces what it sums over samples through `ctx.group`, in rank order. A stage
    # that needs data and leaves it False is refused when there are several ranks (one that needs none is fine).
    data_parallel: ClassVar[bool] = False
    # Whether the stage quantizes each linear with `scheme_for(...)`, so a GGUF mix (one type per linear, resolved
    # before tuning: export/gguf/mixes.py) reaches it; build_config refuses a mix with any stage that leaves it False.
    supports_scheme_mix: ClassVar[bool] = False

    def __init__(self, options: Any, scheme: QuantScheme) -> None:
        self.options = options
        self.scheme = scheme
        self.linear_schemes: dict[str, QuantScheme] = {}  # full linear name -> its own scheme (a GGUF mix)

    def scheme_for(self, block_name: str, name: str) -> QuantScheme:
        """The scheme linear `name` of block `block_name` is quantized with: its own under a mix, else the run's."""
        return self.linear_schemes.get(f"{block_name}.{name}", self.scheme)

    @classmethod
    def validate(cls, options: Any, scheme: QuantScheme) -> None:
        """Check option values against the scheme before any model is loaded; raise LowbitError naming the fix."""

    @classmethod
    def check_run(cls, options: Any, *, nsamples: int, seqlen: int, depth: int) -> None:
        """Check option values against the run's calibration size and the model's depth (number of blocks), before
        any calibration is loaded or any forward runs; raise LowbitError naming the fix."""

    @classmethod
    def refuses(cls, arch: ArchSpec) -> str | None:
        """Why this stage cannot run on a model family (None: it can). The support matrix (`lowbit archs`) and the
        pipeline both ask this, so what is printed is what is enforced. An override should start from this one."""
        if arch.experts is not None and not cls.supports_experts:
            return f"{cls.experts_reason} (`lowbit archs` lists the stages that run on {arch.family})"
        return None

    def artifacts(self) -> dict[str, torch.Tensor]:
        """Tensors worth keeping after the run (e.g. AWQ's scales and clips), saved next to every export."""
        return {}


class BlockStage(Stage):
    """A stage trained or searched one decoder block at a time on cached block inputs."""

    scope: ClassVar[str] = "block"
    # False when the stage reads only `ctx.inputs`: with the quantized chain the engine then skips the float
    # chain (`fp_inputs` and `targets` are None), one block forward per block saved. A stage whose need depends
    # on its options sets it per instance.
    uses_float_chain: bool = True

    def preferred_quantized_input(self) -> bool | None:
        """The input chain this stage wants for the next block (True: quantized, False: float); None = engine's."""
        return None

    def replay_autocast(self, device: torch.device) -> str:
        """The precision this stage wants the engine's replays of the block in (float targets, quantized chain):
        "off" (fp32) unless it tunes in reduced precision against them and that was measured to hold quality."""
        return "off"

    def observe_targets(self, ctx: BlockContext) -> contextlib.AbstractContextManager:
        """A context around the engine's float-target forward of the block (the float chain, weights not yet
        touched by any stage): a stage that needs the block's float activations records them there instead of
        running the block once more."""
        return contextlib.nullcontext()

    def process_block(self, ctx: BlockContext) -> None:
        """Transform the block's float weights, or (quantizer) fill `ctx.quantized` for every linear."""
        raise NotImplementedError


@dataclass
class ModelContext:
    """What a model-scope stage sees: the whole model and the calibration token windows."""

    model: nn.Module
    arch: ArchSpec
    scheme: QuantScheme
    calibration: torch.Tensor | None
    device: torch.device
    seed: int
    metrics: dict[str, Any] = field(default_factory=dict)
    # where the stage may keep mid-stage checkpoints (a rerun with --resume finds them there); None: no checkpoints
    work_dir: Path | None = None
    # the model's tokenizer, for stages that read evaluation text (InvarExplore's test curve); None when not known
    tokenizer: Any = None
    # the ranks of a data-parallel run: `calibration` is this rank's slice; a data-parallel model stage reduces what
    # it sums over windows through it (default: the single process)
    group: Group = field(default_factory=Group)


class ModelStage(Stage):
    """A stage that needs the whole model's loss (TEQ with cross-entropy, InvarExplore)."""

    scope: ClassVar[str] = "model"

    def process_model(self, ctx: ModelContext) -> None:
        """Transform the float model in place (folded, so the architecture is unchanged)."""
        raise NotImplementedError
