"""One decoder block under OmniQuant: LET pairs + LWC factors, the temporary parameters they form, the exact fold,
and the per-block state that is saved for resume and DESV's warm start (docs/methods.md, OmniQuant).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.arch import ArchSpec
from lowbit.errors import LowbitError
from lowbit.methods.omniquant.let import (
    LetPair,
    QKScale,
    apply_let,
    initial_scale,
    let_groups,
    make_qk_scale,
    shift_possible,
    truncate_scales,
)
from lowbit.methods.omniquant.lwc import LearnableClip
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme

Stats = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class BlockSettings:
    """The resolved per-block choices (after the recipe table of docs/methods.md, OmniQuant)."""

    lwc: bool
    let: bool
    shift: bool
    alpha: float
    let_lr: float
    lwc_lr: float
    qk_tying: str
    reference_quirk: bool
    lwc_init: str = "reference"  # "mse": start LWC at the least-weight-error clip of the initial LET weights


class OmniQuantBlock:
    """LET and LWC of one block; `block_params()` forms the temporary parameters, `fold()` writes them for good.

    `delta`, when set, returns extra terms added to the linears' weights *before* LET (DESV's U.B.Vh), so the
    shift term uses W0 + dW exactly as OmniQuant uses W0 (docs/methods.md, LSI and DESV item 3).
    """

    def __init__(
        self,
        block: nn.Module,
        arch: ArchSpec,
        scheme: QuantScheme,
        settings: BlockSettings,
        stats: Stats | None,
        schemes: dict[str, QuantScheme] | None = None,
    ) -> None:
        """`schemes`: each linear's own scheme (relative name -> scheme) under a per-linear plan; `scheme` for the
        others."""
        self.block = block
        self.arch = arch
        self.settings = settings
        self.linears = arch.linears(block)
        self.pairs: list[LetPair] = []
        self.qk: QKScale | None = None
        if settings.let:
            if stats is None:
                raise LowbitError("LET needs activation statistics of the block's key linears")
            for group in let_groups(arch, block):
                act_max, middle = stats[group.key_linear]
                scale = initial_scale(act_max, self.linears[group.key_linear].weight, settings.alpha)
                shift = (
                    nn.Parameter(middle.float().clone()) if settings.shift and shift_possible(block, group) else None
                )
                self.pairs.append(LetPair(group, nn.Parameter(scale), shift, arch.prev_rows(block, group)))
            self.qk = make_qk_scale(arch, block, settings.qk_tying)
        self.clips = {
            name: LearnableClip(
                linear.out_features, linear.in_features, (schemes or {}).get(name, scheme), learnable=settings.lwc
            )  # fmt: skip
            for name, linear in self.linears.items()
        }
        self.base = self._base_params()
        self.delta: Callable[[], dict[str, Tensor]] | None = None
        if settings.lwc and settings.lwc_init == "mse":
            with torch.no_grad():
                initial = self.transformed()
            for name, clip in self.clips.items():
                clip.init_from_search(initial[f"{name}.weight"])

    def _base_params(self) -> dict[str, Tensor]:
        """fp32 detached copies of every parameter LET or LWC touches (the block's float state)."""
        names = [f"{name}.weight" for name in self.linears] + [f"{name}.bias" for name in self.linears]
        for pair in self.pairs:
            names += [f"{pair.group.prev}.weight", f"{pair.group.prev}.bias"]
        params = dict(self.block.named_parameters())
        return {name: params[name].detach().float().clone() for name in dict.fromkeys(names) if name in params}

    # --- parameters -------------------------------------------------------------------------------------

    def let_parameters(self) -> list[nn.Parameter]:
        params = [p for pair in self.pairs for p in pair.parameters()]
        return params + ([self.qk.scale] if self.qk is not None else [])

    def lwc_parameters(self) -> list[nn.Parameter]:
        return [p for clip in self.clips.values() for p in clip.parameters()]

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = [
            {"params": self.let_parameters(), "lr": self.settings.let_lr, "name": "let"},
            {"params": self.lwc_parameters(), "lr": self.settings.lwc_lr, "name": "lwc"},
        ]
        return [group for group in groups if group["params"]]

    def after_step(self) -> None:
        """Nothing to project: the scale floor is applied before each use (`block_params`)."""

    # --- temporary and folded parameters ----------------------------------------------------------------

    def transformed(self) -> dict[str, Tensor]:
        """Block parameters after (delta and) LET, before weight quantization."""
        scales = [pair.scale for pair in self.pairs] + ([self.qk.scale] if self.qk is not None else [])
        truncate_scales(scales)
        params = dict(self.base)
        if self.delta is not None:
            for name, increment in self.delta().items():
                params[f"{name}.weight"] = params[f"{name}.weight"] + increment
        return apply_let(params, self.pairs, self.qk, self.settings.reference_quirk, self.arch.norm_offset)

    def block_params(self) -> dict[str, Tensor]:
        """The temporary parameters the block trains with: LET-transformed, linears fake-quantized by LWC."""
        params = self.transformed()
        for name, clip in self.clips.items():
            params[f"{name}.weight"] = clip.fake(params[f"{name}.weight"])
        return params

    @torch.no_grad()
    def fold(self) -> dict[str, QuantizedWeight]:
        """Write LET into the block's norms and biases (the correct v->o form, always) and return the LWC records.

        The engine writes each record's dequantized weight, which equals the trained fake-quant weight bit for bit.
        """
        params = self._final_params()
        records = {name: clip.record(params[f"{name}.weight"]) for name, clip in self.clips.items()}
        self._write({k: v for k, v in params.items() if not (k.endswith(".weight") and k[:-7] in self.linears)})
        return records

    @torch.no_grad()
    def fold_float(self) -> None:
        """Write LET (and any delta) into every parameter, linears included, leaving them in float (the `let`
        transform stage: another quantizer follows)."""
        self._write(self._final_params())

    def _final_params(self) -> dict[str, Tensor]:
        quirk = self.settings.reference_quirk
        self.settings = dataclasses.replace(self.settings, reference_quirk=False)
        try:
            return self.transformed()
        finally:
            self.settings = dataclasses.replace(self.settings, reference_quirk=quirk)

    def _write(self, params: dict[str, Tensor]) -> None:
        own = dict(self.block.named_parameters())
        for key, value in params.items():
            if key not in own:
                raise LowbitError(f"LET produced '{key}', which this block does not have (a shift without a bias)")
            own[key].copy_(value.to(own[key].dtype))

    # --- state (resume, DESV warm start) ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """LET scales/shifts and LWC factors by name (`let.<prev>.scale`, `lwc.<linear>.upper`, ...)."""
        return {key: tensor.detach().clone() for key, tensor in self._named_tensors().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load saved LET/LWC tensors; the key sets and shapes must match exactly (same recipe and model)."""
        own = self._named_tensors()
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise LowbitError(
                f"saved OmniQuant state does not match this block (missing {missing[:3]}, unexpected {extra[:3]}): "
                "warm-start from a run with the same model, scheme and let/lwc/shift settings"
            )
        for key, tensor in own.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise LowbitError(
                    f"saved OmniQuant tensor {key} has shape {tuple(state[key].shape)}, need {tuple(tensor.shape)}"
                )
            tensor.copy_(state[key])

    def _named_tensors(self) -> dict[str, nn.Parameter]:
        named = {}
        for pair in self.pairs:
            named[f"let.{pair.name}.scale"] = pair.scale
            if pair.shift is not None:
                named[f"let.{pair.name}.shift"] = pair.shift
        if self.qk is not None:
            named["let.qk.scale"] = self.qk.scale
        for name, clip in self.clips.items():
            if clip.upper is not None:
                named[f"lwc.{name}.upper"], named[f"lwc.{name}.lower"] = clip.upper, clip.lower
        return named
