"""What the machine has and what a process uses: the memory available to a run (psutil and the cgroup limit), free
accelerator memory, and this process's peak and current RSS for the run record.

Why apart from the planner: the run record wants the RSS readers without the estimate, and the planner's tests
want to feed the cgroup reader fake files.
"""

from __future__ import annotations

import resource
from pathlib import Path

import psutil
import torch


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_available(cgroup_file: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 memory.max, else v1 memory.limit_in_bytes), counting
    inactive file pages as free as the kernel would reclaim them; None when no limit is set."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            candidates = [root / rel, root]
            files = ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):
            candidates = [root / "memory" / rel, root / "memory"]
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")
        else:
            continue
        for directory in candidates:
            limit = _read_int(directory / files[0])
            if limit is None or limit >= 2**60:
                continue
            usage = _read_int(directory / files[1]) or 0
            inactive = _stat_value(directory / files[2], files[3])
            return max(limit - max(usage - inactive, 0), 0)
    return None


def available_memory() -> int:
    """Bytes this process can still use: the smaller of psutil's available memory and the cgroup's headroom."""
    available = int(psutil.virtual_memory().available)
    limited = cgroup_available()
    return available if limited is None else min(available, limited)


def gpu_free(device: str) -> int | None:
    if not torch.cuda.is_available():
        return None
    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError):
        return None
    return int(free)


def peak_rss_phases(pid: int | str = "self") -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile in MiB from /proc/<pid>/status (peak, current, anonymous, file-backed: the
    run record separates what the run allocated from mapped checkpoint pages); ru_maxrss where /proc is missing."""
    keys = {"VmHWM": "peak_rss_mib", "VmRSS": "rss_mib", "RssAnon": "rss_anon_mib", "RssFile": "rss_file_mib"}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            out[keys[name]] = round(int(value.split()[0]) / 1024, 1)  # kB
    return out


class MemoryPhases:
    """Snapshots of `peak_rss_phases` under phase names (load, block 3, export, ...), for the run record."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    def mark(self, name: str) -> dict[str, float]:
        self.phases[name] = snapshot = peak_rss_phases()
        return snapshot

    def to_dict(self) -> dict[str, dict[str, float]]:
        return dict(self.phases)
