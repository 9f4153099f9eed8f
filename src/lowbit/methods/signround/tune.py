"""SignRound's optimiser pieces: tunable parameters, SignSGD with linear decay, sampling, loss, one block's loop.

Kept apart from the stage so each piece is testable on its own (see docs/methods.md, SignRound).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.distributed.group import Group, local_indices
from lowbit.engine.block_train import IndexSampler, block_mse, restore, snapshot, sum_over_ranks
from lowbit.engine.offload import Chain
from lowbit.engine.precision import Forward, autocast_dtype, autocast_forward
from lowbit.errors import LowbitError
from lowbit.methods.signround.qdq import GroupedWeight, supports_fast_qdq
from lowbit.quantizer import QuantizedWeight, fake_quant, quantize_weight
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)

LOSS_SCALE = 1000.0  # the reference multiplies the loss by 1000 before backward; signs are unaffected


@dataclass
class TunedLinear:
    """One linear's trainable SignRound parameters: V per weight, alpha (max side) and beta (min side) per group."""

    name: str
    weight: Tensor
    scheme: QuantScheme
    v: Tensor
    alpha: Tensor
    beta: Tensor
    grouped: GroupedWeight | None = None

    @classmethod
    def wrap(cls, name: str, linear: nn.Linear, scheme: QuantScheme, fast: bool = True) -> TunedLinear:
        weight = linear.weight.detach().to(torch.float32).clone()
        m, k = weight.shape
        groups = scheme.num_groups(k)
        return cls(
            name=name,
            weight=weight,
            scheme=scheme,
            v=torch.zeros_like(weight, requires_grad=True),
            alpha=torch.ones(m, groups, requires_grad=True),
            beta=torch.ones(m, groups, requires_grad=True),
            grouped=GroupedWeight(weight, scheme) if fast and supports_fast_qdq(scheme) else None,
        )

    def parameters(self) -> list[Tensor]:
        return [self.v, self.alpha, self.beta]

    def qdq(self) -> Tensor:
        """The fake-quant weight; alpha and beta are clamped to [0, 1] on every forward, as the reference does.

        The fused path (asym) equals `fake_quant` bit for bit and has a closed-form backward.
        """
        if self.grouped is not None:
            return self.grouped.qdq(self.v, self.alpha, self.beta)
        return fake_quant(
            self.weight, self.scheme, v=self.v, gamma_hi=self.alpha.clamp(0, 1), gamma_lo=self.beta.clamp(0, 1)
        )

    def record(self) -> QuantizedWeight:
        """The export record; its dequantize() equals `qdq()` bit for bit."""
        with torch.no_grad():
            return quantize_weight(
                self.weight, self.scheme, v=self.v, gamma_hi=self.alpha.clamp(0, 1), gamma_lo=self.beta.clamp(0, 1)
            )


def linear_schedule(lr: float, iters: int) -> list[float]:
    """lr_t = lr * (1 - t / T) for t = 0..T-1 (LinearLR from factor 1 to 0, stepped once per iteration)."""
    return [lr * (1.0 - t / iters) for t in range(iters)]


@torch.no_grad()
def sign_step(params: Sequence[Tensor], lr: float) -> None:
    """theta <- theta - lr * sign(grad); no momentum, no weight decay; parameters without a gradient stay."""
    for param in params:
        if param.grad is not None:
            param.add_(param.grad.sign(), alpha=-lr)
            param.grad = None


@dataclass
class TuneSettings:
    """Everything the per-block loop needs, resolved from the stage options."""

    iters: int
    lr: float
    minmax_lr: float
    batch_size: int
    micro_batch_size: int
    use_best: bool = True
    clamp_v: bool = False
    mask_last_token: bool = False
    best_select: str = "minibatch"
    holdout: int = 16
    holdout_every: int = 10
    early_stop_patience: int = 0
    autocast: str = "off"  # block forward/backward precision (resolved); V, alpha, beta and the loss stay fp32


@dataclass
class TuneResult:
    """What happened in one block: the loss trace and the chosen iteration."""

    losses: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_iter: int = -1
    holdout_losses: dict[int, float] = field(default_factory=dict)
    stopped_at: int | None = None
    nonfinite_steps: int = 0  # NaN/Inf losses: never a best; sign(NaN) = 0 makes their update a no-op


def _snapshot(layers: Sequence[TunedLinear]) -> list[list[Tensor]]:
    return [snapshot(layer.parameters()) for layer in layers]


def _restore(layers: Sequence[TunedLinear], saved: list[list[Tensor]]) -> None:
    for layer, values in zip(layers, saved, strict=True):
        restore(layer.parameters(), values)


