"""AWQ's sums over calibration tokens across the ranks of a data-parallel run (lowbit/distributed).

Every rank holds a contiguous slice of the samples, so a token's global index is its rank's offset plus its local
index. x̄, the Gram matrix and each grid point's replay loss are sums over tokens: each rank sums its own, the sums
are added in rank order, and only then divided by the global count, so every rank takes the same argmin. The
clip search's strided token sub-sample keeps the global stride. The single process takes each function's first
branch: its arithmetic is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lowbit.distributed.group import Group, local_indices


def mean_abs(x: Tensor, group: Group) -> Tensor:
    """x̄: the mean |x| per input channel over every token of every rank."""
    rows = x.reshape(-1, x.shape[-1])
    if not group.distributed:
        return rows.abs().mean(dim=0)
    _, total = group.offset(rows.shape[0])
    return (group.sum(rows.abs().sum(dim=0, dtype=torch.float64)) / total).float()


def global_tokens(x: Tensor, group: Group) -> int:
    """How many tokens x holds over every rank."""
    return group.offset(x.numel() // x.shape[-1])[1]


def reduce_losses(sums: list[tuple[float, int]], group: Group) -> list[float]:
    """Each grid point's mean loss from every rank's (sum of squared errors, element count), added in rank order."""
    parts = group.gather_objects(sums)
    return [sum(part[i][0] for part in parts) / sum(part[i][1] for part in parts) for i in range(len(sums))]


def local_samples(index: Tensor, span: tuple[int, int] | None, count: int) -> Tensor:
    """The global sample indices `index` that fall into this rank's `count` samples starting at `span[0]`, local."""
    return index if span is None else local_indices(index, span[0], count)


def sampled_rows(x: Tensor, n_tokens: int, group: Group) -> Tensor:
    """The clip search's token rows 0, s, 2s, ... of every rank's rows together (s = max(1, T // n_tokens) for the
    global T), the ones this rank holds (`clip.sample_tokens` for the single process)."""
    rows = x.reshape(-1, x.shape[-1])
    start, total = group.offset(rows.shape[0])
    stride = max(1, total // n_tokens)
    return rows[(-start) % stride :: stride]


def token_mean(group: Group, rows: int) -> Callable[[Tensor], Tensor] | None:
    """The mean over sampled tokens (dim 0) of every rank's `rows` tokens together; None for the single process
    (the clip search's own mean)."""
    if not group.distributed:
        return None
    _, total = group.offset(rows)
    return lambda err: group.sum(err.sum(dim=0)) / total
