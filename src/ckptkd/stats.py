"""The statistics ckptkd reports, computed at the unit that is independent.

A study's students are not independent draws: the students of one teacher trajectory share their teacher, and a
run that needs no teacher trajectory (no KD, a full ensemble of the same members) is trained once per seed and serves
every trajectory. So a comparison a − b is never tested over (trajectory, seed) pairs as if each were independent:

  paired units      both variants depend on the trajectory: one difference per trajectory (the mean over its seeds
                    of the paired differences); or neither does: one difference per seed (a run of each)
                    -> Student-t interval with n - 1 degrees of freedom, exact sign-flip test over the n units
  two samples       one variant depends on the trajectory, the other is shared: the trajectory means of the first
                    against the runs of the second -> Welch interval (Satterthwaite degrees of freedom), exact
                    permutation test of the difference of means over the units

Each result carries the smallest p its test can reach with these units (2 / 2^n for n paired units, 2 / C(n_a+n_b,
n_a) for two samples): a design that cannot reach p < 0.05 cannot confirm anything, whatever its data. Every
function is deterministic (exact enumerations, or fixed-seed Monte Carlo beyond them), so a report rebuilt from the
same results is the same file. numpy and the standard library only (no scipy at runtime).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 20_000   # enumerate sign flips / permutations up to this many, else draw this many (fixed seed)


# -- Student's t, without scipy -------------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        even = m * (b - m) * x / ((qam + m2) * (a + m2))
        odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        for numerator in (even, odd):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (any df > 0, fractional too)."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with `df` degrees of freedom (bisection on `t_sf`; |error| < 1e-10)."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1 - q:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf(mid, df) > 1 - q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


# -- randomisation tests ----------------------------------------------------------------------------------------------

def sign_flip_p(diffs: list[float], *, draws: int = EXACT_LIMIT, seed: int = 0) -> float:
    """Two-sided paired randomisation test of mean difference 0: under the null hypothesis the two variants of a
    unit are exchangeable, so each difference's sign is a fair coin. Exact up to 2^n <= EXACT_LIMIT, Monte Carlo
    beyond (the observed signs counted among the draws)."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0 or not np.any(d):
        return 1.0
    observed = abs(d.mean())
    if 2 ** len(d) <= draws:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float(np.mean(np.abs((signs * d).mean(axis=1)) >= observed - 1e-12))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(draws, len(d)))
    extreme = np.sum(np.abs((signs * d).mean(axis=1)) >= observed - 1e-12)
    return float((extreme + 1) / (draws + 1))


def permutation_p(a: list[float], b: list[float], *, draws: int = EXACT_LIMIT, seed: int = 0) -> float:
    """Two-sided permutation test of equal means of two samples of units: every split of the pooled units into groups
    of the two sizes is equally likely under the null hypothesis. Exact up to EXACT_LIMIT splits, Monte Carlo
    beyond."""
    pooled = np.asarray(list(a) + list(b), dtype=np.float64)
    n_a, n = len(a), len(a) + len(b)
    if not a or not b:
        return 1.0
    observed = abs(np.mean(a) - np.mean(b))
    total = pooled.sum()
    if math.comb(n, n_a) <= draws:
        groups = np.array(list(itertools.combinations(range(n), n_a)))
    else:
        rng = np.random.default_rng(seed)
        groups = np.array([rng.permutation(n)[:n_a] for _ in range(draws)])
    sums = pooled[groups].sum(axis=1)
    stats_ = np.abs(sums / n_a - (total - sums) / (n - n_a))
    extreme = np.sum(stats_ >= observed - 1e-12)
    return float(extreme / len(groups)) if math.comb(n, n_a) <= draws else float((extreme + 1) / (draws + 1))


# -- a difference estimated at its units ------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitEstimate:
    """A difference a − b estimated at its independent units (all values in the caller's unit, e.g. fractions).

    design: "paired" (one difference per unit) or "two-sample" (units of each side); unit: what a unit is, in words
    (e.g. "trajectory", "seed", "trajectory | run"); n: the number of units (paired) or (n_a, n_b); mean: the
    estimated difference; ci: the interval at `level` (None with fewer than 2 units on a side); df: its degrees of
    freedom; p: the randomisation test's two-sided p; min_p: the smallest p that test can reach with these units."""
    design: str
    unit: str
    n: int | tuple[int, int]
    mean: float
    ci: tuple[float, float] | None
    df: float | None
    p: float
    min_p: float
    level: float = 0.95

    @property
    def units(self) -> int:
        """How many independent units the estimate rests on (both sides together for two samples)."""
        return sum(self.n) if isinstance(self.n, tuple) else self.n


def paired_units(diffs: list[float], unit: str, *, level: float = 0.95) -> UnitEstimate:
    """The mean of `diffs`, one per independent unit, with a t interval (n - 1 df) and the exact sign-flip p."""
    n = len(diffs)
    if n == 0:
        raise ValueError("no units to estimate a difference from")
    mean = statistics.mean(diffs)
    ci = df = None
    if n >= 2:
        df = n - 1
        half = t_quantile(0.5 + level / 2, df) * statistics.stdev(diffs) / math.sqrt(n)
        ci = (mean - half, mean + half)
    min_p = min(1.0, 2.0 / 2 ** n)
    return UnitEstimate("paired", unit, n, mean, ci, df, sign_flip_p(diffs), min_p, level)


def two_sample_units(a: list[float], b: list[float], unit: str, *, level: float = 0.95) -> UnitEstimate:
    """mean(a) − mean(b) of two samples of independent units, with a Welch interval (Satterthwaite df) and the
    exact permutation p."""
    if not a or not b:
        raise ValueError("each side needs at least one unit")
    mean = statistics.mean(a) - statistics.mean(b)
    ci = df = None
    if len(a) >= 2 and len(b) >= 2:
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        se = math.sqrt(va + vb)
        if se > 0:
            df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
            half = t_quantile(0.5 + level / 2, df) * se
        else:
            df, half = float(len(a) + len(b) - 2), 0.0
        ci = (mean - half, mean + half)
    # With equal sizes each split and its complement give the same |difference|, so at best 2 of them are as extreme
    # as the observed one; with unequal sizes the observed split can be the only one.
    min_p = min(1.0, (2.0 if len(a) == len(b) else 1.0) / math.comb(len(a) + len(b), len(a)))
    return UnitEstimate("two-sample", unit, (len(a), len(b)), mean, ci, df, permutation_p(a, b), min_p, level)


# -- small helpers ----------------------------------------------------------------------------------------------------

def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment (family-wise error), adjusted p-values in the input's keys."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def sign_counts(diffs: list[float]) -> tuple[int, int, int]:
    """(wins, ties, losses) of the first variant."""
    return sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of paired wins against losses (ties left out): 1.0 when there is nothing to test."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample std / sqrt(n)); the SE is None for a single value."""
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else None)


def resampled_mean_se(values: list[float], held_fraction: float) -> tuple[float, float | None]:
    """Mean and standard error of an estimate repeated over K random splits of one data set, each scoring on a
    `held_fraction` held out of the same images: the splits overlap, so their estimates are correlated and the plain
    SE understates the uncertainty. Nadeau & Bengio's (2003) corrected resampled SE, sd * sqrt(1/K + n_held /
    n_fit), accounts for it; None for a single value."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) * math.sqrt(1 / len(values) + held_fraction / (1 - held_fraction))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) >= 2 else None)


def paired_differences(a: dict, b: dict) -> dict:
    """a - b for every key (e.g. (trajectory, seed)) both have."""
    return {k: a[k] - b[k] for k in sorted(a.keys() & b.keys())}
