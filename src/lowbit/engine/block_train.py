"""Block training, written once: functional block forward, sampling, block MSE, snapshot/restore, and
the epoch loop that OmniQuant and DESV share (SignRound uses the same pieces with its own SignSGD loop, block-wise
TEQ with its Adam schedule).

Data-parallel, the same for all of them: batches are drawn in global sample indices (every rank draws what one
process draws), each rank's loss is its samples' share of the batch's MSE (`share_mse`), and `sum_over_ranks` adds
the losses and the gradients over the ranks in rank order before the optimizer step, so every rank steps alike.

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

from lowbit.distributed.group import Group
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


def share_mse(output: Tensor, target: Tensor, elements: int, group: Group) -> Tensor:
    """This rank's share of a batch's mean squared error: F.mse_loss in one process (its bytes unchanged), and the
    sum of squares over `elements` (the whole batch's count) on several ranks, so the shares add up to the MSE."""
    if not group.distributed:
        return torch.nn.functional.mse_loss(output.float(), target.float())
    return block_mse(output, target, denominator=elements)


def sum_over_ranks(
    group: Group, loss: float, grads: Sequence[Tensor | None], like: Sequence[Tensor]
) -> tuple[float, list[Tensor | None]]:
    """`loss` and the gradients `grads` (of the tensors `like`) summed over the ranks in rank order, the gradients
    in fp32 and in one collective (flattened together). A rank whose samples missed a tensor (or the whole batch)
    adds zeros; a tensor no rank reached keeps no gradient, as in one process (AdamW and SignSGD then skip it)."""
    gathered = group.gather_objects((loss, [grad is not None for grad in grads]))
    total = sum(value for value, _ in gathered)
    anywhere = [any(flags[i] for _, flags in gathered) for i in range(len(grads))]
    parts = [
        (torch.zeros_like(ref, dtype=torch.float32) if grad is None else grad.float()).reshape(-1)
        for grad, ref, used in zip(grads, like, anywhere, strict=True)
        if used
    ]
    if not parts:
        return total, [None] * len(grads)
    pieces = iter(group.sum(torch.cat(parts)).split([part.numel() for part in parts]))
    return total, [next(pieces).view(ref.shape) if used else None for ref, used in zip(like, anywhere, strict=True)]


def backward_over_ranks(
    group: Group, loss: Tensor | None, params: Sequence[Tensor], scaler: torch.amp.GradScaler | None = None
) -> float:
    """Backward this rank's share of a batch's loss (None: it holds none of the batch) into `params`, then, on
    several ranks, replace every gradient by its sum over the ranks; returns the batch's (summed) loss. Every rank
    then holds the same gradients and takes the same optimizer step (fp16: the scaled gradients are summed, so the
    GradScaler's inf check sees the same sum everywhere)."""
    value = 0.0 if loss is None else float(loss.detach())
    if loss is not None:
        (loss if scaler is None else scaler.scale(loss)).backward()
    elif scaler is not None:
        scaler.scale(torch.zeros((), device=params[0].device))  # the scaler's state starts on its first scale
    if not group.distributed:
        return value
    value, grads = sum_over_ranks(group, value, [p.grad for p in params], params)
    for param, grad in zip(params, grads, strict=True):
        param.grad = None if grad is None else grad.to(param.dtype)
    return value


def backward_through_leaves(
    group: Group,
    loss: Tensor | None,
    weights: dict[str, Tensor],
    leaves: dict[str, Tensor],
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Data-parallel backward of a trainer whose block forward ran on `leaves`, detached copies of `weights` (the
    block parameters a method forms from its trainable tensors): this rank's share of the batch's loss (None: none
    of the batch here) is backpropagated to the leaves, the leaves' gradients are summed over the ranks, and every
    rank backpropagates the same sum from `weights` into the trainable tensors; returns the batch's loss.

    Why at the leaves and not at the trainable tensors: LET-like scales are equivalences, so their gradient is a
    near-cancellation of large terms (the exact function does not depend on them; only the quantization does), and
    its rounding noise is of the size of the gradient itself. Summing each rank's cancelled gradient adds N such
    noises; one process cancels once, on the summed weight gradient, and so does every rank here."""
    value = 0.0 if loss is None else float(loss.detach())
    if loss is not None:
        (loss if scaler is None else scaler.scale(loss)).backward()
    elif scaler is not None:
        scaler.scale(torch.zeros((), device=next(iter(weights.values())).device))  # its state starts on a first scale
    names = [name for name, weight in weights.items() if weight.requires_grad]
    value, grads = sum_over_ranks(group, value, [leaves[name].grad for name in names], [leaves[name] for name in names])
    reached = [(weights[n], g.to(weights[n].dtype)) for n, g in zip(names, grads, strict=True) if g is not None]
    if reached:
        torch.autograd.backward(*zip(*reached, strict=True))
    return value


def detached_leaves(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The block parameters a data-parallel forward runs on: detached copies of those that carry a gradient."""
    return {name: w.detach().requires_grad_() if w.requires_grad else w for name, w in weights.items()}


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
    """The epoch loop of OmniQuant (and DESV): samples in order (global indices), `batch_size` per AdamW step."""

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
    group: Group | None = None,
) -> EpochRecord:
    """MSE(block(q_in[j]), fp_out[j]) (+ MSE to `aug_targets`), AdamW, epochs over the samples in order.

    `quant_context` wraps every forward (activation quantization of W-A schemes). A non-finite loss stops training
    and restores the parameters of the last finite step. With fp16 autocast a GradScaler scales the loss.

    Data-parallel (`group` of several ranks): `inputs`, `targets` and `aug_targets` are this rank's contiguous slice
    of the samples; the batches are cut from all ranks' samples in order, as one process cuts them, each rank adds
    its share of a batch's loss, and the losses and the block parameters' gradients are summed over the ranks before
    they reach the trainable tensors (`backward_through_leaves`), so every rank steps alike and meets a non-finite
    loss at the same step.
    """
    group = Group() if group is None else group
    record = EpochRecord()
    params = [p for g in trainable.parameter_groups() for p in g["params"]]
    if settings.epochs == 0 or not params:
        return record
    optimizer = make_optimizer(trainable, settings)
    scaler = torch.amp.GradScaler(device.type) if settings.autocast == "fp16" else None
    count_here = inputs.shape[0]
    start, total_samples = group.offset(count_here)
    per_sample = math.prod(targets.shape[1:])
    started = time.perf_counter()
    last_finite = snapshot(params)
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for batch in _batches(total_samples, settings.batch_size):
            lo, hi = max(batch.start - start, 0), min(batch.stop - start, count_here)  # this rank's part of it
            part = slice(lo, hi)
            loss = None
            weights = trainable.block_params()
            leaves = detached_leaves(weights) if group.distributed else weights
            if hi > lo:
                x = inputs[part].to(device)
                elements = (batch.stop - batch.start) * per_sample
                with autocast(settings.autocast, device), quant_context():
                    out = forward(leaves, x)
                    loss = share_mse(out, targets[part].to(device), elements, group)
                    if aug_targets is not None:
                        loss = loss + share_mse(out, aug_targets[part].to(device), elements, group)
            optimizer.zero_grad(set_to_none=True)
            if group.distributed:
                value = backward_through_leaves(group, loss, weights, leaves, scaler)
            else:
                value = backward_over_ranks(group, loss, params, scaler)
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
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
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
