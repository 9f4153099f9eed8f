"""A mixed-precision plan: which option of an `auto:` scheme each block linear is quantized with.

The plan is what `Stage.scheme_for` hands every quantizer (the same per-linear mechanism as the GGUF mixes), so any
stage that rounds per linear rounds each linear at its planned scheme. Linears that an export or its serving
kernels load as one layer (q/k/v, gate/up, the experts of a block: `export.layout.block_structure`) form one item
of the knapsack and share a scheme for every packed format; `fake` keeps each linear free. The budget counts the
bytes the format stores (`export.stored`), so "3.0 bits" is a promise about the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from lowbit.arch import ArchSpec
from lowbit.errors import LowbitError
from lowbit.export.layout import block_structure
from lowbit.export.stored import linear_stored_bytes
from lowbit.mixed.knapsack import solve
from lowbit.scheme import MixedBudget, QuantScheme, parse_scheme

PLAN_FILE = "plan.yaml"
PLAN_KEYS = ("scheme", "format", "estimator", "bits_per_weight", "stored_bytes", "budget_bytes", "weights", "linears")
PACKED_FORMATS = ("compressed-tensors", "gptq")
COUNTED_AS = {"auto": "compressed-tensors"}  # --format auto: counted as the packed format it prefers


@dataclass(frozen=True)
class PlanItem:
    """Linears that must share a scheme (one knapsack item), with their shapes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class SchemePlan:
    """The chosen scheme of every block linear, and what the choice costs; written as plan.yaml and rerun as is."""

    scheme: str  # the auto: scheme it was planned for
    format: str  # the format whose stored bytes it counts
    linears: dict[str, str]  # full linear name -> option name
    stored_bytes: int = 0
    budget_bytes: int = 0
    weights: int = 0
    estimator: str = ""  # the estimator that measured the losses (auto resolved)
    losses: dict[str, list[float]] = field(default_factory=dict, compare=False)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.weights if self.weights else 0.0

    def schemes(self) -> dict[str, QuantScheme]:
        """Full linear name -> the QuantScheme to round it with (what the stages' `linear_schemes` take)."""
        budget = parse_scheme(self.scheme).mixed
        assert budget is not None
        return {name: budget.option(option) for name, option in self.linears.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "format": self.format,
            "estimator": self.estimator,
            "bits_per_weight": round(self.bits_per_weight, 6),
            "stored_bytes": self.stored_bytes,
            "budget_bytes": self.budget_bytes,
            "weights": self.weights,
            "linears": dict(self.linears),
        }

    def record_entry(self, from_file: bool) -> dict[str, Any]:
        """The run record's `mixed_precision`: the plan, how it was made, and the measured loss of every linear at
        every option (in the order of the scheme's options), so a plan can be questioned after the run."""
        losses = {name: [float(f"{v:.6g}") for v in values] for name, values in self.losses.items()}
        return {
            **self.to_dict(),
            "from_file": from_file,
            **({"losses": losses} if losses else {}),
        }

    def write(self, path: str | Path) -> Path:
        """plan.yaml: the run's choices, editable; `--scheme-plan` reads it back."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def read(cls, path: str | Path) -> SchemePlan:
        """A plan file (written by a run or edited by hand): every option must be one of its scheme's options."""
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"scheme plan '{path}' does not exist: pass the plan.yaml an auto: run wrote")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("linears"), dict) or "scheme" not in data:
            raise LowbitError(f"scheme plan '{path}' needs the keys scheme and linears (as a run writes them)")
        scheme = parse_scheme(str(data["scheme"]))
        if scheme.mixed is None:
            raise LowbitError(f"scheme plan '{path}': scheme {scheme.name} is not an auto: scheme")
        linears = {str(name): scheme.mixed.option(str(option)).name for name, option in data["linears"].items()}
        return cls(scheme.name, str(data.get("format", "compressed-tensors")), linears,
                   int(data.get("stored_bytes", 0)), int(data.get("budget_bytes", 0)),
                   int(data.get("weights", 0)), str(data.get("estimator", "")))  # fmt: skip


def counted_format(fmt: str) -> str:
    return COUNTED_AS.get(fmt, fmt)


