"""OmniQuant (OpenGVLab/OmniQuant; see docs/methods.md): LWC and LET trained jointly, block by block, with AdamW.

Per block: activation statistics of the float block initialise LET's scales (and shifts), LWC starts at
u = l = 4, then `epochs` passes over the calibration samples in order (batch 1 by default) minimise the MSE between
the quantized block on the quantized chain and the float block's output (plus the float block on the quantized
chain with `aug_loss`). LET is folded into norms and weights, LWC's codes/scales/zeros are emitted. Activation
quantization (W-A schemes) is on during training and for the chained inputs. The trained LET/LWC tensors of every
block are saved with the export (`omniquant.<block>.let.*`, `omniquant.<block>.lwc.*`): DESV warm-starts from them
and `--opt omniquant.warm_start=DIR` reloads them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec
from lowbit.engine import BlockContext, BlockStage
from lowbit.engine.block_train import EpochSettings, block_forward, train_epochs
from lowbit.engine.precision import resolve_autocast
from lowbit.errors import LowbitError
from lowbit.formats.files import ARTIFACTS_FILE
from lowbit.methods.omniquant.block import BlockSettings, OmniQuantBlock
from lowbit.methods.omniquant.let import activation_stats, let_groups
from lowbit.presets import RecipePreset
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)

STATE_PREFIX = "omniquant"


@dataclass(frozen=True)
class OmniQuantOptions:
    """OmniQuant's options. `None` = the reference recipe for the family and setting (docs/methods.md, OmniQuant)."""

    epochs: int | None = field(
        default=None, metadata={"help": "passes over the calibration samples per block; none = 40 at W2A16, else 20"}
    )
    lwc: bool = field(default=True, metadata={"help": "learnable weight clipping (false: plain min/max RTN)"})
    let: bool | None = field(
        default=None,
        metadata={"help": "learnable equivalent transformation; none = on for OPT and any W-A scheme, off for Llama"},
    )
    shift: bool | None = field(
        default=None, metadata={"help": "LET shifts; none = only non-Llama families with activation quantization"}
    )
    aug_loss: bool | None = field(
        default=None,
        metadata={"help": "add MSE to the float block on the quantized input; none = on for Llama W2A16 and W4A4"},
    )
    alpha: float | None = field(
        default=None, metadata={"help": "LET init exponent act^a / w^(1-a); none = 0.75 for OPT W4A4, else 0.5"}
    )
    lwc_init: Literal["reference", "mse"] = field(
        default="reference",
        metadata={"help": "LWC start: u = l = 4 (reference) or the least-weight-error clip per group (mse)"},
    )
    let_lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate of the LET scales/shifts"})
    lwc_lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the LWC factors"})
    wd: float = field(default=0.0, metadata={"help": "AdamW weight decay (every group)"})
    batch_size: int = field(default=1, metadata={"help": "samples per AdamW step (reference: 1)"})
    qk_scale_tying: Literal["rotary", "none"] = field(
        default="rotary", metadata={"help": "tie q<->k scales across RoPE pairs (exact), or none (reference)"}
    )
    opt_out_let: Literal["correct", "reference"] = field(
        default="correct", metadata={"help": "OPT v->out LET during training: correct form or the reference quirk"}
    )
    autocast: Literal["auto", "off", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "training precision; auto = fp16 on CUDA below 8 bits, fp32 on CPU"}
    )
    warm_start: str | None = field(
        default=None, metadata={"help": "export dir (or artifacts file) of an OmniQuant run: start from its LET/LWC"}
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads while training"})


@dataclass(frozen=True)
class Resolved:
    """The recipe for this model and scheme, recorded in the run record."""

    block: BlockSettings
    epochs: int
    aug_loss: bool
    autocast: str

    def to_metrics(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "aug_loss": self.aug_loss, "autocast": self.autocast, **vars(self.block)}


def resolve_recipe(options: OmniQuantOptions, arch: ArchSpec, scheme: QuantScheme, device: torch.device) -> Resolved:
    """Fill the `None` options from the reference scripts' table (docs/methods.md, OmniQuant), by family and setting."""
    act = scheme.act_bits < 16
    llama = arch.family != "opt"
    low_wa = act and (scheme.act_bits <= 4 or scheme.bits <= 4)  # the W4A4 recipe (also W3A4, W4A6, W3A6)
    let = options.let if options.let is not None else (act or not llama)
    shift = options.shift if options.shift is not None else (act and not llama)
    aug = options.aug_loss if options.aug_loss is not None else (llama and ((scheme.bits == 2 and not act) or low_wa))
    alpha = options.alpha if options.alpha is not None else (0.75 if low_wa and not llama else 0.5)
    epochs = options.epochs if options.epochs is not None else (40 if scheme.bits == 2 and not act else 20)
    settings = BlockSettings(
        lwc=options.lwc,
        let=let,
        shift=shift and let,
        alpha=alpha,
        let_lr=options.let_lr,
        lwc_lr=options.lwc_lr,
        qk_tying=options.qk_scale_tying,
        reference_quirk=options.opt_out_let == "reference" and not llama,
        lwc_init=options.lwc_init,
    )
    autocast = resolve_autocast(options.autocast, device, min(scheme.bits, scheme.act_bits))
    return Resolved(settings, epochs, aug, autocast)


def load_warm_state(source: str) -> dict[str, Tensor]:
    """The `omniquant.*` tensors of an export directory's artifacts file (or of the file itself)."""
    path = Path(source).expanduser()
    file = path / ARTIFACTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise LowbitError(
            f"warm start '{source}' has no {ARTIFACTS_FILE}: pass the output directory of an omniquant run"
        )
    tensors = {k: v for k, v in load_file(file).items() if k.startswith(f"{STATE_PREFIX}.")}
    if not tensors:
        raise LowbitError(f"warm start '{source}' holds no OmniQuant state: pass the output of an omniquant run")
    return tensors


class OmniQuant(BlockStage):
    """OmniQuant block quantizer: LWC (+ LET) trained with AdamW against the float block's outputs."""

    name: ClassVar[str] = "omniquant"
    kind: ClassVar[str] = "quantizer"
    needs_data: ClassVar[bool] = True
    supports_act_quant: ClassVar[bool] = True
    summary: ClassVar[str] = "learnable weight clipping + equivalent transformation, AdamW per block (OmniQuant)"
    supports_experts: ClassVar[bool] = True  # LET pairs stop at attention in a sparse block (ArchSpec.groups_for)
    supports_scheme_mix: ClassVar[bool] = True  # each LearnableClip on its linear's scheme (make_block)
    # global batches, losses and gradients summed over the ranks before each AdamW step (engine/block_train.py),
    # LET's statistics folded in global sample order (let.py): OmniQuant, LET and DESV alike
    data_parallel: ClassVar[bool] = True
    Options: ClassVar[type] = OmniQuantOptions

    def __init__(self, options: OmniQuantOptions, scheme: QuantScheme) -> None:
        super().__init__(options, scheme)
        self.validate(options, scheme)
        self.state: dict[str, Tensor] = {}
        self.warm = load_warm_state(options.warm_start) if options.warm_start else None

    @classmethod
    def validate(cls, options: OmniQuantOptions, scheme: QuantScheme) -> None:
        _validate(options, scheme)
        if options.warm_start:
            load_warm_state(options.warm_start)

    @classmethod
    def check_recipe(cls, names: tuple[str, ...], kinds: list[str]) -> None:
        """OmniQuant/DESV quantize (LWC): they end a recipe. LET alone in front of another quantizer is `let+X`."""
        index = names.index(cls.name)
        if index != len(names) - 1:
            raise LowbitError(
                f"recipe '{'+'.join(names)}' puts {names[-1]} after {cls.name}, which already quantizes (LWC): "
                f"end the recipe with {cls.name}, or use OmniQuant's LET as a transform in front of it: "
                f"let+{names[-1]}"
            )

    def preferred_quantized_input(self) -> bool | None:
        return True  # the reference's quantized-input chain

    def artifacts(self) -> dict[str, Tensor]:
        return dict(self.state)

    # --- the per-block pieces DESV reuses ---------------------------------------------------------------

    def require_data(self, ctx: BlockContext) -> None:
        if ctx.inputs is None or ctx.targets is None:
            raise LowbitError(f"{self.name} needs calibration data; pass --dataset (or 'builtin')")

    def resolve(self, ctx: BlockContext) -> Resolved:
        return resolve_recipe(self.options, ctx.arch, self.scheme, ctx.device)

    def make_block(self, ctx: BlockContext, resolved: Resolved) -> OmniQuantBlock:
        """LET initialised from the float block's activation statistics (float chain), LWC at u = l = 4."""
        stats = None
        if resolved.block.let:
            keys = [group.key_linear for group in let_groups(ctx.arch, ctx.block)]
            stats = activation_stats(ctx.block, keys, ctx.fp_inputs, ctx.device_kwargs(), ctx.device, ctx.group)
        schemes = {name: self.scheme_for(ctx.name, name) for name in ctx.linears()}  # LWC on each linear's scheme
        return OmniQuantBlock(ctx.block, ctx.arch, self.scheme, resolved.block, stats, schemes)

    def warm_state(self, ctx: BlockContext) -> dict[str, Tensor] | None:
        if self.warm is None:
            return None
        prefix = f"{STATE_PREFIX}.{ctx.name}."
        state = {k[len(prefix) :]: v for k, v in self.warm.items() if k.startswith(prefix)}
        if not state:
            raise LowbitError(f"warm start has no OmniQuant state for {ctx.name}: was it made on this model?")
        return state

    def train(self, ctx: BlockContext, trainable: Any, resolved: Resolved, epochs: int, desc: str) -> dict[str, Any]:
        """The shared epoch loop on this block: quantized chain in, float targets out, act quant on."""
        aug = ctx.run(ctx.inputs) if resolved.aug_loss and epochs > 0 else None
        params = trainable.block_params()
        forward = block_forward(ctx.block, {key: key for key in params}, ctx.device_kwargs(), compile=ctx.compile)
        settings = EpochSettings(
            epochs=epochs,
            batch_size=self.options.batch_size,
            aug_loss=resolved.aug_loss,
            autocast=resolved.autocast,
            weight_decay=self.options.wd,
        )
        _, total = ctx.group.offset(ctx.nsamples)  # every rank's samples: the steps one process takes
        steps = epochs * (total // self.options.batch_size)
        quiet = None if ctx.group.is_main else True  # rank 0 shows the bar
        bar = tqdm(total=steps, desc=f"{desc} {ctx.name}", unit="step", leave=False, disable=quiet)
        threads = torch.get_num_threads()
        if self.options.num_threads is not None:
            torch.set_num_threads(self.options.num_threads)
        try:
            record = train_epochs(
                trainable,
                forward,
                ctx.inputs,
                ctx.targets,
                aug,
                settings,
                device=ctx.device,
                quant_context=ctx.act_quant,
                progress=lambda _step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3g}")),
                group=ctx.group,
            )
        finally:
            bar.close()
            torch.set_num_threads(threads)
        if record.nonfinite_at is not None:
            ctx.metrics.setdefault("events", []).append(f"{desc}: non-finite loss at step {record.nonfinite_at}")
        return record.to_metrics()

    def emit(self, ctx: BlockContext, block: OmniQuantBlock) -> None:
        """Save the state, fold LET, hand LWC's records to the engine."""
        for key, tensor in block.state_dict().items():
            self.state[f"{STATE_PREFIX}.{ctx.name}.{key}"] = tensor
        ctx.quantized.update(block.fold())

    def process_block(self, ctx: BlockContext) -> None:
        self.require_data(ctx)
        started = time.perf_counter()
        resolved = self.resolve(ctx)
        block = self.make_block(ctx, resolved)
        warm = self.warm_state(ctx)
        if warm is not None:
            block.load_state_dict(warm)
        metrics = self.train(ctx, block, resolved, resolved.epochs, "omniquant")
        self.emit(ctx, block)
        ctx.metrics["omniquant"] = {
            "recipe": resolved.to_metrics(),
            "warm_start": warm is not None,
            **metrics,
            "seconds": round(time.perf_counter() - started, 3),
        }


class LET(OmniQuant):
    """OmniQuant's LET as a transform: trained jointly with LWC as OmniQuant does, then only LET is folded into the
    float weights and norms (LWC is discarded) so that another quantizer follows: let+gptq, let+rtn, let+signround.
    Its input chain is the float chain (the following quantizer has not quantized this block yet)."""

    name: ClassVar[str] = "let"
    kind: ClassVar[str] = "transform"
    summary: ClassVar[str] = "OmniQuant's learnable equivalent transformation, folded; a quantizer follows"

    @classmethod
    def check_recipe(cls, names: tuple[str, ...], kinds: list[str]) -> None:
        if "omniquant" in names or "desv" in names:
            raise LowbitError("let is already part of omniquant/desv (omniquant.let=true); drop the separate let stage")

    def preferred_quantized_input(self) -> bool | None:
        return None

    def resolve(self, ctx: BlockContext) -> Resolved:
        resolved = super().resolve(ctx)
        return dataclasses.replace(resolved, block=dataclasses.replace(resolved.block, let=True))

    def artifacts(self) -> dict[str, Tensor]:
        return {key.replace(f"{STATE_PREFIX}.", "let.", 1): t for key, t in self.state.items() if ".let." in key}

    def process_block(self, ctx: BlockContext) -> None:
        self.require_data(ctx)
        started = time.perf_counter()
        resolved = self.resolve(ctx)
        block = self.make_block(ctx, resolved)
        metrics = self.train(ctx, block, resolved, resolved.epochs, "let")
        for key, tensor in block.state_dict().items():
            self.state[f"{STATE_PREFIX}.{ctx.name}.{key}"] = tensor
        block.fold_float()
        ctx.metrics["let"] = {
            "recipe": resolved.to_metrics(),
            **metrics,
            "seconds": round(time.perf_counter() - started, 3),
        }


def _validate(options: OmniQuantOptions, scheme: QuantScheme) -> None:
    checks = [
        (options.epochs is None or options.epochs >= 0, f"omniquant.epochs must be >= 0, got {options.epochs}"),
        (options.batch_size >= 1, f"omniquant.batch_size must be >= 1, got {options.batch_size}"),
        (options.let_lr > 0 and options.lwc_lr > 0, "omniquant.let_lr and omniquant.lwc_lr must be > 0"),
        (options.wd >= 0, f"omniquant.wd must be >= 0, got {options.wd}"),
        (options.alpha is None or 0 <= options.alpha <= 1, "omniquant.alpha must lie in [0, 1]"),
        (options.num_threads is None or options.num_threads >= 1, "omniquant.num_threads must be >= 1"),
        (2 <= scheme.bits <= 8, f"omniquant supports 2-8 bit weights, got {scheme.bits}"),
        (
            scheme.kind in ("asym", "sym_omni", "asym_min"),
            f"omniquant quantizes asym, sym_omni or GGUF asym_min weights, not {scheme.kind}",
        ),  # fmt: skip
        (options.lwc or options.let is not False, "omniquant with lwc=false and let=false trains nothing: use rtn"),
    ]
    for ok, message in checks:
        if not ok:
            raise LowbitError(message)


def _preset(name: str, options: dict, nsamples: int, seqlen: int, summary: str) -> RecipePreset:
    return RecipePreset(name, "omniquant", options, nsamples, seqlen, summary)


# A short CPU budget (32 steps per block, ~1/160 of the reference's) leaves LWC at its start with the reference
# rates: W3g-1 SmolLM2 ppl 331 vs 49 with a searched start and 5x lwc_lr (benchmarks/results/omniquant-desv.md).
# bf16 autocast is 1.33x faster on this CPU but worse at W4A4 (ppl 189 vs 151), so the preset keeps fp32.
CPU_OPTIONS = {"epochs": 2, "lwc_init": "mse", "lwc_lr": 5e-2}


# Named recipes: the reference scripts' settings (docs/methods.md; the family-specific LET/aug_loss/alpha choices
# are resolved per model when left at None) and CPU-sized variants for small models on a laptop-class CPU.
RECIPES: dict[str, RecipePreset] = {
    preset.name: preset
    for preset in (
        _preset("omniquant-w2", {"epochs": 40}, 128, 2048, "W2A16 scripts: 40 epochs, 128 x 2048"),
        _preset("omniquant-w3", {"epochs": 20}, 128, 2048, "W3A16 scripts: 20 epochs, 128 x 2048"),
        _preset("omniquant-w4a4", {"epochs": 20, "let": True}, 128, 2048, "W4A4 scripts: LWC+LET, 20 epochs"),
        _preset("omniquant-w6a6", {"epochs": 20, "let": True}, 128, 2048, "W6A6 scripts: LWC+LET, 20 epochs"),
        _preset(
            "omniquant-cpu",
            CPU_OPTIONS,
            16,
            256,
            "CPU-sized: 2 epochs, 16 x 256, LWC from the mse clip, lwc_lr 5e-2",
        ),
        _preset("omniquant-cpu-wa", {**CPU_OPTIONS, "let": True}, 16, 256, "omniquant-cpu with LET on (W-A schemes)"),
    )
}
