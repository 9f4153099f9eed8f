"""TEQ's trainable equivalent scales: parameters per absorbable group and the fake-quant linear that uses them.

A consumer linear computes y = (x / s) · Q(W · diag(s))ᵀ + b (docs/methods.md). Training sees each linear exactly as it
will be after folding, so the trained fake-quant weights are, bit for bit, what RTN quantizes after the fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.arch import ArchSpec, ScaleGroup
from lowbit.methods.common.fold import fold_group, group_width
from lowbit.quantizer import fake_quant
from lowbit.scheme import QuantScheme

SCALE_FLOOR = 1e-5


def clamped(s: Tensor) -> Tensor:
    """max(s, 1e-5), as in training and folding (docs/methods.md, TEQ)."""
    return s.clamp(min=SCALE_FLOOR)


class TEQLinear(nn.Module):
    """A frozen linear trained as it will be after folding: W_eff = diag(1/s_out) · W · diag(s_in), fake-quantized.

    `in_scale` is the vector of the group this linear consumes; when that group's previous op is a norm (not
    wrapped), the input is divided by it here, which equals folding 1/s into the norm. `out_scale` is the vector of
    the group this linear produces for (v->o, up->down, fc1->fc2): its rows and bias are divided by it, exactly as
    the fold does, and the consumer then takes its input as is. Without either vector the quantized weight never
    changes and is computed once. `quantize=False` makes the module an exact float reparameterisation (tests).
    """

    def __init__(
        self,
        linear: nn.Linear,
        scheme: QuantScheme,
        *,
        in_scale: nn.Parameter | None = None,
        divide_input: bool = False,
        out_scale: nn.Parameter | None = None,
        out_rows: slice | None = None,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        self.inner = linear
        self.scheme = scheme
        self.in_scale = in_scale
        self.divide_input = divide_input
        self.out_scale = out_scale
        self.out_rows = out_rows  # the rows `out_scale` divides in a fused linear (None: all)
        self.quantize = quantize
        self._frozen: Tensor | None = None

    def effective_weight(self) -> Tensor:
        """diag(1/s_out) · W · diag(s_in) in fp32, in the fold's order of operations (so it is bit-identical)."""
        weight = self.inner.weight.float()
        if self.in_scale is not None:
            weight = weight * clamped(self.in_scale)[None, :]
        if self.out_scale is not None:
            weight = _divide_rows(weight, clamped(self.out_scale)[:, None], self.out_rows)
        return weight

    def quantized_weight(self) -> Tensor:
        """Q(W_eff) with the identity STE (docs/methods.md, TEQ), fp32."""
        if self.in_scale is None and self.out_scale is None:
            if self._frozen is None:
                with torch.no_grad():
                    weight = self.inner.weight.float()
                    self._frozen = fake_quant(weight, self.scheme) if self.quantize else weight
            return self._frozen
        weight = self.effective_weight()
        return fake_quant(weight, self.scheme, ste="identity") if self.quantize else weight

    def forward(self, x: Tensor) -> Tensor:
        if self.divide_input:
            x = x / clamped(self.in_scale).to(x.dtype)
        bias = self.inner.bias
        with torch.autocast(x.device.type, enabled=False):  # Q(W_eff) in fp32 also under autocast (what RTN sees)
            weight = self.quantized_weight()
            if bias is not None and self.out_scale is not None:
                bias = _divide_rows(bias.float(), clamped(self.out_scale), self.out_rows).to(bias.dtype)
        return F.linear(x, weight.to(x.dtype), bias)


def _divide_rows(t: Tensor, s: Tensor, rows: slice | None) -> Tensor:
    """t / s on `rows` (all rows when None), differentiable; the other rows untouched."""
    if rows is None:
        return t / s
    return torch.cat([t[: rows.start], t[rows] / s, t[rows.stop :]])


@dataclass
class ScaleSet:
    """The trainable vectors of one block, keyed by the group's previous op."""

    block: nn.Module
    groups: list[ScaleGroup]
    scales: dict[str, nn.Parameter]
    arch: ArchSpec

    def parameters(self) -> list[nn.Parameter]:
        return list(self.scales.values())


def select_groups(arch: ArchSpec, block: nn.Module, which: str) -> list[ScaleGroup]:
    """`all`: every exact group of the ArchSpec; `paper`: only TEQ's Table-9 groups (docs/methods.md, TEQ)."""
    groups = arch.groups_for(block)
    return groups if which == "all" else [group for group in groups if group.in_paper_teq]


def initial_scale(block: nn.Module, group: ScaleGroup, init: str) -> Tensor:
    """ones, or 1/sqrt(max over the group's weight rows of |W[:, c]|) with zeros replaced by 1 (docs/methods.md)."""
    width = group_width(block, group)
    if init == "ones":
        return torch.ones(width)
    stacked = torch.cat([block.get_submodule(name).weight.detach().float() for name in group.linears])
    wmax = stacked.abs().amax(dim=0)
    return torch.where(wmax > 0, 1.0 / wmax.clamp(min=1e-12).sqrt(), torch.ones_like(wmax))


def make_scale_set(arch: ArchSpec, block: nn.Module, which: str, init: str) -> ScaleSet:
    groups = select_groups(arch, block, which)
    scales = {group.prev: nn.Parameter(initial_scale(block, group, init)) for group in groups}
    return ScaleSet(block, groups, scales, arch)


def wrap_block(
    arch: ArchSpec,
    scale_set: ScaleSet,
    scheme: QuantScheme,
    quantize: bool = True,
    schemes: dict[str, QuantScheme] | None = None,
) -> None:
    """Replace every linear of the block by a TEQLinear wired to the vectors it consumes and produces; each trains
    against its own scheme from `schemes` (relative name -> scheme: a per-linear plan), else `scheme`."""
    consumes = {name: group for group in scale_set.groups for name in group.linears}
    produces = {group.prev: group for group in scale_set.groups if group.prev_kind == "linear"}
    for name, linear in arch.linears(scale_set.block).items():
        consumed, produced = consumes.get(name), produces.get(name)
        module = TEQLinear(
            linear,
            (schemes or {}).get(name, scheme),
            in_scale=scale_set.scales[consumed.prev] if consumed else None,
            divide_input=bool(consumed and consumed.prev_kind == "norm"),
            out_scale=scale_set.scales[produced.prev] if produced else None,
            out_rows=arch.prev_rows(scale_set.block, produced) if produced else None,
            quantize=quantize,
        )
        _set_submodule(scale_set.block, name, module)


def unwrap_block(arch: ArchSpec, block: nn.Module) -> None:
    """Put the original linears back (weights untouched)."""
    for name in arch.linear_names:
        module = block.get_submodule(name)
        if isinstance(module, TEQLinear):
            _set_submodule(block, name, module.inner)


def fold_scale_set(scale_set: ScaleSet) -> None:
    """Fold the trained vectors into the previous ops and the weights: the float block is unchanged."""
    for group in scale_set.groups:
        fold_group(scale_set.block, group, clamped(scale_set.scales[group.prev].detach()), arch=scale_set.arch)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