def plan_items(model: nn.Module, arch: ArchSpec, fmt: str) -> list[PlanItem]:
    """The knapsack's items in block order: fused sets tied for packed formats, single linears otherwise."""
    shapes: dict[str, tuple[int, int]] = {}
    for index, block in enumerate(arch.blocks(model)):
        for name, linear in arch.linears(block).items():
            shapes[f"{arch.block_name(index)}.{name}"] = (int(linear.weight.shape[0]), int(linear.weight.shape[1]))
    owner = {name: (name,) for name in shapes}
    if counted_format(fmt) in PACKED_FORMATS:
        fused, _ = block_structure(model)
        for members in fused:
            merged = tuple(dict.fromkeys(n for m in members if m in owner for n in owner[m]))
            for name in merged:
                owner[name] = merged
    items, seen = [], set()
    for name in shapes:
        members = owner[name]
        if members not in seen:
            seen.add(members)
            ordered = tuple(n for n in shapes if n in members)
            items.append(PlanItem(ordered, tuple(shapes[n] for n in ordered)))
    return items


def item_costs(items: list[PlanItem], budget: MixedBudget, fmt: str, scale_bytes: int, ct_packing: str | None
               ) -> list[list[int]]:  # fmt: skip
    """Stored bytes of each item under each option."""
    counted = counted_format(fmt)
    return [[sum(linear_stored_bytes(shape, option, counted, scale_bytes=scale_bytes, ct_packing=ct_packing)
                 for shape in item.shapes) for option in budget.options] for item in items]  # fmt: skip


def capacity_bytes(bits: float, weights: int) -> int:
    """The byte budget of `bits` per weight (a hair of slack so that a uniform scheme's exact bits fit it)."""
    return math.floor(bits * weights / 8 + 1e-6)


def check_budget(model: nn.Module, arch: ArchSpec, scheme: QuantScheme, fmt: str, ct_packing: str | None = None
                 ) -> None:  # fmt: skip
    """Before calibration: refuse a budget below what the cheapest option of every linear stores."""
    budget = scheme.mixed
    assert budget is not None
    items = plan_items(model, arch, fmt)
    costs = item_costs(items, budget, fmt, _scale_bytes(model), ct_packing)
    weights = sum(m * k for item in items for m, k in item.shapes)
    least = sum(min(row) for row in costs)
    if least > capacity_bytes(budget.bits, weights):
        raise LowbitError(
            f"budget {budget.bits} bits per weight is below the smallest option on this model: its cheapest plan "
            f"stores {8 * least / weights:.4f} bits per weight as {counted_format(fmt)} stores them; raise the "
            "budget or add a smaller option"
        )


def uniform_bits(model: nn.Module, arch: ArchSpec, scheme: QuantScheme, fmt: str, ct_packing: str | None = None
                 ) -> dict[str, float]:  # fmt: skip
    """Each option's stored bits per weight if every linear took it: the sizes a budget sits between (a budget equal
    to the cheapest option's gives that option everywhere)."""
    budget = scheme.mixed
    assert budget is not None
    items = plan_items(model, arch, fmt)
    costs = item_costs(items, budget, fmt, _scale_bytes(model), ct_packing)
    weights = sum(m * k for item in items for m, k in item.shapes)
    return {o.name: 8 * sum(row[j] for row in costs) / weights for j, o in enumerate(budget.options)}


def _scale_bytes(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.element_size()


def make_plan(
    model: nn.Module,
    arch: ArchSpec,
    scheme: QuantScheme,
    losses: dict[str, list[float]],
    fmt: str,
    ct_packing: str | None = None,
    estimator: str = "",
) -> SchemePlan:
    """Solve the knapsack: least total loss with the stored bytes within the budget."""
    budget = scheme.mixed
    assert budget is not None
    items = plan_items(model, arch, fmt)
    costs = item_costs(items, budget, fmt, _scale_bytes(model), ct_packing)
    item_losses = [[sum(losses[name][j] for name in item.names) for j in range(len(budget.options))]
                   for item in items]  # fmt: skip
    weights = sum(m * k for item in items for m, k in item.shapes)
    capacity = capacity_bytes(budget.bits, weights)
    choice = solve(costs, item_losses, capacity)
    if choice is None:
        check_budget(model, arch, scheme, fmt, ct_packing)  # raises with the numbers
        raise LowbitError(f"no plan fits budget {budget.bits}")
    linears = {name: budget.options[j].name for item, j in zip(items, choice, strict=True) for name in item.names}
    stored = sum(row[j] for row, j in zip(costs, choice, strict=True))
    return SchemePlan(scheme.name, counted_format(fmt), linears, stored, capacity, weights, estimator, dict(losses))
