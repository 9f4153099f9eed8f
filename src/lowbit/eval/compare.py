"""`lowbit compare`: several outputs (and the float model) on the same perplexity windows and tasks, one table.

Each output is loaded the way `lowbit eval` loads it (packed formats on lowbit's runtime, W-A exports with their
activation quantizers), evaluated, and released before the next one, so memory stays that of one model.
What the run did (recipe, scheme, quantize time) comes from the export's `lowbit_record.json`.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import LowbitError
from lowbit.formats.files import RECORD_FILE

if TYPE_CHECKING:
    from lowbit.runtime.kernels import Kernel

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass
class CompareRow:
    """One evaluated output: what produced it and what it scores."""

    name: str
    method: str
    scheme: str
    format: str
    size_mb: float | None
    quantize_seconds: float | None
    ppl: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)  # task -> acc (or its first metric)
    lm_eval_batch_sizes: list[int] = field(default_factory=list)  # what lm-eval ran with (auto: what it detected)
    plan: dict[str, Any] | None = None  # a mixed-precision run's plan (record `mixed_precision`): its heat map

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """The run record of a lowbit export, or None (a float model directory or hub id)."""
    path = Path(directory) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def merge_into_record(
    directory: str | Path, ppl: dict[str, Any], tasks: dict[str, Any] | None, task_names: str | None
) -> Path | None:
    """Add what `lowbit eval` measured on a reloaded export to its run record; returns the record file, or None
    when there is none (a float model) or it cannot be written (a warning: the results were printed)."""
    record_file = Path(directory) / RECORD_FILE
    record = read_record(directory)
    if record is None:
        return None
    if ppl:
        record.setdefault("evaluation", {}).setdefault("export", {}).update(ppl)
    if tasks is not None:
        shots = "default" if tasks["num_fewshot"] is None else tasks["num_fewshot"]
        record.setdefault("lm_eval", {})[f"{task_names} | shots={shots} | limit={tasks['limit']}"] = tasks
    temp = record_file.with_name(f".{RECORD_FILE}.tmp")
    try:
        temp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        temp.replace(record_file)
    except OSError as error:
        log.warning("could not update %s (%s); the results are printed above", record_file, error)
        return None
    return record_file


def weights_size_mb(directory: str | Path) -> float | None:
    """Size of the weight files of a model directory in MiB (None when it is not a local directory)."""
    path = Path(directory)
    if not path.is_dir():
        return None
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    return round(total / 2**20, 2)


def describe(directory: str | Path | None, record: dict[str, Any] | None) -> tuple[str, str, str, float | None]:
    """(method, scheme, format, quantize seconds) from a run record; a float model is ('float', 'fp', ...)."""
    if record is None:
        return "float", "-", "hf", None
    from lowbit.scheme import QuantScheme

    config = record.get("config") or {}
    try:
        scheme = QuantScheme.from_dict(config.get("scheme") or {}).name
    except (LowbitError, TypeError):
        scheme = "?"
    seconds = (record.get("timings") or {}).get("quantize_seconds")
    return str(config.get("recipe", "?")), scheme, str(record.get("format", "fake")), seconds


def _task_score(task: dict[str, Any]) -> float | None:
    for metric in ("acc", "acc_norm", "exact_match", "word_perplexity"):
        if metric in task:
            return task[metric]
    return None


def evaluate_output(
    model_ref: str | None,
    *,
    ppl: list[str],
    seqlen: int,
    windows: int | None,
    tasks: list[str],
    lm_eval_settings: dict[str, Any],
    progress: bool = True,
    label: str | None = None,
    kernel: Kernel = "auto",
) -> CompareRow:
    """Load one output (None: the embedded default float model), evaluate it, and release it.

    `kernel` is the packed runtime's matmul for packed exports (lowbit.load).
    """
    from lowbit.data import eval_label, load_eval
    from lowbit.eval.perplexity import perplexity
    from lowbit.models import load_model
    from lowbit.runtime.load import load

    record = read_record(model_ref) if model_ref is not None else None
    method, scheme, fmt, seconds = describe(model_ref, record)
    loaded = load(model_ref, kernel=kernel) if model_ref is not None else load_model(None)
    size = weights_size_mb(loaded.path)
    row = CompareRow(label or (Path(model_ref).name if model_ref else "float"), method, scheme, fmt, size, seconds)
    row.plan = (record or {}).get("mixed_precision")
    for name in ppl:
        data = load_eval(loaded.tokenizer, name)
        result = perplexity(loaded.model, data.input_ids, seqlen=seqlen, max_windows=windows, progress=progress)
        row.ppl[eval_label(name, data.meta)] = round(result.ppl, 4)
    if tasks:
        from lowbit.eval.lmeval import evaluate_tasks

        entry = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, progress=progress, **lm_eval_settings)
        row.tasks = {name: _task_score(task) for name, task in entry["tasks"].items()}
        row.lm_eval_batch_sizes = entry["batch_sizes_used"]
        if entry.get("average_acc") is not None and len(entry["tasks"]) > 1:
            row.tasks["avg acc"] = entry["average_acc"]
    del loaded
    gc.collect()
    log.info("evaluated %s: %s", row.name, row.to_dict())
    return row


def _columns(rows: list[CompareRow]) -> tuple[list[str], list[list[str]]]:
    ppl_names = list(dict.fromkeys(name for row in rows for name in row.ppl))
    task_names = list(dict.fromkeys(name for row in rows for name in row.tasks))
    header = ["output", "method", "scheme", "format", "weights MiB", *[f"ppl {n}" for n in ppl_names]]
    header += [*task_names, "quantize s"]

    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    body = []
    for row in rows:
        line = [row.name, row.method, row.scheme, row.format, cell(row.size_mb, ".1f")]
        line += [cell(row.ppl.get(n), ".3f") for n in ppl_names]
        line += [cell(row.tasks.get(n), ".4f") for n in task_names]
        line.append(cell(row.quantize_seconds, ".1f"))
        body.append(line)
    return header, body


def format_plans(rows: list[CompareRow]) -> str:
    """The heat map (blocks x linears, bits) of every row with a mixed-precision plan, as text; "" when none."""
    from lowbit.eval.plan_map import plan_grid, text_heatmap

    maps = []
    for row in rows:
        grid = plan_grid(row.plan) if row.plan else None
        if grid is not None:
            maps.append(f"{row.name}: {text_heatmap(grid)}")
    return "\n\n".join(maps)


def format_table(rows: list[CompareRow], *, markdown: bool = False) -> str:
    """The comparison as aligned plain text, or as a Markdown table."""
    header, body = _columns(rows)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in [header, *body])
