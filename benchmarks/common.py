"""Shared benchmark plumbing: machine description, isolated timed runs, JSON and markdown output."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowbit.record import package_versions


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), **package_versions()}


def _child(target: Callable[..., dict], args: tuple, queue: multiprocessing.Queue) -> None:
    started = time.perf_counter()
    try:
        result = target(*args)
        result["process_seconds"] = round(time.perf_counter() - started, 2)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        queue.put(result)
    except BaseException as error:  # report, never hang the parent
        queue.put({"error": repr(error)})


def run_isolated(target: Callable[..., dict], *args: Any) -> dict:
    """Run `target(*args)` in a fresh process so its peak RSS is its own; returns its result dict."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(target, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))


def quantize_builtin(loaded: Any, recipe: str, scheme: str, settings: dict, options: dict) -> tuple[Any, float]:
    """lowbit.quantize on the builtin calibration text with the benchmark's nsamples/seqlen/seed; (result, seconds)."""
    import lowbit

    started = time.perf_counter()
    result = lowbit.quantize(
        loaded,
        recipe=recipe,
        scheme=scheme,
        dataset="builtin",
        nsamples=settings["nsamples"],
        seqlen=settings["seqlen"],
        seed=settings["seed"],
        options={"engine": {"progress": False}, **options},
    )
    return result, round(time.perf_counter() - started, 3)
