"""What the comparisons conclude: the gate (did KD help at all?), each claim's word, and one verdict per pair.

A claim "a beats b" is *confirmed* when its (Holm-adjusted where it has one) p is below 0.05 and its interval lies
above 0, *refuted at this scale* when the interval rules out a gain of GATE_POINTS or more, else *inconclusive*.
No teacher is ranked unless T^full beats no KD by at least GATE_POINTS with its interval above 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import variants as variants_mod
from .comparisons import Comparison

GATE_POINTS = 0.5  # T^full must beat no KD by this much (CI above 0) before teachers are ranked
CONFIRMED, REFUTED, INCONCLUSIVE = "confirmed", "refuted at this scale", "inconclusive"


def claim(c: Comparison) -> str:
    """confirmed / refuted at this scale / inconclusive, for a comparison whose claim is 'a beats b'."""
    if not c.diffs or c.ci is None:
        return INCONCLUSIVE
    p = c.holm if c.holm is not None else c.p
    low, high = c.ci_points
    if p < 0.05 and low > 0:
        return CONFIRMED
    if high < GATE_POINTS:
        return REFUTED
    return INCONCLUSIVE


def gate_passed(gate: Comparison) -> bool:
    return bool(gate.diffs) and gate.ci is not None and gate.mean >= GATE_POINTS and gate.ci_points[0] > 0


@dataclass
class Finding:
    """One pair's verdict and the facts its paragraph states.

    gate: "missing" (no no-KD and T^full students to compare), "failed" or "passed". Only with a passed gate are the
    rest filled: `intermediate`, the comparison keys of the intermediate teachers the verdict weighs (those with
    paired students, in variant order); `best`, the one with the largest mean difference; `claims`, the claim of
    each comparison stated (intermediate, T*, snapshot); `also`, the T* and softness-control comparisons stated
    after the verdict, in variant order, as (key, "T*" or "control"); `snapshot`, whether the snapshot vs full
    ensemble comparison is stated.
    """
    verdict: str
    gate: str
    intermediate: list[str] = field(default_factory=list)
    best: str | None = None
    claims: dict[str, str] = field(default_factory=dict)
    also: list[tuple[str, str]] = field(default_factory=list)
    snapshot: bool = False

    @property
    def winners(self) -> list[str]:
        """The intermediate teachers confirmed to beat T^full."""
        return [k for k in self.intermediate if self.claims[k] == CONFIRMED]


def finding(variants: list[str], comparisons: dict[str, Comparison]) -> Finding:
    """The verdict of one pair (its variants in order, its comparisons from `pair_comparisons`): confirmed when an
    intermediate teacher is confirmed to beat T^full, refuted at this scale when every one is refuted, else
    inconclusive; inconclusive whenever the gate is missing or failed."""
    gate = comparisons.get("gate")
    if gate is None:
        return Finding(INCONCLUSIVE, "missing")
    if not gate_passed(gate):
        return Finding(INCONCLUSIVE, "failed")
    out = Finding(INCONCLUSIVE, "passed")
    out.intermediate = [v for v in variants if v in comparisons and variants_mod.parse(v).base == "fraction"
                        and comparisons[v].holm is not None]
    if out.intermediate:
        out.claims = {k: claim(comparisons[k]) for k in out.intermediate}
        out.best = max(out.intermediate, key=lambda k: comparisons[k].mean)
        if CONFIRMED in out.claims.values():
            out.verdict = CONFIRMED
        elif all(c == REFUTED for c in out.claims.values()):
            out.verdict = REFUTED
    for v in variants:
        parsed = variants_mod.parse(v)
        if v in comparisons and parsed.base == "Tstar":
            out.also.append((v, "T*"))
            out.claims[v] = claim(comparisons[v])
        elif v in comparisons and parsed.temperature is not None:
            out.also.append((v, "control"))
    if "snapshot" in comparisons:
        out.snapshot = True
        out.claims["snapshot"] = claim(comparisons["snapshot"])
    return out
