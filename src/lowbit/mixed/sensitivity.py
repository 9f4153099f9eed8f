"""How much each linear loses at each candidate scheme: the losses the mixed-precision knapsack minimises.

Two estimators, both measured on the block's float calibration inputs before any rounding, with the error E = W -
RTN(W) of each option (the quantizer that later rounds may do better, but RTN's error ranks linears and options the
same way and costs one pass):

- `hessian` (second order): tr(E H E^T) with H = X^T X / tokens from the linear's inputs, the output error GPTQ's and
  AWQ's losses measure: the expected squared change of the linear's output per token.
- `gradient` (first order, as auto-round's AutoScheme scores options): with every linear of the block at the option,
  the block's reconstruction loss (MSE to the float block's outputs) is backpropagated to the dequantized weights and
  the score is sum |grad * E|. AutoScheme takes the gradient of the model's language-model loss; lowbit uses the
  block's own loss so the pass stays block by block (streamed models included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lowbit.quantizer import fake_quant
from lowbit.scheme import QuantScheme


def rtn_error(weight: Tensor, scheme: QuantScheme) -> Tensor:
    """E = W - RTN(W) in fp32: the error the option leaves before any tuning."""
    w32 = weight.detach().float()
    return w32 - fake_quant(w32, scheme, ste="identity").detach()


def hessian_losses(weight: Tensor, gram: Tensor, tokens: int, options: Sequence[QuantScheme]) -> list[float]:
    """tr(E H E^T) per option, H = gram / tokens (0 for a linear no token reached: an unrouted MoE expert)."""
    if tokens == 0:
        return [0.0 for _ in options]
    h = gram.float() / tokens
    losses = []
    for option in options:
        e = rtn_error(weight, option).to(h.device)
        losses.append(float(((e @ h) * e).sum(dtype=torch.float64)))
    return losses


def gradient_losses(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    options: Sequence[QuantScheme],
    backward: Callable[[], None],
) -> dict[str, list[float]]:
    """sum |dL/dW_q * (W - W_q)| per linear and option, L = the block's MSE to its float outputs.

    `backward()` runs the block over the calibration batches and backpropagates the loss (the caller owns the
    batching, the devices and the target chain). Each linear's weight holds W_q = RTN(W) while it runs; the float
    weights, and every parameter's requires_grad, are put back afterwards."""
    return _first_order_scores(block, linears, options, backward)


def lm_gradient_losses(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    options: Sequence[QuantScheme],
    windows: Tensor,
    batch_size: int,
) -> dict[str, list[float]]:
    """AutoScheme's score with its own loss: sum |dL/dW_q * (W - W_q)| per linear and option, L = the model's
    language-model loss on the calibration windows, every block linear at the option at once.

    Why a third estimator: the block-local ones add up errors measured in each linear's own output space, which
    ranks linears of different depths and kinds on different scales; the model's loss is one currency for all.
    It needs the whole model in memory (a resident run) and one forward and backward per option."""
    count = windows.shape[0]

    def backward() -> None:
        for start in range(0, count, batch_size):
            batch = windows[start : start + batch_size]
            out = model(input_ids=batch, labels=batch)
            (out.loss * (batch.shape[0] / count)).backward()

    return _first_order_scores(model, linears, options, backward)


def _first_order_scores(
    owner: nn.Module,
    linears: dict[str, nn.Linear],
    options: Sequence[QuantScheme],
    backward: Callable[[], None],
) -> dict[str, list[float]]:
    """Both gradient estimators: per option, every linear at W_q = RTN(W) with only those weights trainable,
    `backward()`, then sum |grad * (W - W_q)|; the float weights and `owner`'s requires_grad flags are restored."""
    scores = {name: [0.0] * len(options) for name in linears}
    originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    trainable = {id(p): p.requires_grad for p in owner.parameters()}
    for p in owner.parameters():
        p.requires_grad_(False)
    try:
        for index, option in enumerate(options):
            errors = {}
            for name, linear in linears.items():
                q = fake_quant(originals[name].float(), option, ste="identity").detach()
                errors[name] = originals[name].float() - q
                linear.weight.data = q.to(originals[name].dtype)
                linear.weight.grad = None
                linear.weight.requires_grad_(True)
            backward()
            for name, linear in linears.items():
                grad = linear.weight.grad
                if grad is not None:
                    scores[name][index] = float((grad.float() * errors[name].to(grad.device)).abs().sum())
    finally:
        for name, linear in linears.items():
            linear.weight.data = originals[name]
            linear.weight.grad = None
        for p in owner.parameters():
            p.requires_grad_(trainable.get(id(p), False))
    return scores
