"""A mixed-precision plan as a picture: blocks x linears, the bits each linear was given.

Why a picture: a plan of a 30-block model is 210 choices, and what a reader wants to see is where the bits went (the
first and last blocks, v_proj, down_proj), which a heat map shows at a glance and a list does not. The grid is read
from the run record's `mixed_precision.linears` (full linear name -> option name); the experts of a sparse MoE block
are one column (their mean bits), so the picture keeps a column per kind of linear. Pure data here; the report
draws it (`report.py`), `lowbit compare` prints it as text (`text_heatmap`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError
from lowbit.scheme import parse_scheme

_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<linear>.+)$")
_EXPERT = re.compile(r"experts\.\d+\.")


@dataclass(frozen=True)
class PlanGrid:
    """bits[block][column] (None where a block has no such linear), with the labels of both axes."""

    blocks: list[int]
    columns: list[str]
    bits: list[list[float | None]]
    title: str


def _bits(option: str) -> float:
    try:
        return float(parse_scheme(option).bits)
    except LowbitError:
        return float("nan")


def plan_grid(plan: dict[str, Any]) -> PlanGrid | None:
    """The grid of a record's `mixed_precision` entry; None when it names no block linears."""
    linears = plan.get("linears") or {}
    cells: dict[tuple[int, str], list[float]] = {}
    columns: list[str] = []
    for name, option in linears.items():
        match = _BLOCK.match(str(name))
        if match is None:
            continue
        column = _EXPERT.sub("experts.*.", match["linear"])
        if column not in columns:
            columns.append(column)
        cells.setdefault((int(match["index"]), column), []).append(_bits(str(option)))
    if not cells:
        return None
    blocks = sorted({block for block, _ in cells})
    bits = [[(sum(v) / len(v)) if (v := cells.get((b, c))) else None for c in columns] for b in blocks]
    title = f"{plan.get('scheme', 'plan')}: {float(plan.get('bits_per_weight', 0)):.3f} stored bits per weight"
    return PlanGrid(blocks, [c.rsplit(".", 1)[-1] if c.count(".") <= 1 else c for c in columns], bits, title)


def text_heatmap(grid: PlanGrid) -> str:
    """The grid as text: one line per block, the code bits of each column (`.` where a block has no such linear)."""
    width = max(3, *(len(c) for c in grid.columns))
    head = "block  " + " ".join(c.rjust(width) for c in grid.columns)
    lines = [grid.title, head]
    for block, row in zip(grid.blocks, grid.bits, strict=True):
        cells = ["." if v is None else f"{v:g}" for v in row]
        lines.append(f"{block:>5}  " + " ".join(c.rjust(width) for c in cells))
    return "\n".join(lines)
