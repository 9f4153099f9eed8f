"""Block training, written once: functional block forward, sampling, block MSE, snapshot/restore, and
the epoch loop that OmniQuant and DESV share (SignRound uses the same pieces with its own SignSGD loop).

A method supplies a `Trainable`: its parameter groups and a function that forms the block's parameters (weights,
norms, biases) from its trainable tensors. The loop runs the block functionally on the cached inputs, compares with
the cached float targets, steps AdamW, restores the last finite parameters when a loss goes NaN/Inf, and records the
per-epoch loss curve.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lowbit.engine.offload import Chain
from lowbit.engine.precision import Forward, autocast
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


def block_forward(block: nn.Module, prefix: dict[str, str], kwargs: dict, compile: bool = False) -> Forward:
    """A function (tensors by key, hidden) -> block output, with `prefix[key]` parameters swapped in; with
    `compile`, the function compiled by torch.compile (its elementwise ops fused, forward and backward).

    Blocks of one model share the compiled code: dynamo guards on the block's structure, not on its identity, so
    only the first block (and a block of another shape or kind) pays the compile."""

    def run(weights: dict[str, Tensor], hidden: Tensor) -> Tensor:
        params = {prefix[name]: weight for name, weight in weights.items()}
        out = functional_call(block, params, (hidden,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    return torch.compile(run, dynamic=False) if compile else run


class IndexSampler:
    """Shuffled sweeps without replacement; reshuffle when fewer than `batch_size` indices remain (SignRound)."""

    def __init__(self, indices: Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.indices = indices
        self.batch_size = min(batch_size, len(indices))
        self.generator = generator
        self.order = self._shuffle()
        self.position = 0

    def _shuffle(self) -> Tensor:
        return self.indices[torch.randperm(len(self.indices), generator=self.generator)]

    def next(self) -> Tensor:
        if self.position + self.batch_size > len(self.order):
            self.order = self._shuffle()
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch


def block_mse(output: Tensor, target: Tensor, mask_last_token: bool = False, denominator: int | None = None) -> Tensor:
    """Sum of squared errors over unmasked positions / `denominator` (default: all elements, masked included)."""
    diff = output.float() - target.float()
    if mask_last_token:
        diff = diff[:, :-1]
    total = target.numel() if denominator is None else denominator
    return diff.pow(2).sum() / total


def snapshot(params: Sequence[Tensor]) -> list[Tensor]:
    """Detached copies of the trainable tensors (best-iteration or last-finite state)."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """Copy a snapshot back into the trainable tensors, in place."""
    for param, value in zip(params, saved, strict=True):
        param.copy_(value)


class Trainable(Protocol):
    """What a method hands to `train_epochs`: its tensors and how they form the block's parameters."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: {"params": [...], "lr": float, "name": str}."""
        ...

    def block_params(self) -> dict[str, Tensor]:
        """Block parameter name -> tensor, differentiable w.r.t. the trainable tensors (temporary weights)."""
        ...

    def after_step(self) -> None:
        """Project the tensors back onto their domain after an optimizer step (masks, floors)."""
        ...


@dataclass
class EpochSettings:
    """The epoch loop of OmniQuant (and DESV): samples in order, `batch_size` per AdamW step."""

    epochs: int
    batch_size: int = 1
    aug_loss: bool = False
    autocast: str = "off"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class EpochRecord:
    """What training one block did: mean loss per epoch, the non-finite event if any, timings."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    nonfinite_at: int | None = None
    seconds: float = 0.0

    def to_metrics(self) -> dict[str, Any]:
        return {
            "epoch_losses": [round(x, 8) for x in self.epoch_losses],
            "steps": self.steps,
            "nonfinite_step": self.nonfinite_at,
            "train_seconds": round(self.seconds, 3),
            "step_ms": round(1000 * self.seconds / max(self.steps, 1), 2),
        }


def make_optimizer(trainable: Trainable, settings: EpochSettings) -> torch.optim.AdamW:
    """AdamW over the method's groups; weight decay set explicitly in every group (torch's default is 0.01)."""
    groups = [{**group, "weight_decay": settings.weight_decay} for group in trainable.parameter_groups()]
    return torch.optim.AdamW(groups, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive batches in sample order; a last partial batch is dropped, as the reference does."""
    for start in range(0, n - batch_size + 1, batch_size):
        yield slice(start, start + batch_size)


def train_epochs(
    trainable: Trainable,
    forward: Forward,
    inputs: Chain,
    targets: Chain,
    aug_targets: Chain | None,
    settings: EpochSettings,
    *,
    device: torch.device,
    quant_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: Callable[[int, float], None] | None = None,
) -> EpochRecord:
    """MSE(block(q_in[j]), fp_out[j]) (+ MSE to `aug_targets`), AdamW, epochs over the samples in order.

    `quant_context` wraps every forward (activation quantization of W-A schemes). A non-finite loss stops training
    and restores the parameters of the last finite step. With fp16 autocast a GradScaler scales the loss.
    """
    record = EpochRecord()
    params = [p for group in trainable.parameter_groups() for p in group["params"]]
    if settings.epochs == 0 or not params:
        return record
    optimizer = make_optimizer(trainable, settings)
    scaler = torch.amp.GradScaler(device.type) if settings.autocast == "fp16" else None
    started = time.perf_counter()
    last_finite = snapshot(params)
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for part in _batches(inputs.shape[0], settings.batch_size):
            x = inputs[part].to(device)
            with autocast(settings.autocast, device), quant_context():
                out = forward(trainable.block_params(), x)
                loss = torch.nn.functional.mse_loss(out.float(), targets[part].to(device).float())
                if aug_targets is not None:
                    loss = loss + torch.nn.functional.mse_loss(out.float(), aug_targets[part].to(device).float())
            value = float(loss.detach())
            if not math.isfinite(value) and record.steps == 0:
                raise LowbitError(
                    "the quantized block's loss is NaN/Inf before any training step: its initial transform "
                    "overflows; check the model's weights for extreme values, or try without LET "
                    "(--opt omniquant.let=false)"
                )
            if not math.isfinite(value):
                restore(params, last_finite)
                record.nonfinite_at = record.steps
                log.warning("non-finite block loss at step %d: restored the last finite parameters", record.steps)
                break
            last_finite = snapshot(params)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            trainable.after_step()
            record.steps += 1
            total, count = total + value, count + 1
            if progress is not None:
                progress(record.steps, value)
        if count:
            record.epoch_losses.append(total / count)
        if record.nonfinite_at is not None:
            break
    if record.nonfinite_at is None and not all(bool(torch.isfinite(p).all()) for p in params):
        restore(params, last_finite)  # the last step's update itself overflowed (finite loss, non-finite grads)
        record.nonfinite_at = record.steps
        log.warning("non-finite parameters after step %d: restored the last finite parameters", record.steps)
    record.seconds = time.perf_counter() - started
    return record
