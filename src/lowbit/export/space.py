"""How big an export will be, and whether its filesystem has room: checked before any work, not after hours."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)

MARGIN_BYTES = 64 * 2**20  # tokenizer, config, run record and filesystem overhead
MARGIN_FACTOR = 1.05


def format_bytes(n: int | float) -> str:
    """1234567 -> '1.2 MiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # unreachable; keeps type checkers calm


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (where a new directory would be created)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or its nearest existing ancestor); None when unknown."""
    try:
        return shutil.disk_usage(nearest_existing(Path(path))).free
    except OSError:
        return None


def _quantized_weights(model: nn.Module) -> list[nn.Parameter]:
    """The block-linear weights the engine quantizes (empty when the family is unknown)."""
    from lowbit.arch import arch_for

    try:
        arch = arch_for(model)
    except LowbitError:
        return []
    return [linear.weight for block in arch.blocks(model) for linear in arch.linears(block).values()]


def estimate_export_bytes(model: nn.Module, scheme: QuantScheme, fmt: str) -> int:
    """Bytes the export's tensors will take (tied weights once); the config and tokenizer are in the margin.

    fake: every float parameter at its dtype size. Packed: bits/8 per quantized weight plus a scale and a zero per
    group (and g_idx for GPTQ), and the float remainder (embeddings, norms, biases, an untied lm_head).
    """
    params = list(model.parameters())  # deduplicated: a tied lm_head counts once
    if fmt == "fake":
        return sum(p.numel() * p.element_size() for p in params if p.is_floating_point())
    quantized = {id(w): w for w in _quantized_weights(model)}
    total = sum(p.numel() * p.element_size() for p in params if p.is_floating_point() and id(p) not in quantized)
    for weight in quantized.values():
        m, k = weight.shape
        groups = scheme.num_groups(k)
        scale_size = 2 if fmt == "gptq" else torch.empty((), dtype=weight.dtype).element_size()
        total += m * k * scheme.bits // 8 + m * groups * scale_size + -(-m * groups * scheme.bits // 8)
        if fmt == "gptq":
            total += 4 * k
    return int(total)


def check_free_space(out: str | Path, needed_bytes: int) -> None:
    """Refuse, before any work, an --out whose filesystem has less than the export plus a margin free."""
    where = nearest_existing(Path(out).expanduser().parent)
    free = free_bytes(where)
    if free is None:
        log.debug("cannot tell the free space at %s; skipping the check", where)
        return
    required = int(needed_bytes * MARGIN_FACTOR) + MARGIN_BYTES
    if free < required:
        raise LowbitError(
            f"not enough free space for '{out}': the export needs about {format_bytes(needed_bytes)} (plus a "
            f"{format_bytes(MARGIN_BYTES)} margin) but '{where}' has {format_bytes(free)} free; free some space or "
            "choose an --out on another disk"
        )
