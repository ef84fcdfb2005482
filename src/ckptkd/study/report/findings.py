"""The findings in words: one paragraph per pair stating its verdict and the comparisons behind it, each with its
unit and n (Markdown bold around the verdict; the terminal prints it without the asterisks)."""

from __future__ import annotations

from ...formatting import points
from .comparisons import Comparison
from .model import PairReport
from .tables import ci_text, label, p_text
from .verdicts import CONFIRMED, EQUIVALENT, GATE_POINTS, SAME, units_text


def sentence(c: Comparison) -> str:
    """A comparison with its statistics, as a clause: the estimate at its units, then the paired students."""
    if c.estimate is None:
        return f"{label(c.a)} and {label(c.b)} cannot be compared: no students of both completed"
    wins, _ties, losses = c.signs
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else ("es" if word.endswith("s") else "s"))  # noqa: E731
    students = f"; {plural(wins, 'win')} / {plural(losses, 'loss')} in {len(c.diffs)} paired students" if c.diffs \
        else ""
    within = ""
    if c.within is not None and c.within.ci is not None:
        lo, hi = (100 * v for v in c.within.ci)
        within = (f"; within that one trajectory ({c.within.n} seeds, conditional on its teacher): "
                  f"{points(100 * c.within.mean)} [{points(lo)}, {points(hi)}], p = {c.within.p:.3g}")
    return (f"{label(c.a)} − {label(c.b)} = {points(c.mean)} points (95 % CI {ci_text(c)}, {p_text(c)}; unit: "
            f"{units_text(c)}{students}{within})")


def _same_runs(c: Comparison) -> str:
    if c.same_runs == 0:
        return ""
    if c.same_runs == c.trajectories:
        return (f" {label(c.a)} is {label(c.b)} on every trajectory (the criterion picked the last checkpoint), so "
                "their students are the very same runs and the difference is zero by construction.")
    return (f" {label(c.a)} is {label(c.b)} on {c.same_runs} of {c.trajectories} trajectories (the same runs "
            "there).")


def paragraph(pair: PairReport) -> str:
    f, comparisons = pair.finding, pair.comparisons
    head = f"**{pair.name}: {f.verdict}.**"
    # Whether T* is T^full is a fact about the selection, said whatever the gate.
    same = " ".join(_same_runs(comparisons[key]).strip() for key, role in f.also if role == "T*"
                    and _same_runs(comparisons[key]))
    if f.gate != "passed":
        return f"{head} {_gate(f.gate, comparisons.get('gate'))}" + (f" {same}" if same else "")
    sentences = [f"KD helped: {sentence(comparisons['gate'])}."]
    if f.intermediate:
        best = sentence(comparisons[f.best])
        if f.verdict.kind == CONFIRMED:
            sentences.append(f"An intermediate checkpoint is the better teacher: "
                             f"{', '.join(label(comparisons[k].a) for k in f.winners)} beat T^full after Holm's "
                             f"correction over the {len(f.intermediate)} intermediate teachers; the largest gain: "
                             f"{best}.")
        elif f.verdict.kind == EQUIVALENT:
            sentences.append(f"No intermediate checkpoint gains more than {f.verdict.margin:g} points over T^full: "
                             f"every interval ends below it; the closest: {best}.")
        else:
            sentences.append(f"Whether an intermediate checkpoint teaches better is not settled "
                             f"({f.verdict.why}); the best: {best}.")
    for key, role in f.also:
        c = comparisons[key]
        if role == "T*":
            claim = f.claims[key]
            said = "." if claim.kind == SAME else f": {claim}; {sentence(c)}."
            sentences.append(f"T* (the study's `Tstar` variant: the tie-aware pick of the information criterion) "
                             f"against T^full{said}{_same_runs(c)}")
        else:
            sentences.append(f"The softness control {label(key)} against T^full: {sentence(c)}; if softer targets "
                             "alone explained a gain of the intermediate teachers, this would gain as much.")
    if f.snapshot:
        sentences.append(f"Snapshot vs full ensemble: {f.claims['snapshot']}; {sentence(comparisons['snapshot'])}.")
    return f"{head} " + " ".join(sentences)


def _gate(state: str, gate: Comparison | None) -> str:
    """What a gate that did not pass says: why no teacher is ranked."""
    unranked = "The teacher variants are not ranked (their numbers are in the tables)."
    if state == "missing":
        return "The study has no no-KD and T^full students to compare, so whether KD helped at all is unknown; no " \
               "teacher is ranked."
    if state == "unresolved":
        return f"Whether KD helps cannot be judged across teachers here: {sentence(gate)}. {unranked}"
    if state == "below":
        return (f"KD helped by {points(gate.mean)} points, below the gate of +{GATE_POINTS:g}: {sentence(gate)}. "
                f"{unranked}")
    return (f"KD did not clearly help here: {sentence(gate)}; the gate needs at least +{GATE_POINTS:g} points with "
            f"the interval above 0. {unranked}")
