"""What a run report shows, read from a run record (`lowbit_record.json`): charts and tables, no rendering.

The record's `stages` maps each stage group to its metrics: a list with one dict per block for block-scope groups,
one dict for model-scope stages. Curves are found by name wherever a method keeps them (`loss_trace`: one value
or one [step, value] pair per recorded step; `epoch_losses`), and before/after errors by the pairs methods record
(`loss_first`/`best_loss`, `initial_loss`/`final_loss`, `err_unclipped`/`err`), so a new method that uses the same
names appears in the report without changes here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lowbit.eval.plan_map import plan_grid

CURVE_KEYS = ("loss_trace", "epoch_losses")
BEFORE_AFTER = (("loss_first", "best_loss"), ("initial_loss", "final_loss"), ("err_unclipped", "err"))
MAX_LINES = 32  # curves per chart: deeper models are subsampled evenly so a chart stays readable


@dataclass
class Curve:
    label: str
    x: list[float]
    y: list[float]


@dataclass
class Chart:
    title: str
    xlabel: str
    ylabel: str
    curves: list[Curve]
    kind: str = "line"  # line | bar (one bar per x for each curve)
    log_y: bool = False
    tick_labels: list[str] | None = None  # names for the x positions of a bar chart (a heatmap's columns)
    grid: list[list[float | None]] | None = None  # heatmap: values[row][column] (None: no such cell)
    row_labels: list[str] | None = None  # heatmap: the rows' names


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Any]]


@dataclass
class Section:
    title: str
    charts: list[Chart] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _as_curve(label: str, values: Any) -> Curve | None:
    """A list of numbers (x = index) or of [x, y] pairs -> Curve; anything else -> None."""
    if not isinstance(values, list) or not values:
        return None
    xs, ys = [], []
    for index, item in enumerate(values):
        x, y = (item[0], item[1]) if isinstance(item, list | tuple) and len(item) == 2 else (index, item)
        if _number(x) is not None and _number(y) is not None:
            xs.append(float(x))
            ys.append(float(y))
    return Curve(label, xs, ys) if ys else None


def _walk(node: Any, path: str = ""):
    """(path, dict) for every dict under node, depth first."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            if isinstance(value, dict | list) and key not in CURVE_KEYS and key != "log":
                yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            if isinstance(value, dict):
                yield from _walk(value, f"{path}[{index}]")


def _subsample(items: list, limit: int = MAX_LINES) -> list:
    if len(items) <= limit:
        return items
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def block_curves(blocks: list[dict[str, Any]]) -> dict[str, list[Curve]]:
    """Curve name (e.g. 'loss_trace', 'omniquant.epoch_losses', 'teq.rand.loss_trace') -> one curve per block."""
    found: dict[str, list[Curve]] = {}
    for position, block in enumerate(blocks):
        label = f"block {block.get('block', position)}"
        for path, node in _walk(block):
            for key in CURVE_KEYS:
                curve = _as_curve(label, node.get(key))
                if curve is not None:
                    found.setdefault(f"{path}.{key}" if path else key, []).append(curve)
    return found


