"""The search of `auto_quantize`: one option per layer group, least total score within a bit budget.

A multiple-choice knapsack solved exactly by dynamic programming over the
total bit cost. Costs are ``params * bits``; they are put on an integer grid
whose unit is their greatest common divisor (exact: the common case, as layer
sizes share large factors). When that grid would exceed `max_bins` cells the
unit becomes ``budget / max_bins`` and every cost is rounded up, so a
solution of the grid always meets the real budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Sequence

import numpy as np

__all__ = ["SearchResult", "solve_budget", "BudgetError"]


class BudgetError(ValueError):
    """The effective-bits budget cannot be met by any assignment of the candidate formats."""


@dataclass
class SearchResult:
    choices: List[int]  # per group: the index of its chosen option
    cost: float  # total bits of the choice (sum of params * bits)
    score: float  # total score of the choice
    exact: bool  # True when the cost grid was exact (no rounding)


def _grid(costs: Sequence[Sequence[float]], budget: float, max_bins: int):
    """Integer costs and capacity on one grid, and whether the grid is exact."""
    fracs = [[Fraction(c).limit_denominator(1 << 20) for c in opts] for opts in costs]
    denom = 1
    for opts in fracs:
        for f in opts:
            denom = denom * f.denominator // math.gcd(denom, f.denominator)
    ints = [[int(f * denom) for f in opts] for opts in fracs]
    unit = 0
    for opts in ints:
        for v in opts:
            unit = math.gcd(unit, v)
    unit = unit or 1
    capacity = math.floor(Fraction(budget).limit_denominator(1 << 20) * denom / unit + Fraction(1, 10**9))
    top = sum(max(opts) for opts in ints) // unit
    if min(capacity, top) <= max_bins:
        return [[v // unit for v in opts] for opts in ints], min(capacity, top), True
    step = budget / max_bins
    grid = [[int(math.ceil(c / step - 1e-9)) for c in opts] for opts in costs]
    return grid, max_bins, False


def solve_budget(costs: Sequence[Sequence[float]], scores: Sequence[Sequence[float]], budget: float,
                 max_bins: int = 20000) -> SearchResult:
    """Pick one option per group minimizing the total score with total cost <= `budget`.

    Among choices of equal least score the one with the largest cost wins,
    so the result uses as much of the budget as the scores allow. Raises
    BudgetError when even the cheapest option of every group exceeds it.
    """
    if len(costs) != len(scores) or any(len(c) != len(s) or not c for c, s in zip(costs, scores)):
        raise ValueError("solve_budget: every group needs one score per cost, and at least one option")
    lowest = sum(min(c) for c in costs)
    if lowest > budget * (1 + 1e-12):
        raise BudgetError(f"the budget of {budget:g} bits is below the cheapest assignment ({lowest:g} bits)")
    grid, capacity, exact = _grid(costs, budget, max_bins)
    dp = np.full(capacity + 1, np.inf)
    dp[0] = 0.0
    picks = np.full((len(grid), capacity + 1), -1, dtype=np.int32)
    for g, (opts, opt_scores) in enumerate(zip(grid, scores)):
        new = np.full(capacity + 1, np.inf)
        for k, (c, s) in enumerate(zip(opts, opt_scores)):
            if c > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[c:] = dp[: capacity + 1 - c] + float(s)
            better = cand < new
            new[better] = cand[better]
            picks[g, better] = k
        dp = new
    finite = np.isfinite(dp)
    if not finite.any():  # only when rounding up on a coarse grid lost the cheapest assignment
        choices = [int(np.argmin(c)) for c in costs]
        return SearchResult(choices, lowest, float(sum(s[k] for s, k in zip(scores, choices))), exact)
    best = dp[finite].min()
    tol = 1e-9 * max(abs(best), 1e-30)
    at = int(np.nonzero(finite & (dp <= best + tol))[0].max())
    choices = [0] * len(grid)
    for g in range(len(grid) - 1, -1, -1):
        k = int(picks[g, at])
        choices[g] = k
        at -= grid[g][k]
    cost = float(sum(c[k] for c, k in zip(costs, choices)))
    score = float(sum(s[k] for s, k in zip(scores, choices)))
    return SearchResult(choices, cost, score, exact)
