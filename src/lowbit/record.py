"""The run record: what produced a result, so two runs can be compared and reproduced."""

from __future__ import annotations

import math
import platform
import resource
import sys
from collections.abc import Sequence
from importlib import metadata

import torch


def package_versions() -> dict[str, str]:
    """Versions of lowbit and the libraries that change numbers."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("lowbit", "torch", "transformers", "safetensors", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def determinism_record() -> dict[str, object]:
    """What limits byte-identical reruns: results are bit-reproducible for the same inputs, seed, versions and
    these settings (BLAS reductions may be ordered differently under another thread count or CPU)."""
    return {
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def loss_trace(losses: Sequence[float], max_points: int = 100) -> list[list[float]]:
    """[[step, loss], ...] for the run record's loss curves: at most `max_points` evenly spaced steps (first and
    last always kept), 6 significant digits, non-finite losses left out, so a record stays small."""
    n = len(losses)
    if n == 0:
        return []
    steps = range(n) if n <= max_points else sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return [[step, float(f"{losses[step]:.6g}")] for step in steps if math.isfinite(losses[step])]
