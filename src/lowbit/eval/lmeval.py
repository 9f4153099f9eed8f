"""Zero/few-shot tasks through lm-eval on the model lowbit already holds (docs/methods.md).

The loaded torch model (a fake export, a packed export on lowbit's runtime, a W-A model with its activation
quantizers installed, or a float model) is wrapped in lm-eval's own `HFLM`, so requests, batching and scoring are
lm-eval's: a fake export scores exactly what `lm_eval --model hf` gives on its directory. The offline tasks that
ship in `lowbit/eval/tasks` (`lowbit_mc`, `lowbit_cloze`, `lowbit_yesno`; group `lowbit_offline` = mc + cloze) are
always registered; hub tasks (arc_easy, piqa, ...) work when the hub is reachable or their data is cached.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.data import hub_reachable
from lowbit.engine.memory import available_memory
from lowbit.errors import LowbitError, first_line

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_TASKS = ("lowbit_mc", "lowbit_yesno", "lowbit_cloze")
OFFLINE_GROUP = "lowbit_offline"
_METRICS = ("acc", "acc_norm", "word_perplexity", "perplexity", "exact_match", "f1", "mcc")
AUTO_BATCH = "auto"
MAX_BATCH_SIZE = 64  # where "auto" starts its search, halving on out-of-memory (HFLM's own default)
LOGIT_COPIES = 3  # logits, their log_softmax and a temporary: what one detection forward holds per token x vocab
BATCH_SIZE_FORMS = "auto, auto:N (re-detected N times as the requests get shorter) or a positive integer"


def lm_eval_version() -> str:
    """The installed lm-eval version, or a LowbitError telling how to install the pinned one."""
    try:
        return metadata.version("lm-eval")
    except metadata.PackageNotFoundError:
        raise LowbitError("lm-eval tasks need the eval extra: pip install 'lowbit[eval]'") from None


def parse_batch_size(value: int | str) -> int | str:
    """lm-eval's batch size: "auto" / "auto:N" (its own detection, kept as lm-eval spells it) or an int >= 1.

    Checked here so a typo fails before a model loads rather than inside lm-eval after it."""
    text = str(value).strip().lower()
    if text == AUTO_BATCH:
        return AUTO_BATCH
    if text.startswith(f"{AUTO_BATCH}:"):
        schedule = text.partition(":")[2]
        if schedule.isdigit() and int(schedule) >= 1:
            return f"{AUTO_BATCH}:{int(schedule)}"
    elif text.isdigit() and int(text) >= 1:
        return int(text)
    raise LowbitError(f"batch size '{value}' is not {BATCH_SIZE_FORMS}; e.g. --batch-size auto or --batch-size 8")


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'arc_easy, piqa' or a list -> task names (empty entries dropped)."""
    parts = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [part.strip() for part in parts if part.strip()]
    if not names:
        raise LowbitError("--tasks names no task; e.g. --tasks lowbit_offline or --tasks arc_easy,piqa")
    return names


def task_manager(include_path: str | Path | None = None, tasks: Sequence[str] | None = None) -> Any:
    """lm-eval's TaskManager with lowbit's offline tasks (and a user's task directory) registered.

    Indexing lm-eval's own few thousand task files takes seconds; when `tasks` names only lowbit's offline tasks
    they are skipped. Reuse one manager across models (`lowbit compare`).
    """
    lm_eval_version()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path is not None else [])
    defaults = tasks is None or not set(tasks) <= {*OFFLINE_TASKS, OFFLINE_GROUP}
    return TaskManager(include_path=paths, include_defaults=defaults)


def _not_custom_dataset_hint(record: logging.LogRecord) -> bool:
    """lm-eval warns on every task with a `custom_dataset` (ours) about `--metadata`, which they do not use."""
    return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _offline_when_hub_unreachable(names: Sequence[str]) -> Iterator[None]:
    """Hub tasks with no hub: datasets/huggingface_hub offline mode for the call, so a cached dataset still loads
    and a missing one fails at once (instead of ~40 s of retries) with the error lowbit turns into its message."""
    if set(names) <= {*OFFLINE_TASKS, OFFLINE_GROUP} or hub_reachable():
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    modules = (datasets.config, huggingface_hub.constants)
    saved = [module.HF_HUB_OFFLINE for module in modules]
    for module in modules:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            module.HF_HUB_OFFLINE = value


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Without progress: lm-eval's bars (written to stderr) and its info logs are dropped; warnings stay."""
    lm_logger, task_logger = logging.getLogger("lm_eval"), logging.getLogger("lm_eval.api.task")
    level = lm_logger.level
    if not progress:
        lm_logger.setLevel(logging.WARNING)
    task_logger.addFilter(_not_custom_dataset_hint)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext():
            yield
    finally:
        lm_logger.setLevel(level)
        task_logger.removeFilter(_not_custom_dataset_hint)


def wrap_model(model: nn.Module, tokenizer: Any, *, batch_size: int | str = AUTO_BATCH) -> Any:
    """lm-eval's HFLM around an already loaded model and its tokenizer (no reload, no device move).

    `batch_size` goes to HFLM as lm-eval's own (so "auto" detects exactly as `lm_eval --batch_size auto`); every
    size its detection picks is appended to the returned model's `detected_batch_sizes`, for the record."""
    lm_eval_version()
    from lm_eval.models.huggingface import HFLM

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its "pretrained is not a str" warning is exactly what we mean to do
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=parse_batch_size(batch_size),
                  max_batch_size=MAX_BATCH_SIZE)  # fmt: skip
    finally:
        hf_logger.setLevel(level)
    lm.detected_batch_sizes = []
    detect, start = lm._detect_batch_size, lm.max_batch_size

    def recorded(requests: Sequence | None = None, pos: int = 0) -> int:
        if lm.device.type == "cpu":  # on CPU an oversized try is not an OOM error lm-eval can catch, but a kill
            tokens = lm.max_length if not requests else min(lm.max_length, len(requests[pos][1] + requests[pos][2]))
            lm.max_batch_size = cpu_batch_cap(tokens, lm.model.config.vocab_size, available_memory(), start)
        size = detect(requests, pos)
        lm.detected_batch_sizes.append(int(size))
        return size

    lm._detect_batch_size = recorded
    return lm