def before_after(blocks: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows [block, where, before, after, after/before] for every recorded before/after error pair."""
    rows = []
    for position, block in enumerate(blocks):
        for path, node in _walk(block):
            for before_key, after_key in BEFORE_AFTER:
                before, after = _number(node.get(before_key)), _number(node.get(after_key))
                if before is not None and after is not None:
                    ratio = round(after / before, 4) if before > 0 else None
                    where = f"{path} ({before_key} -> {after_key})" if path else f"{before_key} -> {after_key}"
                    rows.append([block.get("block", position), where, _sig(before), _sig(after), ratio])
    return rows


def _sig(value: float) -> float:
    return float(f"{value:.6g}")


def _block_section(name: str, blocks: list[dict[str, Any]]) -> Section:
    section = Section(f"Stage group '{name}' ({len(blocks)} blocks)")
    for curve_name, curves in block_curves(blocks).items():
        positive = all(y > 0 for curve in curves for y in curve.y)
        xlabel = "epoch" if curve_name.endswith("epoch_losses") else "step"
        title = f"{name}: per-block training loss ({curve_name})"
        section.charts.append(Chart(title, xlabel, "loss", _subsample(curves), log_y=positive))
    rows = before_after(blocks)
    if rows:
        section.tables.append(Table("Output error before / after, per block", ["block", "what", "before", "after",
                                                                             "after/before"], rows))  # fmt: skip
        kinds = list(dict.fromkeys(row[1] for row in rows))
        for kind in kinds[:4]:
            picked = [row for row in rows if row[1] == kind]
            xs = [float(row[0]) for row in picked]
            section.charts.append(
                Chart(f"{name}: {kind}", "block", "error", [Curve("before", xs, [r[2] for r in picked]),
                                                            Curve("after", xs, [r[3] for r in picked])], kind="bar")
            )  # fmt: skip
    seconds = [(float(b.get("block", i)), _number(b.get("seconds"))) for i, b in enumerate(blocks)]
    seconds = [(x, y) for x, y in seconds if y is not None]
    if seconds:
        curve = Curve("seconds", [x for x, _ in seconds], [y for _, y in seconds])
        section.charts.append(Chart(f"{name}: seconds per block", "block", "seconds", [curve], kind="bar"))
    per_linear = _per_linear(blocks)
    if per_linear:
        section.tables.append(Table("Per-linear error", ["block", "stage", "linear", "metric", "value"], per_linear))
    return section


def _per_linear(blocks: list[dict[str, Any]]) -> list[list[Any]]:
    """GPTQ's per-linear loss and AWQ clip's per-linear error (after; before where recorded)."""
    rows = []
    for position, block in enumerate(blocks):
        for stage in ("gptq", "awq_clip"):
            for linear, values in (block.get(stage) or {}).items():
                if not isinstance(values, dict):
                    continue
                for metric in ("loss", "err_unclipped", "err"):
                    if _number(values.get(metric)) is not None:
                        rows.append([block.get("block", position), stage, linear, metric, _sig(values[metric])])
    return rows


def _model_section(name: str, metrics: dict[str, Any]) -> Section:
    section = Section(f"Stage '{name}' (model scope)")
    log = metrics.get("log")
    if isinstance(log, list) and log and isinstance(log[0], dict):
        steps = [float(row.get("step", i)) for i, row in enumerate(log)]
        rates = [Curve(key, steps, [float(row.get(key) or 0.0) for row in log])
                 for key in ("acceptance_rate", "window_acceptance_rate") if key in log[0]]  # fmt: skip
        section.charts.append(Chart(f"{name}: acceptance rate", "step", "rate", rates))
        if "objective" in log[0]:
            objective = Curve("objective", steps, [float(row["objective"]) for row in log])
            section.charts.append(Chart(f"{name}: objective (lower is better)", "step", "objective", [objective]))
    traces = [curve for path, node in _walk(metrics) if (curve := _as_curve(path or name, node.get("loss_trace")))]
    if traces:  # e.g. TEQ: one curve per initialisation tried
        section.charts.append(Chart(f"{name}: training loss", "step", "loss", traces))
    scalars = [[key, value] for key, value in metrics.items() if _number(value) is not None or isinstance(value, str)]
    if scalars:
        section.tables.append(Table("Summary", ["metric", "value"], scalars))
    timing = metrics.get("time_breakdown_s")
    if isinstance(timing, dict):
        rows = [[key, value] for key, value in timing.items()]
        section.tables.append(Table("Where the time went (s)", ["part", "seconds"], rows))
    return section


def _evaluation_section(record: dict[str, Any]) -> Section | None:
    evaluation, tasks = record.get("evaluation") or {}, record.get("lm_eval") or {}
    if not evaluation and not tasks:
        return None
    section = Section("Evaluation")
    before, after = evaluation.get("before") or {}, evaluation.get("after") or {}
    rows = []
    for name in dict.fromkeys([*before, *after]):
        b, a = (before.get(name) or {}).get("ppl"), (after.get(name) or {}).get("ppl")
        windows = (after.get(name) or before.get(name) or {}).get("windows")
        rows.append([name, windows, b, a, round(a / b, 4) if b and a else None])
    if rows:
        section.tables.append(Table("Perplexity before / after", ["dataset", "windows", "float", "quantized",
                                                                  "ratio"], rows))  # fmt: skip
    for label, entry in tasks.items():
        task_rows = [[task, values.get("acc"), values.get("acc_norm"), values.get("n_shot"), values.get("samples")]
                     for task, values in (entry.get("tasks") or {}).items()]  # fmt: skip
        if task_rows:
            section.tables.append(Table(f"lm-eval ({label})", ["task", "acc", "acc_norm", "shots", "docs"], task_rows))
    return section


def _flat(node: Any, prefix: str = "") -> list[list[Any]]:
    if isinstance(node, dict):
        return [row for key, value in node.items() for row in _flat(value, f"{prefix}.{key}" if prefix else key)]
    return [[prefix, node if not isinstance(node, list) else ", ".join(map(str, node))]]


def _plan_section(record: dict[str, Any]) -> Section | None:
    """A mixed-precision run's plan: the heat map of bits (blocks x linears) and how many linears got each option."""
    plan = record.get("mixed_precision")
    grid = plan_grid(plan) if isinstance(plan, dict) else None
    if grid is None:
        return None
    section = Section("Mixed-precision plan")
    section.charts.append(Chart(grid.title, "linear", "block", [], kind="heatmap", tick_labels=grid.columns,
                                grid=grid.bits, row_labels=[str(b) for b in grid.blocks]))  # fmt: skip
    counts: dict[str, int] = {}
    for option in (plan.get("linears") or {}).values():  # type: ignore[union-attr]
        counts[str(option)] = counts.get(str(option), 0) + 1
    section.tables.append(Table("Linears per option", ["option", "linears"], sorted(counts.items())))
    section.notes.append(f"stored {plan.get('stored_bytes')} of {plan.get('budget_bytes')} budget bytes as "  # type: ignore[union-attr]
                         f"{plan.get('format')} stores them; estimator {plan.get('estimator', '?')}")  # type: ignore[union-attr]  # fmt: skip
    return section


def build_sections(record: dict[str, Any]) -> list[Section]:
    """The report's sections, in reading order: overview, evaluation, stages, time, settings and versions."""
    timings = record.get("timings") or {}
    overview = Section("Run")
    overview.tables.append(
        Table("Overview", ["field", "value"], [
            ["model", record.get("model")], ["architecture", record.get("architecture")],
            ["recipe", (record.get("config") or {}).get("recipe")], ["format", record.get("format", "(in memory)")],
            ["quantized linears", record.get("quantized_linears")], ["activation", record.get("activation")],
        ])
    )  # fmt: skip
    sections = [overview]
    plan = _plan_section(record)
    if plan is not None:
        sections.append(plan)
    evaluation = _evaluation_section(record)
    if evaluation is not None:
        sections.append(evaluation)
    for name, metrics in (record.get("stages") or {}).items():
        if isinstance(metrics, list):
            sections.append(_block_section(name, [m for m in metrics if isinstance(m, dict)]))
        elif isinstance(metrics, dict):
            sections.append(_model_section(name, metrics))
    time_section = Section("Where the time went")
    parts = [(key.removesuffix("_seconds"), value) for key, value in timings.items() if key.endswith("_seconds")]
    if parts:
        xs = list(range(len(parts)))
        curve = Curve("seconds", xs, [float(v) for _, v in parts])
        labels = [name for name, _ in parts]
        time_section.charts.append(Chart("run phases (s)", "phase", "seconds", [curve], kind="bar", tick_labels=labels))
    time_section.tables.append(Table("Timings", ["field", "value"], [[k, v] for k, v in timings.items()]))
    sections.append(time_section)
    settings = Section("Settings and versions")
    for key in ("config", "calibration", "versions", "determinism", "export", "checkpoints"):
        if record.get(key):
            settings.tables.append(Table(key, ["field", "value"], _flat(record[key])))
    sections.append(settings)
    return sections