def tune_block(
    layers: Sequence[TunedLinear],
    forward: Forward,
    inputs: Chain,
    targets: Chain,
    train_indices: Tensor,
    holdout_indices: Tensor | None,
    settings: TuneSettings,
    generator: torch.Generator,
    progress: Callable[[int, float], None] | None = None,
    group: Group | None = None,
    start: int = 0,
) -> TuneResult:
    """SignSGD on V, alpha, beta against the block-output MSE; restores the best parameters.

    The QDQ weights depend only on the parameters, so they are computed once per iteration (fp32, outside autocast)
    and the micro-batch forwards use detached copies; their gradients are pushed through the QDQ graph once per
    iteration. With `settings.autocast` the block forward (and so its backward) runs in reduced precision; the
    gradients reach the fp32 copies through autocast's casts, and the loss is computed in fp32.

    Data-parallel (`group` of several ranks): `inputs` and `targets` are this rank's samples, global indices
    `start` onwards; the indices are global, so every rank draws the batch one process would draw, computes the
    loss on the samples of it that it holds, and the losses and the QDQ weights' gradients are summed over the
    ranks in rank order before the sign step and the best-iteration choice (the same on every rank).
    """
    group = Group() if group is None else group
    forward = autocast_forward(forward, settings.autocast, inputs.device)
    leaf_dtype = autocast_dtype(settings.autocast)  # the cast autocast would make in every linear, made once
    result = TuneResult()
    sampler = IndexSampler(train_indices, settings.batch_size, generator)
    v_schedule = linear_schedule(settings.lr, settings.iters)
    m_schedule = linear_schedule(settings.minmax_lr, settings.iters)
    best = None
    since_best = 0
    for t in range(settings.iters):
        with torch.enable_grad():
            qdq = [layer.qdq() for layer in layers]
        leaves = {layer.name: q.detach().to(leaf_dtype).requires_grad_() for layer, q in zip(layers, qdq, strict=True)}
        if holdout_indices is not None and t % settings.holdout_every == 0:
            mse = _holdout_mse(forward, leaves, inputs, targets, holdout_indices, settings, group, start)
            _check_holdout(result, t, mse)
        idx = sampler.next()
        elements = len(idx) * math.prod(targets.shape[1:])
        mine = local_indices(idx, start, inputs.shape[0]) if group.distributed else idx
        loss_t = 0.0
        for first in range(0, len(mine), settings.micro_batch_size):
            part = mine[first : first + settings.micro_batch_size]
            with torch.enable_grad():
                out = forward(leaves, inputs[part])
                loss = block_mse(out, targets[part], settings.mask_last_token, elements) * LOSS_SCALE
                loss.backward()
            loss_t += float(loss.detach())
        grads = {name: leaf.grad for name, leaf in leaves.items()}
        if group.distributed:  # the losses and gradients of every rank, in rank order (engine/block_train.py)
            names = list(grads)
            loss_t, summed = sum_over_ranks(group, loss_t, [grads[n] for n in names], [leaves[n] for n in names])
            grads = dict(zip(names, summed, strict=True))
        loss_t /= LOSS_SCALE
        result.losses.append(loss_t)
        result.nonfinite_steps += not math.isfinite(loss_t)
        improved = False
        if holdout_indices is None and loss_t < result.best_loss:
            result.best_loss, result.best_iter, improved = loss_t, t, True
        elif holdout_indices is not None and result.best_iter == t:
            improved = True
        if improved and settings.use_best:
            best = _snapshot(layers)
        since_best = 0 if improved else since_best + 1
        # a linear no sample reached (an MoE expert the router never picked) has no gradient: its parameters stay
        reached = [(q, grads[layer.name]) for layer, q in zip(layers, qdq, strict=True)]
        reached = [(q, grad.to(q.dtype)) for q, grad in reached if grad is not None]
        if reached:
            torch.autograd.backward(*zip(*reached, strict=True))
        for layer in layers:
            sign_step([layer.v], v_schedule[t])
            sign_step([layer.alpha, layer.beta], m_schedule[t])
            if settings.clamp_v:
                with torch.no_grad():
                    layer.v.clamp_(-0.5, 0.5)
        if progress is not None:
            progress(t, loss_t)
        if settings.early_stop_patience and since_best >= settings.early_stop_patience:
            result.stopped_at = t
            break
    if holdout_indices is not None and settings.iters > 0:
        with torch.no_grad():
            final = {layer.name: layer.qdq() for layer in layers}
        end = settings.iters if result.stopped_at is None else result.stopped_at + 1
        mse = _holdout_mse(forward, final, inputs, targets, holdout_indices, settings, group, start)
        if _check_holdout(result, end, mse):
            best = None  # the final parameters are the best: keep them
    if settings.use_best and best is not None:
        _restore(layers, best)
    return result


def _check_holdout(result: TuneResult, t: int, loss: float) -> bool:
    result.holdout_losses[t] = loss
    if loss < result.best_loss:
        result.best_loss, result.best_iter = loss, t
        return True
    return False


@torch.no_grad()
def _holdout_mse(
    forward: Forward,
    weights: dict[str, Tensor],
    inputs: Chain,
    targets: Chain,
    indices: Tensor,
    settings: TuneSettings,
    group: Group,
    start: int,
) -> float:
    """Block MSE on the fixed held-out samples (global indices; each rank's share summed over the ranks), in the
    same units as the minibatch loss."""
    elements = len(indices) * math.prod(targets.shape[1:])
    total = 0.0
    detached = {name: w.detach() for name, w in weights.items()}
    mine = local_indices(indices, start, inputs.shape[0]) if group.distributed else indices
    for first in range(0, len(mine), settings.micro_batch_size):
        part = mine[first : first + settings.micro_batch_size]
        out = forward(detached, inputs[part])
        total += float(block_mse(out, targets[part], settings.mask_last_token, elements))
    return sum(group.gather_objects(total)) if group.distributed else total


def check_holdout_size(nsamples: int, holdout: int) -> None:
    """best_select=holdout needs at least one held-out and one training sample."""
    if holdout < 1 or nsamples - holdout < 1:
        raise LowbitError(
            f"best_select=holdout needs 1 <= signround.holdout < nsamples ({nsamples}), got {holdout}: "
            "lower --opt signround.holdout or raise --nsamples"
        )


def split_holdout(nsamples: int, holdout: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A fixed random subset of `holdout` samples for best selection; the rest train."""
    check_holdout_size(nsamples, holdout)
    order = torch.randperm(nsamples, generator=generator)
    return order[holdout:].sort().values, order[:holdout].sort().values
