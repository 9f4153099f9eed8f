"""The exact multiple-choice knapsack behind a mixed-precision plan: one option per item, least total loss, total
cost at most the capacity.

Why exact: a plan is compared against uniform schemes of the same size, and a heuristic's slack would blur that
comparison. The solver is a dynamic programme over integer costs (stored bytes) that keeps, after each item, only
the Pareto frontier of (cost, loss) states: a state with more cost and no less loss than another can never be
part of a better solution, so dropping it keeps the optimum. States that cannot fit the cheapest completion of the
remaining items, or whose loss plus a lower bound on the remaining items' loss (their LP relaxation at the room
left: convex hulls, upgrades by loss saved per byte) cannot beat a known feasible solution, are dropped too
(branch-and-bound). Ties are broken by the lowest option indices, so the answer is deterministic.
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


def _improve(costs: list[np.ndarray], losses: list[np.ndarray], choice: list[int], room: int) -> list[int]:
    """Spend the room left on the single-item changes that save the most loss per byte, while any fits."""
    while True:
        best, best_rate = None, 0.0
        for i, (c, v) in enumerate(zip(costs, losses, strict=True)):
            j = choice[i]
            for k in range(len(c)):
                extra, gain = int(c[k] - c[j]), float(v[j] - v[k])
                if gain > 0 and extra <= room:
                    rate = gain / max(extra, 1e-9)
                    if best is None or rate > best_rate:
                        best, best_rate = (i, k, extra), rate
        if best is None:
            return choice
        i, k, extra = best
        choice[i] = k
        room -= extra


def _greedy(costs: list[np.ndarray], losses: list[np.ndarray], capacity: int) -> float:
    """A feasible solution's loss (an upper bound for pruning); inf when even the cheapest options do not fit.

    The LP relaxation's order (each item's convex-hull upgrades by loss saved per byte, an item's later upgrades
    only after its earlier ones) taken while they fit, then single-item changes into the room left."""
    hulls = [_hull_points(c, v) for c, v in zip(costs, losses, strict=True)]
    position = [0] * len(hulls)
    room = capacity - sum(int(costs[i][h[0]]) for i, h in enumerate(hulls))
    if room < 0:
        return float("inf")
    steps = []
    for i, hull in enumerate(hulls):
        for k in range(len(hull) - 1):
            extra = int(costs[i][hull[k + 1]] - costs[i][hull[k]])
            saved = float(losses[i][hull[k]] - losses[i][hull[k + 1]])
            steps.append((-saved / max(extra, 1e-12), i, k, extra))
    blocked = set()
    for _, i, k, extra in sorted(steps):
        if i in blocked or position[i] != k:
            continue
        if extra <= room:
            position[i] = k + 1
            room -= extra
        else:
            blocked.add(i)  # its later upgrades need this one first
    choice = _improve(costs, losses, [hull[p] for hull, p in zip(hulls, position, strict=True)], room)
    return float(sum(float(v[j]) for v, j in zip(losses, choice, strict=True)))


def _hull_points(cost: np.ndarray, loss: np.ndarray) -> list[int]:
    """Option indices on the item's lower convex hull of (cost, loss), cheapest first (dominated ones dropped)."""
    hull: list[int] = []
    for j in np.lexsort((loss, cost)):
        j = int(j)
        if hull and loss[j] >= loss[hull[-1]]:
            continue  # not cheaper, not better
        while len(hull) >= 2:  # drop the middle point when it lies on or above the chord
            a, b = hull[-2], hull[-1]
            if (loss[b] - loss[a]) * (cost[j] - cost[a]) >= (loss[j] - loss[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _hull_segments(cost: np.ndarray, loss: np.ndarray) -> tuple[int, float, list[tuple[int, float]]]:
    """The item's cheapest hull point (cost, loss) and its upgrades along the hull as (extra cost, loss saved)."""
    hull = _hull_points(cost, loss)
    steps = [(int(cost[b] - cost[a]), float(loss[a] - loss[b])) for a, b in zip(hull, hull[1:], strict=False)]
    return int(cost[hull[0]]), float(loss[hull[0]]), steps


def _lp_bounds(costs: list[np.ndarray], losses: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per suffix i (items i..n-1): the LP relaxation's least loss as a piecewise linear function of the room,
    as breakpoints (room, loss) for np.interp; a lower bound on what the remaining items can reach."""
    hulls = [_hull_segments(c, v) for c, v in zip(costs, losses, strict=True)]
    bounds = [(np.zeros(1), np.zeros(1))]
    base_cost, base_loss = 0, 0.0
    steps: list[tuple[int, float]] = []
    for start_cost, start_loss, item_steps in reversed(hulls):
        base_cost += start_cost
        base_loss += start_loss
        steps += item_steps
        if steps:
            extra = np.array([s[0] for s in steps], dtype=np.float64)
            saved = np.array([s[1] for s in steps], dtype=np.float64)
            order = np.argsort(-(saved / np.maximum(extra, 1e-12)), kind="stable")
            room = base_cost + np.concatenate(([0.0], np.cumsum(extra[order])))
            value = base_loss - np.concatenate(([0.0], np.cumsum(saved[order])))
        else:
            room, value = np.array([float(base_cost)]), np.array([base_loss])
        bounds.append((room, value))
    return list(reversed(bounds))


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
    lp = _lp_bounds(c_rows, l_rows)  # lp[i]: the LP relaxation of items i.. (a lower bound on their least loss)
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
        room, value = lp[i + 1]  # the rest's least loss at the room each candidate leaves (flat past the last step)
        rest = np.interp((capacity - cand_cost).astype(np.float64), room, value)
        keep = (cand_cost + min_cost_after[i + 1] <= capacity) & (cand_loss + rest <= bound + slack)
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
