"""Exact per-channel scale folds over `ArchSpec.scale_groups` (see docs/methods.md, AWQ), shared by AWQ, TEQ and
InvarExplore.

A scale vector s > 0 on the inputs of a group's linears is absorbed by the previous op: a norm's affine weight
(and bias) or a previous linear's output rows divide by s, the group's weight columns multiply by s. A norm that
scales by (1 + w) (Gemma, `ArchSpec.norm_kind`) takes w' = (1 + w) / s - 1; a fused previous linear divides only
the rows of the group's part (`ScaleGroup.prev_part`: v of qkv_proj, up of gate_up_proj). The float
block computes the same function afterwards (to rounding). All arithmetic is fp32, cast to the model dtype once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.arch import ArchSpec, ScaleGroup
from lowbit.errors import LowbitError


def _check_scales(s: Tensor, width: int, where: str) -> Tensor:
    if s.dim() != 1 or s.shape[0] != width:
        raise LowbitError(
            f"scales for {where} have shape {tuple(s.shape)}: pass one positive scale per channel, [{width}]"
        )
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise LowbitError(f"scales for {where} must be finite and positive: an exact fold needs s > 0")
    return s.detach().to(torch.float32)


@torch.no_grad()
def divide_outputs(module: nn.Module, s: Tensor, *, norm_offset: float = 0.0, rows: slice | None = None) -> None:
    """Divide a norm's affine weight/bias, or a linear's output rows (`rows`, default all) and bias, by s (in place).

    A norm computing x * (offset + w) takes w' = (offset + w) / s - offset.
    """
    weight = module.weight
    width = s.shape[0]
    s32 = _check_scales(s, width, type(module).__name__).to(weight.device)
    if weight.dim() == 1:
        if weight.shape[0] != width:
            raise LowbitError(f"norm of width {weight.shape[0]} cannot absorb {width} scales: pass matching scales")
        weight.copy_(((weight.float() + norm_offset) / s32 - norm_offset).to(weight.dtype))
        rows = slice(0, width)
    else:
        rows = slice(0, weight.shape[0]) if rows is None else rows
        if rows.stop - rows.start != width or rows.stop > weight.shape[0]:
            raise LowbitError(f"rows {rows.start}:{rows.stop} of a linear cannot absorb {width} scales")
        part = weight[rows]
        part.copy_((part.float() / s32[:, None]).to(weight.dtype))
    bias = getattr(module, "bias", None)
    if bias is not None:
        part = bias[rows]
        part.copy_((part.float() / s32.to(bias.device)).to(bias.dtype))


@torch.no_grad()
def multiply_inputs(linear: nn.Linear, s: Tensor) -> None:
    """Multiply a linear's weight columns by s (in place)."""
    weight = linear.weight
    s32 = _check_scales(s, weight.shape[1], "linear inputs").to(weight.device)
    weight.copy_((weight.float() * s32[None, :]).to(weight.dtype))


def group_width(block: nn.Module, group: ScaleGroup) -> int:
    """Number of channels a group's scale vector has: the in_features of its linears."""
    widths = {block.get_submodule(name).in_features for name in group.linears}
    if len(widths) != 1:
        raise LowbitError(f"scale group {group.prev} -> {group.linears} has linears of different widths {widths}")
    return widths.pop()


def fold_group(block: nn.Module, group: ScaleGroup, s: Tensor, *, arch: ArchSpec) -> None:
    """Apply scales s to one group exactly: prev op absorbs 1/s, the group's linears' columns take s."""
    rows = arch.prev_rows(block, group)
    if not group.applies_to(block, rows):
        raise LowbitError(f"scale group {group.prev} -> {group.linears} is not exact on this block (e.g. GQA v->o)")
    if s.shape[0] != group_width(block, group):
        raise LowbitError(f"scales for {group.prev} need {group_width(block, group)} channels, got {s.shape[0]}")
    divide_outputs(block.get_submodule(group.prev), s, norm_offset=arch.norm_offset, rows=rows)
    for name in group.linears:
        multiply_inputs(block.get_submodule(name), s)


def fold_groups(block: nn.Module, scales: dict[str, Tensor], groups: list[ScaleGroup], *, arch: ArchSpec) -> None:
    """Fold several groups (keyed by their `prev` name) in the given order."""
    for group in groups:
        if group.prev in scales:
            fold_group(block, group, scales[group.prev], arch=arch)