def cpu_batch_cap(tokens: int, vocab: int, available: int, start: int = MAX_BATCH_SIZE) -> int:
    """The batch size "auto" may start from on CPU: `start` halved until a detection forward's logits
    (LOGIT_COPIES x batch x tokens x vocab fp32) fit in half of the `available` bytes; at least 1.

    lm-eval's detection halves on an out-of-memory error, which CUDA raises; on Linux an oversized CPU allocation
    is granted and the process is killed when it touches the pages, so the start must already fit."""
    batch = start
    while batch > 1 and LOGIT_COPIES * batch * tokens * vocab * 4 > available // 2:
        batch //= 2
    return batch


def batch_sizes_used(lm: Any) -> list[int]:
    """The batch sizes lm-eval ran with: the fixed size, or what "auto" detected (sorted, distinct)."""
    if isinstance(lm.batch_size, int):
        return [lm.batch_size]
    return sorted(set(lm.detected_batch_sizes))


@contextlib.contextmanager
def _stdout_to_log() -> Iterator[None]:
    """lm-eval prints its batch size detection to stdout; lowbit's stdout is its results, so log those lines."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.info("lm-eval: %s", line.strip())


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = AUTO_BATCH,
    seed: int = 1234,
    include_path: str | Path | None = None,
    progress: bool = True,
    manager: Any = None,
) -> dict[str, Any]:
    """Run lm-eval tasks on `model`; returns the record entry (scores per task, average acc, settings, versions).

    `limit` caps the documents per task (lm-eval's meaning: < 1 is a fraction); `batch_size` is lm-eval's ("auto",
    "auto:N" or an int; the sizes it ran with are recorded as `batch_sizes_used`); `seed` seeds lm-eval's samplers;
    `manager` is a `task_manager()` to reuse (built here when None).
    """
    import lm_eval

    names = parse_tasks(tasks)
    batch_size = parse_batch_size(batch_size)
    manager = manager if manager is not None else task_manager(include_path, names)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise LowbitError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; offline tasks shipped with lowbit: "
            f"{', '.join((*OFFLINE_TASKS, OFFLINE_GROUP))} (hub tasks such as arc_easy need the hub)"
        )
    started = time.perf_counter()
    with _quiet(progress), _offline_when_hub_unreachable(names), _stdout_to_log():
        lm = wrap_model(model, tokenizer, batch_size=batch_size)
        try:
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (ConnectionError, OSError) as error:
            raise LowbitError(
                f"lm-eval could not load a task's data ({first_line(error)}); the hub is not reachable and the "
                "dataset is not in the local cache: run where the hub is reachable once, or offline use "
                f"--tasks {OFFLINE_GROUP} (or your own YAML tasks with --task-dir)"
            ) from error
    entry = summarize(raw)
    entry.update(
        {
            "lm_eval_version": lm_eval_version(),
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "batch_sizes_used": batch_sizes_used(lm),
            "seed": seed,
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    return entry


def _scores(values: dict[str, Any]) -> dict[str, float]:
    """{'acc,none': x, 'acc_stderr,none': s} -> {'acc': x, 'acc_stderr': s} for the metrics lowbit reports."""
    scores = {}
    for key, value in values.items():
        metric, _, _filter = key.partition(",")
        base = metric.removesuffix("_stderr")
        if base in _METRICS and isinstance(value, int | float):
            scores[metric] = round(float(value), 6)
    return scores


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's result dict -> {tasks: {name: scores + version, shots, samples}, groups, average_acc}."""
    groups = set(raw.get("groups", {})) | set(raw.get("group_subtasks", {}))
    tasks, group_scores = {}, {}
    for name, values in raw["results"].items():
        scores = _scores(values)
        if name in groups:
            group_scores[name] = scores
            continue
        samples = (raw.get("n-samples") or {}).get(name) or {}
        tasks[name] = {
            **scores,
            "version": (raw.get("versions") or {}).get(name),
            "n_shot": (raw.get("n-shot") or {}).get(name),
            "samples": samples.get("effective"),
        }
    accs = [task["acc"] for task in tasks.values() if "acc" in task]
    return {
        "tasks": tasks,
        "groups": group_scores,
        "average_acc": round(sum(accs) / len(accs), 6) if accs else None,
    }


def format_scores(entry: dict[str, Any]) -> list[str]:
    """One line per task (acc and acc_norm when present), the average and what "auto" batched with, for printing."""
    lines = []
    for name, task in entry["tasks"].items():
        parts = [f"{metric} {task[metric]:.4f}" for metric in ("acc", "acc_norm") if metric in task]
        if not parts:
            parts = [f"{k} {v:.4f}" for k, v in task.items() if k in _METRICS]
        lines.append(f"{name} ({task['n_shot']}-shot, {task['samples']} docs): " + ", ".join(parts))
    if entry.get("average_acc") is not None and len(entry["tasks"]) > 1:
        lines.append(f"average acc over {len(entry['tasks'])} tasks: {entry['average_acc']:.4f}")
    used = entry.get("batch_sizes_used")
    if used and not isinstance(entry.get("batch_size"), int):
        lines.append(f"lm-eval batch size {entry['batch_size']}: ran with {', '.join(map(str, used))}")
    return lines
