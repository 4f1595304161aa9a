"""Choosing one type per tensor: the least total cost within a byte budget, or the fewest bytes within a
cost budget (a multiple-choice knapsack).

Why a Lagrangian: with thousands of tensors and byte counts in the millions, an exact dynamic
programme over bytes needs a coarse byte grid, while the Lagrangian relaxation is exact on the
lower convex hull of each tensor's (bytes, cost) options and costs one argmin per tensor per
multiplier. For a multiplier lam every tensor independently takes the option minimising
cost + lam * bytes; total bytes fall as lam grows, so a bisection on lam meets the budget. What the
hull cannot express (the last few hundred kilobytes between two hull points) is filled greedily by
the upgrades with the best cost saved per byte, then cost budgets are trimmed the same way in reverse.
"""

from __future__ import annotations

import math

from lowbit.plan.sensitivity import Option

Choice = dict[str, Option]


def pick(options: dict[str, list[Option]], lam: float) -> Choice:
    """Each tensor's option minimising cost + lam * bytes (ties to the smaller file)."""
    return {n: min(opts, key=lambda o: (o.cost + lam * o.nbytes, o.nbytes)) for n, opts in options.items()}


def total_bytes(choice: Choice) -> int:
    return sum(o.nbytes for o in choice.values())


def total_cost(choice: Choice) -> float:
    return sum(o.cost for o in choice.values())


def _bisect(options: dict[str, list[Option]], ok, iters: int = 200) -> Choice:
    """The choice at the smallest multiplier (in log space) whose choice satisfies `ok`; ok must be
    monotone: true for all large multipliers (small files) when looking for a byte budget."""
    lo, hi = -60.0, 60.0  # log10 of lam
    if not ok(pick(options, 10 ** hi)):
        return pick(options, 10 ** hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ok(pick(options, 10 ** mid)):
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-9:
            break
    return pick(options, 10 ** hi)


def within_bytes(options: dict[str, list[Option]], budget: int) -> Choice:
    """The least-cost choice whose bytes fit `budget` (None fits when even the smallest does not)."""
    choice = dict(_bisect(options, lambda c: total_bytes(c) <= budget))
    _fill(options, choice, budget)
    return choice


def within_cost(options: dict[str, list[Option]], max_cost: float) -> Choice:
    """The smallest choice whose total cost is at most `max_cost`."""
    # Costs fall as lam falls: bisect for the largest lam (smallest file) that still meets max_cost.
    lo, hi = -60.0, 60.0
    if total_cost(pick(options, 10 ** lo)) > max_cost:
        return pick(options, 10 ** lo)
    for _ in range(200):
        mid = (lo + hi) / 2
        if total_cost(pick(options, 10 ** mid)) <= max_cost:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9:
            break
    choice = dict(pick(options, 10 ** lo))
    _trim(options, choice, max_cost)
    return choice


def _fill(options: dict[str, list[Option]], choice: Choice, budget: int) -> None:
    """Spend leftover bytes on the upgrades that save the most cost per byte and still fit."""
    while True:
        left = budget - total_bytes(choice)
        best, best_rate = None, 0.0
        for n, cur in choice.items():
            for o in options[n]:
                extra = o.nbytes - cur.nbytes
                if 0 < extra <= left and o.cost < cur.cost:
                    rate = (cur.cost - o.cost) / extra
                    if rate > best_rate:
                        best, best_rate = (n, o), rate
        if best is None:
            return
        choice[best[0]] = best[1]


def _trim(options: dict[str, list[Option]], choice: Choice, max_cost: float) -> None:
    """Take the downgrades that save the most bytes per unit of cost while the total stays within."""
    while True:
        slack = max_cost - total_cost(choice)
        best, best_rate = None, 0.0
        for n, cur in choice.items():
            for o in options[n]:
                saved, extra = cur.nbytes - o.nbytes, o.cost - cur.cost
                if saved > 0 and extra <= slack:
                    rate = saved / max(extra, 1e-300)
                    if rate > best_rate:
                        best, best_rate = (n, o), rate
        if best is None:
            return
        choice[best[0]] = best[1]


def frontier(options: dict[str, list[Option]], points: int = 24) -> list[tuple[int, float]]:
    """(bytes, estimated cost) along the multiplier sweep, from the smallest file to the largest: the
    curve the budget cuts. The multipliers span the tensors' own cost-per-byte trade rates."""
    rates = [abs(a.cost - b.cost) / abs(a.nbytes - b.nbytes) for opts in options.values()
             for a in opts for b in opts if a.nbytes != b.nbytes and a.cost != b.cost]
    if not rates:
        c = pick(options, 1.0)
        return [(total_bytes(c), total_cost(c))]
    lo, hi = math.log10(min(rates)) - 1, math.log10(max(rates)) + 1
    seen: dict[int, float] = {}
    for k in range(points + 1):
        c = pick(options, 10 ** (lo + (hi - lo) * k / points))
        seen.setdefault(total_bytes(c), total_cost(c))
    return sorted(seen.items())
