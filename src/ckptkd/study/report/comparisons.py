"""The study's questions as paired comparisons of students: which variant pairs are compared, with which statistics
(from `ckptkd.stats`), and which share one Holm correction. The one place that decides what is compared; what a
comparison concludes is decided in `verdicts`.

A comparison is a − b over students paired by (trajectory, seed): the same teacher trajectory and the same student
seed (initial weights, batch order) under two variants.
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
    """a − b over paired students: the differences as fractions of accuracy, the 95 % hierarchical bootstrap
    interval of their mean (fractions; None with fewer than 2 pairs), the two-sided sign-flip p, and the Holm-adjusted
    p where the comparison belongs to a corrected family."""
    a: str
    b: str
    diffs: dict[Key, float]
    ci: tuple[float, float] | None
    p: float
    holm: float | None = None

    @property
    def mean(self) -> float | None:
        """The mean difference in points; None without paired students."""
        return 100 * statistics.mean(self.diffs.values()) if self.diffs else None

    @property
    def ci_points(self) -> tuple[float, float] | None:
        return None if self.ci is None else (100 * self.ci[0], 100 * self.ci[1])

    @property
    def signs(self) -> tuple[int, int, int]:
        """(wins, ties, losses) of a."""
        return stats.sign_counts(list(self.diffs.values()))


def compare(pair: PairRows, a: str, b: str) -> Comparison:
    diffs = stats.paired_differences(pair.accuracy(a), pair.accuracy(b))
    return Comparison(a, b, diffs, stats.hierarchical_bootstrap(diffs), stats.sign_flip_p(list(diffs.values())))


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
        adjusted = stats.holm({v: c.p for v, c in family.items() if c.diffs})
        for v, c in family.items():
            c.holm = adjusted.get(v)
            out[v] = c
        for v in pair.variants:
            parsed = variants_mod.parse(v)
            if v != "Tfull" and parsed.table == "table3" and v not in out and parsed.base != "none":
                out[v] = compare(pair, v, "Tfull")  # T*, softness controls: each on its own, uncorrected
    if {"snapshot", "full_ensemble"} <= have:
        out["snapshot"] = compare(pair, "snapshot", "full_ensemble")
    return out
