"""The study's questions as comparisons of students, each made at the unit that is independent (`ckptkd.stats`):
which variant pairs are compared, at which unit, and which share one Holm correction. The one place that decides
what is compared; what a comparison concludes is decided in `verdicts`.

A comparison is a − b. Its students pair by (trajectory, seed) — the same teacher trajectory and the same student
seed (initial weights, batch order) under both variants — and those pairs are shown (wins and losses), but they are
not independent: the students of one trajectory share their teacher, and a variant that needs no trajectory (no KD,
a full ensemble of the same members) is one run per seed serving every trajectory. So the estimate is made at the
units that are:

  both variants depend on the trajectory    one difference per trajectory (mean over its seeds); paired units
  neither does                              one difference per seed (a run of each); paired units
  one does, the other is shared             the first's trajectory means against the second's runs; two samples

With a single trajectory a trajectory-level comparison has one unit and cannot generalise; it also carries the
comparison within that trajectory (its seeds as units, conditional on its teacher), which says whether this one
teacher's checkpoints taught differently.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ... import stats
from .. import variants as variants_mod
from .rows import PairRows

Key = tuple[int, int]  # (trajectory, seed)


@dataclass
class Comparison:
    """a − b: `diffs` the paired students' differences (fractions of accuracy; what wins and losses count),
    `estimate` the difference at its independent units (None without students of both), `within` the same within
    the one trajectory there is (seeds as units) when there is only one, `holm` the Holm-adjusted p where the
    comparison belongs to a corrected family (and `family` that family's size), `same_runs` how many trajectories
    have the very same runs under a and b (e.g. T* picked the last checkpoint: its students are T^full's)."""
    a: str
    b: str
    diffs: dict[Key, float]
    estimate: stats.UnitEstimate | None
    within: stats.UnitEstimate | None = None
    holm: float | None = None
    family: int = 1
    same_runs: int = 0
    trajectories: int = 0

    @property
    def mean(self) -> float | None:
        """The estimated difference in points; None without students of both."""
        return None if self.estimate is None else 100 * self.estimate.mean

    @property
    def ci_points(self) -> tuple[float, float] | None:
        ci = None if self.estimate is None else self.estimate.ci
        return None if ci is None else (100 * ci[0], 100 * ci[1])

    @property
    def p(self) -> float | None:
        return None if self.estimate is None else self.estimate.p

    @property
    def p_adjusted(self) -> float | None:
        """The p a verdict weighs: Holm-adjusted in a family, else the test's own."""
        return self.holm if self.holm is not None else self.p

    @property
    def min_p(self) -> float | None:
        """The smallest p this design can reach, after Holm's correction where it applies (Holm multiplies the
        smallest p of a family by its size)."""
        return None if self.estimate is None else min(1.0, self.estimate.min_p * self.family)

    @property
    def signs(self) -> tuple[int, int, int]:
        """(wins, ties, losses) of a over the paired students."""
        return stats.sign_counts(list(self.diffs.values()))


def compare(pair: PairRows, a: str, b: str) -> Comparison:
    acc_a, acc_b = pair.accuracy(a), pair.accuracy(b)
    diffs = stats.paired_differences(acc_a, acc_b)
    runs_a, runs_b = pair.run_ids(a), pair.run_ids(b)
    trajectories = sorted({t for t, _ in acc_a} | {t for t, _ in acc_b})
    same = sum(1 for t in {t for t, _ in diffs}
               if all(runs_a.get(k) == runs_b.get(k) for k in diffs if k[0] == t))
    out = Comparison(a, b, diffs, None, same_runs=same, trajectories=len(trajectories))
    if not acc_a or not acc_b:
        return out
    shared_a, shared_b = pair.shared(a), pair.shared(b)
    if shared_a == shared_b:
        if not diffs:
            return out
        if shared_a:  # one run of each per seed: the seed is the unit
            by_seed = {s: d for (_t, s), d in diffs.items()}
            out.estimate = stats.paired_units(list(by_seed.values()), "seed")
        else:
            by_trajectory = _by_trajectory(diffs)
            out.estimate = stats.paired_units([statistics.mean(v) for v in by_trajectory.values()], "trajectory")
            if len(by_trajectory) == 1:
                [(t, within)] = by_trajectory.items()
                out.within = stats.paired_units(within, f"seed within trajectory {t}")
        return out
    # One side depends on the trajectory, the other is shared: trajectory means against runs.
    dependent = [statistics.mean(v) for v in _by_trajectory(acc_a if shared_b else acc_b).values()]
    shared = pair.values(b if shared_b else a)  # one value per run
    first, second = (dependent, shared) if shared_b else (shared, dependent)
    out.estimate = stats.two_sample_units(first, second, "trajectory | run" if shared_b else "run | trajectory")
    return out


def _by_trajectory(values: dict[Key, float]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for (t, _s), v in sorted(values.items()):
        out.setdefault(t, []).append(v)
    return out


def is_intermediate(variant: str) -> bool:
    """An intermediate checkpoint of one teacher at the study's temperature (T0.3, T0.5, ...): the family the paper's
    claim is about."""
    parsed = variants_mod.parse(variant)
    return parsed.base == "fraction" and parsed.table == "table3" and parsed.temperature is None


def pair_comparisons(pair: PairRows) -> dict[str, Comparison]:
    """The comparisons of one pair, keyed "gate" (T^full − no KD), by variant (each single-teacher variant −
    T^full) and "snapshot" (snapshot − full ensemble), in that order. The intermediate teachers vs T^full share one
    Holm correction."""
    have = set(pair.variants)
    out: dict[str, Comparison] = {}
    if {"Tfull", "none"} <= have:
        out["gate"] = compare(pair, "Tfull", "none")
    if "Tfull" in have:
        family = {v: compare(pair, v, "Tfull") for v in pair.variants if is_intermediate(v)}
        tested = {v: c.p for v, c in family.items() if c.estimate is not None}
        adjusted = stats.holm(tested)
        for v, c in family.items():
            c.holm, c.family = adjusted.get(v), max(1, len(tested))
            out[v] = c
        for v in pair.variants:
            parsed = variants_mod.parse(v)
            if v != "Tfull" and parsed.table == "table3" and v not in out and parsed.base != "none":
                out[v] = compare(pair, v, "Tfull")  # T*, softness controls: each on its own, uncorrected
    if {"snapshot", "full_ensemble"} <= have:
        out["snapshot"] = compare(pair, "snapshot", "full_ensemble")
    return out
