"""The findings in words: one paragraph per pair stating its verdict and the comparisons behind it (Markdown bold
around the verdict; the terminal prints it without the asterisks)."""

from __future__ import annotations

from ...formatting import points
from .comparisons import Comparison
from .model import PairReport
from .tables import ci_text, label
from .verdicts import CONFIRMED, GATE_POINTS, REFUTED


def sentence(c: Comparison) -> str:
    """A comparison with its statistics, as a clause."""
    if not c.diffs:
        return f"{label(c.a)} and {label(c.b)} cannot be compared: no paired students completed"
    wins, _ties, losses = c.signs
    held = f", Holm-adjusted p = {c.holm:.3f}" if c.holm is not None else ""
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else ("es" if word.endswith("s") else "s"))  # noqa: E731
    return (f"{label(c.a)} − {label(c.b)} = {points(c.mean)} points (95 % CI {ci_text(c)}, "
            f"{plural(wins, 'win')} / {plural(losses, 'loss')} in {len(c.diffs)} pairs, p = {c.p:.3f}{held})")


def paragraph(pair: PairReport) -> str:
    f, comparisons = pair.finding, pair.comparisons
    if f.gate == "missing":
        return (f"**{pair.name}: inconclusive.** The study has no no-KD and T^full students to compare, so whether "
                "KD helped at all is unknown; no teacher is ranked.")
    if f.gate == "failed":
        return (f"**{pair.name}: inconclusive: KD itself did not help here.** {sentence(comparisons['gate'])}; the "
                f"gate needs at least +{GATE_POINTS:g} points with the interval above 0, so the teacher variants are "
                "not ranked (their numbers are in the tables).")
    sentences = [f"KD helped: {sentence(comparisons['gate'])}."]
    if f.intermediate:
        best = sentence(comparisons[f.best])
        if f.verdict == CONFIRMED:
            sentences.append(f"An intermediate checkpoint is the better teacher: "
                             f"{', '.join(label(comparisons[k].a) for k in f.winners)} beat T^full after Holm's "
                             f"correction over the {len(f.intermediate)} intermediate teachers; the largest gain: "
                             f"{best}.")
        elif f.verdict == REFUTED:
            sentences.append(f"No intermediate checkpoint beat T^full, and every interval rules out a gain of "
                             f"{GATE_POINTS:g} points or more; the closest: {best}.")
        else:
            sentences.append(f"No intermediate checkpoint beat T^full significantly, but the data cannot rule out a "
                             f"gain of {GATE_POINTS:g} points; the best: {best}.")
    for key, role in f.also:
        if role == "T*":
            sentences.append(f"T* (the information criterion's pick) against T^full: {f.claims[key]}; "
                             f"{sentence(comparisons[key])}.")
        else:
            sentences.append(f"The softness control {label(key)} against T^full: {sentence(comparisons[key])}; if "
                             "softer targets alone explained a gain of the intermediate teachers, this would gain "
                             "as much.")
    if f.snapshot:
        sentences.append(f"Snapshot vs full ensemble: {f.claims['snapshot']}; {sentence(comparisons['snapshot'])}.")
    return f"**{pair.name}: {f.verdict}.** " + " ".join(sentences)
