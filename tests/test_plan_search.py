"""The plan's search against brute force on small instances, and its budgets' bookkeeping."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.pipeline.plan import Budget, overrides_for, parse_size
from lowbit.plan import search
from lowbit.plan.sensitivity import Option, spearman


def _instance(seed: int, tensors: int = 6) -> dict[str, list[Option]]:
    """Tensors with bit-ladder options: bytes grow with bits, cost falls about 4x per bit, scaled by a
    random sensitivity (what real tables look like)."""
    rng = random.Random(seed)
    out = {}
    for t in range(tensors):
        size, sens = rng.choice([1000, 3000, 8000]), rng.lognormvariate(0, 1.5)
        out[f"t{t}"] = [Option(f"Q{b}", size * b // 8 + rng.randint(0, 40), sens * 4.0 ** -b * rng.uniform(0.8, 1.2))
                        for b in (2, 3, 4, 5, 6, 8)]
    return out


def _exact_costs(options: dict[str, list[Option]]) -> np.ndarray:
    """Exact dynamic programme: least total cost at each total byte count <= c (inf where none)."""
    cap = sum(max(o.nbytes for o in opts) for opts in options.values())
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    for opts in options.values():
        new = np.full(cap + 1, np.inf)
        for o in opts:
            new[o.nbytes:] = np.minimum(new[o.nbytes:], dp[: cap + 1 - o.nbytes] + o.cost)
        dp = new
    return np.minimum.accumulate(dp)


@pytest.mark.parametrize("seed", range(4))
def test_within_bytes_is_near_the_exact_optimum(seed: int) -> None:
    opts = _instance(seed, tensors=30)
    exact = _exact_costs(opts)
    lo = sum(min(o.nbytes for o in v) for v in opts.values())
    hi = sum(max(o.nbytes for o in v) for v in opts.values())
    for budget in (lo + (hi - lo) // 5, lo + (hi - lo) // 2):
        mine = search.within_bytes(opts, budget)
        assert search.total_bytes(mine) <= budget
        # The Lagrangian is exact on each tensor's convex hull; the greedy fill closes most of the rest.
        assert search.total_cost(mine) <= 1.03 * exact[budget]


@pytest.mark.parametrize("seed", range(4))
def test_within_cost_is_near_the_smallest(seed: int) -> None:
    opts = _instance(seed, tensors=30)
    exact = _exact_costs(opts)
    for max_cost in (exact[-1] * 3, exact[-1] * 30):
        mine = search.within_cost(opts, max_cost)
        smallest = int(np.argmax(exact <= max_cost))
        assert search.total_cost(mine) <= max_cost
        assert search.total_bytes(mine) <= 1.03 * smallest


def test_frontier_is_monotone() -> None:
    points = search.frontier(_instance(0, 20), points=40)
    assert len(points) > 5
    assert all(b1 < b2 and c1 >= c2 for (b1, c1), (b2, c2) in zip(points, points[1:]))


def test_budget_parsing() -> None:
    assert parse_size("4.5GB", 0) == 4_500_000_000 and parse_size("800MiB", 0) == 800 << 20
    assert parse_size("30%", 1000) == 300 and parse_size("123", 0) == 123
    with pytest.raises(LowbitError, match="--size 'lots'"):
        parse_size("lots", 1)
    with pytest.raises(LowbitError, match="exactly one budget"):
        Budget(max_kld=0.1, size=5)
    with pytest.raises(LowbitError, match="exactly one budget"):
        Budget()
    with pytest.raises(LowbitError, match="--max-kld"):
        Budget(max_kld=-1.0)


def test_overrides_match_one_tensor_each() -> None:
    from lowbit.quant.gguf_mix import TensorInfo, choose_types, parse_overrides

    names = ["blk.1.attn_q.weight", "blk.11.attn_q.weight", "blk.1.ffn_down.weight"]
    types = {"blk.1.attn_q.weight": "Q8_0", "blk.11.attn_q.weight": "Q4_0", "blk.1.ffn_down.weight": "Q6_K"}
    got = choose_types([TensorInfo(n, 256) for n in names], "Q4_K_M", 12, 1, False,
                       parse_overrides(list(overrides_for(types))))
    assert got == types


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
