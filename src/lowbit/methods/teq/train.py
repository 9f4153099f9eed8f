"""Training utilities for TEQ: schedule, sample order, calibration loss, resumable checkpoints, checkpointing."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from lowbit.distributed.group import Group
from lowbit.errors import LowbitError


def linear_warmup_lr(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """transformers' linear schedule with warm-up: 0 -> peak over the warm-up steps, then linearly to 0."""
    warmup = int(total * warmup_fraction)
    if step < warmup:
        return peak * step / max(1, warmup)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def sample_index(draw: int, n: int, seed: int) -> int:
    """The draw-th sample of shuffled sweeps without replacement; a pure function of (draw, n, seed) so a resumed
    run sees exactly the samples the uninterrupted run would have seen."""
    epoch, position = divmod(draw, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return int(order[position])


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, device: torch.device) -> float:
    """Mean causal-LM cross-entropy over fixed calibration windows (how an initialisation is scored)."""
    losses = [model(input_ids=row[None].to(device), labels=row[None].to(device), use_cache=False).loss.item()
              for row in windows]  # fmt: skip
    return sum(losses) / len(losses)


def ranked_calibration_loss(
    model: nn.Module, windows: torch.Tensor, rows: range, mine: slice, device: torch.device, group: Group
) -> float:
    """`calibration_loss` of `windows[rows]` with each rank scoring the rows of its slice `mine`: the per-window
    losses summed over the ranks in rank order, then the mean (one process: `calibration_loss` itself)."""
    if not group.distributed:
        return calibration_loss(model, windows[rows.start : rows.stop], device)
    here = [row for row in rows if mine.start <= row < mine.stop]
    total = calibration_loss(model, windows[here], device) * len(here) if here else 0.0
    return sum(group.gather_objects(total)) / len(rows)


def share_state(group: Group, step: int, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Rank 0's training state (the step it resumes from, the scales, the optimizer's moments) on every rank, so a
    run resumed from rank 0's checkpoint continues alike everywhere; the step to continue from."""
    if not group.distributed:
        return step
    state = group.broadcast_object((step, [p.detach().cpu() for p in params], optimizer.state_dict()))
    if not group.is_main:
        with torch.no_grad():
            for param, value in zip(params, state[1], strict=True):
                param.copy_(value)
        optimizer.load_state_dict(state[2])
    return state[0]


class TrainingCheckpoint:
    """Scales + optimizer state + step, written atomically every few steps; a rerun of the same run resumes."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))

    @classmethod
    def at(cls, directory: str | Path | None, name: str, fingerprint: dict[str, Any]) -> TrainingCheckpoint | None:
        if directory is None:
            return None
        path = Path(directory).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path / f"{name}.pt", fingerprint)

    def restore(self, sets: list, optimizer: torch.optim.Optimizer) -> int:
        """Load a matching checkpoint into the scale sets and optimizer; returns the step to continue from."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=True)
        if json.loads(state["fingerprint"]) != self.fingerprint:
            raise LowbitError(
                f"checkpoint {self.path} was written by a run with other settings; delete it or choose another "
                "checkpoint_dir"
            )
        with torch.no_grad():
            for index, scale_set in enumerate(sets):
                for prev, param in scale_set.scales.items():
                    param.copy_(state["scales"][f"{index}/{prev}"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def save(self, step: int, sets: list, optimizer: torch.optim.Optimizer) -> None:
        scales = {f"{i}/{prev}": p.detach().clone() for i, s in enumerate(sets) for prev, p in s.scales.items()}
        state = {
            "step": step,
            "scales": scales,
            "optimizer": optimizer.state_dict(),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }
        temp = self.path.with_suffix(".tmp")
        torch.save(state, temp)
        os.replace(temp, self.path)


@contextlib.contextmanager
def CheckpointedBlocks(blocks: nn.ModuleList, enabled: bool) -> Iterator[None]:  # noqa: N802 (reads as a type)
    """Recompute each block's activations during backward instead of storing them (works in eval mode)."""
    if not enabled:
        yield
        return
    for block in blocks:
        block.forward = functools.partial(activation_checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
