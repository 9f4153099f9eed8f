"""The run record: what produced a result, so two runs can be compared and reproduced."""

from __future__ import annotations

import platform
import resource
import sys
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
