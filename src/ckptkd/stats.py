"""The statistics of a study's comparisons: paired differences, a hierarchical bootstrap, sign-flip tests, Holm.

Students are paired by (trajectory, seed): the same teacher trajectory and the same student seed (initial weights,
batch order) under two variants. Trajectories are the top level of the hierarchy: the bootstrap resamples them,
then the seeds within each, so the interval reflects that students of one trajectory share their teacher.
Every function is deterministic (fixed seeds), so a report rebuilt from the same results is the same file.
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np

Key = tuple[int, int]  # (trajectory, seed)


def paired_differences(a: dict[Key, float], b: dict[Key, float]) -> dict[Key, float]:
    """a - b for every (trajectory, seed) both have."""
    return {k: a[k] - b[k] for k in sorted(a.keys() & b.keys())}


def by_trajectory(diffs: dict[Key, float]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for (trajectory, _seed), value in sorted(diffs.items()):
        out.setdefault(trajectory, []).append(value)
    return out


def hierarchical_bootstrap(diffs: dict[Key, float], *, level: float = 0.95, draws: int = 10_000,
                           seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of the mean paired difference: trajectories resampled with replacement, then the seeds
    within each resampled trajectory. None with fewer than 2 differences."""
    groups = [np.asarray(v, dtype=np.float64) for v in by_trajectory(diffs).values()]
    if sum(len(g) for g in groups) < 2:
        return None
    rng = np.random.default_rng(seed)
    sizes = np.array([len(g) for g in groups])
    table = np.zeros((len(groups), sizes.max()))
    for t, g in enumerate(groups):
        table[t, :len(g)] = g
    # All draws at once: each draw picks trajectories with replacement, then as many seeds as each picked
    # trajectory has, with replacement within it (positions beyond a trajectory's size are masked out).
    picked = rng.integers(0, len(groups), (draws, len(groups)))
    n = sizes[picked]                                                           # [draws, T]
    seeds = np.floor(rng.random((draws, len(groups), sizes.max())) * n[..., None]).astype(int)
    valid = np.arange(sizes.max()) < n[..., None]
    values = table[picked[..., None], seeds]
    means = (values * valid).sum(axis=(1, 2)) / valid.sum(axis=(1, 2))
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def sign_flip_p(diffs: list[float], *, draws: int = 20_000, seed: int = 0) -> float:
    """Two-sided paired randomisation test of mean difference 0: under the null hypothesis the two variants of a
    pair are exchangeable, so each difference's sign is a fair coin. Exact for up to 16 pairs, Monte Carlo above."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0 or not np.any(d):
        return 1.0
    observed = abs(d.mean())
    if len(d) <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(draws, len(d)))
    means = np.abs((signs * d).mean(axis=1))
    return float(np.mean(means >= observed - 1e-12))


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


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) >= 2 else None)
