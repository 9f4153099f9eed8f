"""Budgeted mixed precision (issue 34): `auto:` schemes, stored sizes, the exact knapsack, plans and their reruns."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.mixed.knapsack import brute_force, solve
from lowbit.scheme import DEFAULT_AUTO_OPTIONS, QuantScheme, parse_scheme


def test_auto_scheme_parses_budget_and_options_once():
    scheme = parse_scheme("auto:3.0:w2g64,w3g128,w4g128,w8g-1")
    assert scheme.name == "auto:3.0:w2g64,w3g128,w4g128,w8g-1"
    assert (scheme.bits, scheme.group_size) == (8, -1)  # the widest option
    assert scheme.mixed.bits == 3.0
    assert [o.name for o in scheme.mixed.options] == ["w2g64", "w3g128", "w4g128", "w8g-1"]
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    assert [o.name for o in parse_scheme("auto:2.5").mixed.options] == list(DEFAULT_AUTO_OPTIONS)
    assert "auto" not in parse_scheme("w4g128").to_dict()  # other schemes' records stay as they were


@pytest.mark.parametrize("text", ["auto:x", "auto:0", "auto:-1", "auto:3:w4a4", "auto:3:gguf:q4_0", "auto:3:w9g1"])
def test_bad_auto_schemes_name_the_fix(text):
    with pytest.raises(LowbitError):
        parse_scheme(text)


def test_knapsack_matches_brute_force_on_small_cases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, m = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        costs = rng.integers(0, 20, (n, m)).tolist()
        losses = rng.random((n, m)).round(2).tolist()
        capacity = int(rng.integers(0, 60))
        found, best = solve(costs, losses, capacity), brute_force(costs, losses, capacity)
        if best is None:
            assert found is None
            continue
        assert sum(costs[i][j] for i, j in enumerate(found)) <= capacity
        assert sum(losses[i][j] for i, j in enumerate(found)) == pytest.approx(best[0], abs=1e-12)


def test_knapsack_is_deterministic_and_prefers_the_cheaper_tie():
    costs, losses = [[1, 2], [1, 2]], [[1.0, 1.0], [2.0, 0.5]]
    assert solve(costs, losses, 4) == (0, 1) == solve(costs, losses, 4)
    assert solve(costs, losses, 1) is None
