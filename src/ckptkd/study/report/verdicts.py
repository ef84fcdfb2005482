"""What the comparisons conclude: the gate (did KD help at all?), each claim, and one verdict per pair — never more
than the design can resolve.

A claim "a beats b" is
  confirmed          its (Holm-adjusted where it has one) p is below ALPHA and its interval lies above 0
  worse              the same, with the interval below 0: a teaches worse than b
  no gain > margin   its interval's upper end lies below the equivalence margin (default 0.3 points: the paper's own
                     average gain of T^0.5 over T^full in its Table 3; the study key `margin` sets another): an
                     equivalence claim, which the interval supports whatever the test can reach
  inconclusive       otherwise, saying why: "design cannot resolve" when the smallest p its units can reach is not
                     below ALPHA (3 trajectories: 0.25), else the interval holds both 0 and a gain of the margin
Every claim states its unit and n. No teacher is ranked unless T^full beats no KD by at least GATE_POINTS with its
interval above 0; a smaller gain with its interval above 0 is said as such ("KD helped by +x, below the gate").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import variants as variants_mod
from .comparisons import Comparison

GATE_POINTS = 0.5      # T^full must beat no KD by this much (interval above 0) before teachers are ranked
DEFAULT_MARGIN = 0.3   # points: what "no gain larger than m" rules out unless the study sets `margin`
ALPHA = 0.05
CONFIRMED, WORSE, EQUIVALENT, INCONCLUSIVE, SAME = "confirmed", "worse", "equivalent", "inconclusive", "same"


@dataclass(frozen=True)
class Claim:
    """A comparison's conclusion: `kind` one of CONFIRMED, WORSE, EQUIVALENT, INCONCLUSIVE, SAME (the very same
    runs on every trajectory), `why` the reason an inconclusive claim is so, `margin` in points."""
    kind: str
    why: str = ""
    margin: float = DEFAULT_MARGIN

    def __str__(self) -> str:
        if self.kind == EQUIVALENT:
            return f"no gain larger than {self.margin:g} points"
        if self.kind == INCONCLUSIVE and self.why:
            return f"inconclusive ({self.why})"
        if self.kind == SAME:
            return "the same runs"
        return self.kind


def _plural(n: int, unit: str) -> str:
    if n == 1 or unit.startswith("seed within"):
        return f"{n} {unit}"
    return f"{n} {unit[:-1]}ies" if unit.endswith("y") else f"{n} {unit}s"


def units_text(c: Comparison) -> str:
    """"3 trajectories", "3 trajectories against 3 runs", "5 seeds": what the estimate rests on."""
    e = c.estimate
    if e.design == "paired":
        return _plural(e.n, e.unit)
    first, second = e.unit.split(" | ")
    return f"{_plural(e.n[0], first)} against {_plural(e.n[1], second)}"


def resolution(c: Comparison) -> str | None:
    """None when the design can reach p < ALPHA, else why it cannot."""
    if c.min_p < ALPHA:
        return None
    corrected = f" after Holm's correction over {c.family}" if c.family > 1 else ""
    return f"design cannot resolve: {units_text(c)}, smallest attainable p = {c.min_p:.3g}{corrected}"


def claim(c: Comparison, margin: float = DEFAULT_MARGIN) -> Claim:
    """The conclusion of a comparison whose claim is "a beats b"."""
    if c.estimate is None:
        return Claim(INCONCLUSIVE, "no students of both variants", margin)
    if c.trajectories and c.same_runs == c.trajectories:
        return Claim(SAME, margin=margin)
    ci, cannot = c.ci_points, resolution(c)
    if cannot is None and ci is not None and c.p_adjusted < ALPHA:
        if ci[0] > 0:
            return Claim(CONFIRMED, margin=margin)
        if ci[1] < 0:
            return Claim(WORSE, margin=margin)
    if ci is not None and ci[1] < margin:
        return Claim(EQUIVALENT, margin=margin)
    if cannot is not None:
        return Claim(INCONCLUSIVE, cannot, margin)
    return Claim(INCONCLUSIVE, f"the interval holds both 0 and a gain of {margin:g} points", margin)


def gate_state(gate: Comparison | None) -> str:
    """missing (no no-KD and T^full students), unresolved (one unit: no interval), passed, below (KD helped, by
    less than GATE_POINTS) or failed."""
    if gate is None or gate.estimate is None:
        return "missing"
    ci = gate.ci_points
    if ci is None:
        return "unresolved"
    if ci[0] <= 0:
        return "failed"
    return "passed" if gate.mean >= GATE_POINTS else "below"


@dataclass
class Finding:
    """One pair's verdict and the facts its paragraph states.

    gate: "missing", "unresolved", "failed", "below" or "passed" (`gate_state`); `intermediate`, the comparison keys
    of the intermediate teachers the verdict weighs (those with students of both, in variant order); `best`, the one
    with the largest mean difference; `claims`, the claim of every comparison but the gate; `also`, the T* and
    softness-control comparisons stated after the verdict, in variant order, as (key, "T*" or "control");
    `snapshot`, whether the snapshot vs full ensemble comparison is stated. `verdict` is a Claim about the
    intermediate teachers as a whole.
    """
    verdict: Claim
    gate: str
    intermediate: list[str] = field(default_factory=list)
    best: str | None = None
    claims: dict[str, Claim] = field(default_factory=dict)
    also: list[tuple[str, str]] = field(default_factory=list)
    snapshot: bool = False

    @property
    def winners(self) -> list[str]:
        """The intermediate teachers confirmed to beat T^full."""
        return [k for k in self.intermediate if self.claims[k].kind == CONFIRMED]


def finding(variants: list[str], comparisons: dict[str, Comparison], margin: float = DEFAULT_MARGIN) -> Finding:
    """The verdict of one pair (its variants in order, its comparisons from `pair_comparisons`): confirmed when an
    intermediate teacher is confirmed to beat T^full; "no gain larger than the margin" when every intermediate
    teacher's interval rules such a gain out; else inconclusive, saying why (the design's resolution when no
    intermediate comparison could reach p < ALPHA). Inconclusive whenever the gate did not pass; every comparison's
    own claim is made either way (what the student accuracies say, whether or not teachers may be ranked)."""
    gate = gate_state(comparisons.get("gate"))
    out = Finding(Claim(INCONCLUSIVE, "", margin), gate)
    out.claims = {k: claim(c, margin) for k, c in comparisons.items() if k != "gate"}
    out.intermediate = [v for v in variants if v in comparisons and variants_mod.parse(v).base == "fraction"
                        and comparisons[v].holm is not None]
    if out.intermediate:
        out.best = max(out.intermediate, key=lambda k: comparisons[k].mean)
    for v in variants:
        parsed = variants_mod.parse(v)
        if v in comparisons and parsed.base == "Tstar":
            out.also.append((v, "T*"))
        elif v in comparisons and parsed.temperature is not None:
            out.also.append((v, "control"))
    out.snapshot = "snapshot" in comparisons
    if gate != "passed":
        why = (resolution(comparisons["gate"]) if gate == "unresolved" else
               {"missing": "no no-KD and T^full students to compare", "failed": "KD did not clearly help",
                "below": f"KD helped by less than the {GATE_POINTS:g}-point gate"}[gate])
        out.verdict = Claim(INCONCLUSIVE, why, margin)
        return out
    if out.intermediate:
        kinds = {out.claims[k].kind for k in out.intermediate}
        if CONFIRMED in kinds:
            out.verdict = Claim(CONFIRMED, margin=margin)
        elif kinds <= {EQUIVALENT, WORSE}:
            out.verdict = Claim(EQUIVALENT, margin=margin)
        elif all(resolution(comparisons[k]) for k in out.intermediate):
            out.verdict = Claim(INCONCLUSIVE, resolution(comparisons[out.best]), margin)
        else:
            out.verdict = Claim(INCONCLUSIVE, f"no intermediate teacher is confirmed, and a gain of {margin:g} points "
                                              "is not ruled out for all", margin)
    return out
