"""The run report: one self-contained HTML page (inline PNG charts) from a run record, or Markdown without
matplotlib.

People look at curves, not JSON: per-block training losses, before/after errors, InvarExplore's acceptance rate,
where the time went and the perplexity table. The HTML embeds every chart as a base64 PNG and has no external
reference, so it can be mailed or attached to an issue. matplotlib is optional (`lowbit[report]`); without it the
same sections are written as Markdown tables (`report.md`), never an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.eval.report_data import Chart, Section, Table, build_sections
from lowbit.formats.files import RECORD_FILE

log = logging.getLogger(__name__)

HTML_FILE, MARKDOWN_FILE = "report.html", "report.md"
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}td,th{border:1px solid #ccc;padding:2px 8px;"
    "text-align:left}th{background:#f0f0f0}img{max-width:100%;display:block;margin:.5em 0}h2{border-bottom:1px "
    "solid #ddd}details{margin-bottom:1em}"
)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _png(chart: Chart) -> str:
    """The chart as a base64 PNG (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if chart.kind == "heatmap":
        return _heatmap_png(chart)
    figure = Figure(figsize=(8, 3.6), dpi=90)
    axes = figure.add_subplot()
    if chart.kind == "bar":
        width = 0.8 / max(len(chart.curves), 1)
        for index, curve in enumerate(chart.curves):
            axes.bar([x + (index - (len(chart.curves) - 1) / 2) * width for x in curve.x], curve.y, width,
                     label=curve.label)  # fmt: skip
        ticks = sorted({x for curve in chart.curves for x in curve.x})
        if chart.tick_labels is not None and len(chart.tick_labels) == len(ticks):
            axes.set_xticks(ticks, chart.tick_labels)
        elif len(ticks) <= 40:
            axes.set_xticks(ticks, [f"{x:g}" for x in ticks])
    else:
        for curve in chart.curves:
            axes.plot(curve.x, curve.y, label=curve.label, linewidth=1.2, marker="." if len(curve.x) < 30 else None)
    if chart.log_y:
        axes.set_yscale("log")
    axes.set_title(chart.title, fontsize=10)
    axes.set_xlabel(chart.xlabel)
    axes.set_ylabel(chart.ylabel)
    axes.grid(alpha=0.3)
    if 1 < len(chart.curves) <= 12:
        axes.legend(fontsize=7, ncol=2)
    elif len(chart.curves) > 12:
        axes.text(0.99, 0.98, f"{len(chart.curves)} blocks, lighter = later", transform=axes.transAxes,
                  ha="right", va="top", fontsize=7)  # fmt: skip
        for index, line in enumerate(axes.get_lines()):
            line.set_color(matplotlib.colormaps["viridis"](index / max(len(chart.curves) - 1, 1)))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _heatmap_png(chart: Chart) -> str:
    """A grid chart (a mixed-precision plan: blocks down, linears across, colour = bits), each cell labelled."""
    from matplotlib.figure import Figure

    grid = chart.grid or []
    rows, cols = len(grid), len(chart.tick_labels or [])
    figure = Figure(figsize=(min(2 + 0.9 * cols, 12), min(1.5 + 0.28 * rows, 14)), dpi=90)
    axes = figure.add_subplot()
    values = [[float("nan") if v is None else v for v in row] for row in grid]
    image = axes.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="bits")
    axes.set_xticks(range(cols), chart.tick_labels or [], rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(rows), chart.row_labels or [], fontsize=7)
    if rows * cols <= 600:
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                if v is not None:
                    axes.text(c, r, f"{v:g}", ha="center", va="center", fontsize=7, color="w" if v < 5 else "k")
    axes.set_title(chart.title, fontsize=10)
    axes.set_xlabel(chart.xlabel)
    axes.set_ylabel(chart.ylabel)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return "-" if value is None else str(value)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in table.rows)
    inner = f"<table><tr>{head}</tr>{body}</table>"
    if len(table.rows) > 20:  # long tables fold away; the charts above carry the message
        return f"<details><summary>{html.escape(table.title)} ({len(table.rows)} rows)</summary>{inner}</details>"
    return f"<h3>{html.escape(table.title)}</h3>{inner}"


def render_html(record: dict[str, Any], sections: list[Section]) -> str:
    """A self-contained page: inline CSS, charts as data: URIs, no scripts or external links."""
    title = f"lowbit report: {record.get('model', '?')} {(record.get('config') or {}).get('recipe', '')}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for chart in section.charts:
            alt = html.escape(chart.title)
            parts.append(f"<img alt='{alt}' title='{alt}' src='data:image/png;base64,{_png(chart)}'>")
        parts.extend(f"<p>{html.escape(note)}</p>" for note in section.notes)
        parts.extend(_html_table(table) for table in section.tables)
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_table(table: Table) -> str:
    def clean(value: Any) -> str:
        return _cell(value).replace("|", "\\|").replace("\n", " ")

    lines = [f"**{table.title}**", "", "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(clean(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def render_markdown(record: dict[str, Any], sections: list[Section]) -> str:
    """The same sections as Markdown; each chart becomes a line per curve (first, min, last value)."""
    title = f"# lowbit report: {record.get('model', '?')} {(record.get('config') or {}).get('recipe', '')}"
    hint = "(matplotlib is not installed: `pip install 'lowbit[report]'` for the HTML report with charts)"
    lines = [title, "", hint, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for chart in section.charts:
            if chart.kind == "heatmap":  # the grid itself: one row per block
                grid_rows = [[label, *row] for label, row in zip(chart.row_labels or [], chart.grid or [], strict=True)]
                lines.append(_md_table(Table(chart.title, [chart.ylabel, *(chart.tick_labels or [])], grid_rows)))
                continue
            rows = [[c.label, len(c.y), c.y[0], min(c.y), c.y[-1]] for c in chart.curves if c.y]
            lines.append(_md_table(Table(chart.title, ["curve", "points", "first", "min", "last"], rows)))
        lines += [*section.notes, ""]
        lines += [_md_table(table) for table in section.tables]
    return "\n".join(lines)


def write_report(record: dict[str, Any], directory: str | Path, *, markdown: bool | None = None) -> Path:
    """Write report.html (or report.md without matplotlib, or when `markdown`) into `directory`; returns the file."""
    out = Path(directory)
    sections = build_sections(record)
    use_markdown = (not have_matplotlib()) if markdown is None else markdown
    if use_markdown:
        path, text = out / MARKDOWN_FILE, render_markdown(record, sections)
    else:
        path, text = out / HTML_FILE, render_html(record, sections)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    temp.replace(path)
    log.info("wrote run report %s", path)
    return path


def report_from_dir(directory: str | Path, *, markdown: bool | None = None) -> Path:
    """`lowbit report DIR`: the report of an export, from its lowbit_record.json."""
    record_file = Path(directory) / RECORD_FILE
    if not record_file.is_file():
        raise LowbitError(f"{directory} has no {RECORD_FILE}: pass a directory written by `lowbit quantize --out`")
    return write_report(json.loads(record_file.read_text()), directory, markdown=markdown)
