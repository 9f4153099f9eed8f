"""The exact multiple-choice knapsack behind a mixed-precision plan: one option per item, least total loss, total
cost at most the capacity.

Why exact: a plan is compared against uniform schemes of the same size, and a heuristic's slack would blur that
comparison. The solver is a dynamic programme over integer costs (stored bytes) that keeps, after each item, only
the Pareto frontier of (cost, loss) states: a state with more cost and no less loss than another can never be
part of a better solution, so dropping it keeps the optimum. States that cannot fit the cheapest completion of the
remaining items, or whose loss plus the remaining items' least losses cannot beat a known feasible solution, are
dropped too (branch-and-bound). Ties are broken by the lowest option indices, so the answer is deterministic.
Pure numpy; `brute_force` is the reference the tests compare it with.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from lowbit.errors import LowbitError


def _check(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]]) -> None:
    if len(costs) != len(losses) or not costs:
        raise LowbitError("the knapsack needs one cost row and one loss row per item, and at least one item")
    for row_c, row_l in zip(costs, losses, strict=True):
        if len(row_c) != len(row_l) or not row_c:
            raise LowbitError("every knapsack item needs the same number (>= 1) of costs and losses")
        if any(int(c) != c or c < 0 for c in row_c):
            raise LowbitError("knapsack costs must be non-negative integers (stored bytes)")
        if any(not np.isfinite(v) for v in row_l):
            raise LowbitError("knapsack losses must be finite")


def _greedy(costs: list[np.ndarray], losses: list[np.ndarray], capacity: int) -> float:
    """A feasible solution's loss (an upper bound for pruning): start from the cheapest options and spend the room
    on the upgrades that save the most loss per byte; inf when even the cheapest does not fit."""
    choice = [int(np.lexsort((l, c))[0]) for c, l in zip(costs, losses, strict=True)]
    room = capacity - sum(int(c[j]) for c, j in zip(costs, choice, strict=True))
    if room < 0:
        return float("inf")
    improved = True
    while improved:
        improved = False
        best, best_rate = None, 0.0
        for i, (c, l) in enumerate(zip(costs, losses, strict=True)):
            j = choice[i]
            for k in range(len(c)):
                extra, gain = int(c[k] - c[j]), float(l[j] - l[k])
                if gain > 0 and extra <= room:
                    rate = gain / max(extra, 1e-9)
                    if best is None or rate > best_rate:
                        best, best_rate = (i, k, extra), rate
        if best is not None:
            i, k, extra = best
            choice[i] = k
            room -= extra
            improved = True
    return float(sum(float(l[j]) for l, j in zip(losses, choice, strict=True)))


def solve(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], capacity: int) -> tuple[int, ...] | None:
    """The option index per item that minimises the total loss with total cost <= `capacity`; None if none fits.

    Among optimal solutions of equal loss the cheaper one wins, then the one with lower option indices."""
    _check(costs, losses)
    c_rows = [np.asarray(row, dtype=np.int64) for row in costs]
    l_rows = [np.asarray(row, dtype=np.float64) for row in losses]
    n = len(c_rows)
    min_cost_after = np.zeros(n + 1, dtype=np.int64)
    min_loss_after = np.zeros(n + 1, dtype=np.float64)
    for i in range(n - 1, -1, -1):
        min_cost_after[i] = min_cost_after[i + 1] + c_rows[i].min()
        min_loss_after[i] = min_loss_after[i + 1] + l_rows[i].min()
    if min_cost_after[0] > capacity:
        return None
    bound = _greedy(c_rows, l_rows, capacity)
    slack = 1e-9 * max(1.0, abs(bound))  # keep states that tie the bound up to rounding (the exact tie-break decides)
    state_cost = np.zeros(1, dtype=np.int64)
    state_loss = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    for i in range(n):
        m = len(c_rows[i])
        cand_cost = (state_cost[:, None] + c_rows[i][None, :]).ravel()
        cand_loss = (state_loss[:, None] + l_rows[i][None, :]).ravel()
        cand_parent = np.repeat(np.arange(state_cost.size), m)
        cand_option = np.tile(np.arange(m), state_cost.size)
        keep = (cand_cost + min_cost_after[i + 1] <= capacity) & (cand_loss + min_loss_after[i + 1] <= bound + slack)
        cand_cost, cand_loss = cand_cost[keep], cand_loss[keep]
        cand_parent, cand_option = cand_parent[keep], cand_option[keep]
        # by cost, then loss, then the earlier parent (lower indices before it), then the lower option index
        order = np.lexsort((cand_option, cand_parent, cand_loss, cand_cost))
        cand_cost, cand_loss = cand_cost[order], cand_loss[order]
        cand_parent, cand_option = cand_parent[order], cand_option[order]
        prior_best = np.minimum.accumulate(np.concatenate(([np.inf], cand_loss[:-1])))
        frontier = cand_loss < prior_best  # strictly better than every cheaper (or equal-cost earlier) state
        state_cost, state_loss = cand_cost[frontier], cand_loss[frontier]
        parents.append(cand_parent[frontier])
        options.append(cand_option[frontier].astype(np.int16))
    best = int(np.argmin(state_loss))  # the first of equal losses is the cheapest (the frontier is cost-sorted)
    chosen = []
    for i in range(n - 1, -1, -1):
        chosen.append(int(options[i][best]))
        best = int(parents[i][best])
    return tuple(reversed(chosen))


def brute_force(
    costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], capacity: int
) -> tuple[float, tuple[int, ...]] | None:
    """The least total loss and one choice reaching it, by enumerating every combination (tests only: tiny sizes)."""
    best: tuple[float, tuple[int, ...]] | None = None
    for choice in itertools.product(*(range(len(row)) for row in costs)):
        if sum(costs[i][j] for i, j in enumerate(choice)) > capacity:
            continue
        loss = sum(losses[i][j] for i, j in enumerate(choice))
        if best is None or loss < best[0]:
            best = (loss, choice)
    return best
