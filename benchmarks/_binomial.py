"""Exact binomial tails and intervals for the accuracy benchmarks' counts."""
from __future__ import annotations

import math


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), 0 < p < 1; summed in log space, since n runs to
    tens of thousands here and the binomial coefficients overflow a float."""
    lp, lq = math.log(p), math.log1p(-p)
    return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                        + i * lp + (n - i) * lq) for i in range(k + 1))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), 0 < p < 1: the one-sided exact test's p-value."""
    return max(0.0, 1.0 - binomial_cdf(k - 1, n, p))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for k events in n trials, by bisection on the
    binomial distribution function."""
    tail = (1.0 - confidence) / 2

    def solve(below) -> float:  # the p where ``below`` turns from True to False
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if below(mid) else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: 1.0 - binomial_cdf(k - 1, n, p) < tail)
    upper = 1.0 if k >= n else solve(lambda p: binomial_cdf(k, n, p) > tail)
    return lower, upper
