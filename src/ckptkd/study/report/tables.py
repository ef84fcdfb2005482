"""The report's tables as text cells, shared by report.md (`markdown`) and the terminal (`terminal`), so both show
the same cells; numbers are formatted with `ckptkd.formatting`.

Accuracies are shown in %, differences in points; a cell of students is "mean ± sample std", with (n=k) when fewer
runs completed than were planned (or only one did: its std is undefined) and ⚠k for runs flagged unhealthy.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ... import stats
from ...formatting import EMPTY, percent, points
from .. import variants as variants_mod
from .comparisons import Comparison
from .verdicts import units_text
from .model import Cell, ComputeTime, PairReport, Report
from .selection import SelectionBenchmark
from .trajectories import TrajectorySummary

Text = tuple[str, bool]    # (text, bold)


@dataclass
class TextTable:
    title: str
    header: list[str]
    rows: list[list[Text]]
    text_columns: int      # the leading columns hold names, the rest numbers


def label(variant: str) -> str:
    return variants_mod.parse(variant).label


def cell_text(cell: Cell, *, planned: bool = True, flagged: bool = True) -> str:
    """A cell of runs; `planned`/`flagged`: whether to mark missing runs (n=k) and unhealthy ones (⚠k)."""
    values = cell.values
    if not values:
        return EMPTY
    mean, std = stats.mean_std(values)
    text = percent(mean) if std is None else f"{percent(mean)} ± {percent(std)}"
    if planned and cell.planned is not None and (len(values) < cell.planned or len(values) == 1):
        text += f" (n={len(values)})"
    return text + (f" ⚠{cell.flagged}" if flagged and cell.flagged else "")


def bold_best(cells: list[str], means: list[float | None]) -> list[Text]:
    """Bold every cell whose mean is the row's maximum as displayed (two decimals in %), so shown ties tie."""
    shown = [None if m is None else round(100 * m, 2) for m in means]
    best = max((s for s in shown if s is not None), default=None)
    return [(text, best is not None and s == best) for text, s in zip(cells, shown)]


def ci_text(c: Comparison) -> str:
    return EMPTY if c.ci_points is None else f"[{points(c.ci_points[0])}, {points(c.ci_points[1])}]"


def p_text(c: Comparison) -> str:
    """The test's p, Holm-adjusted where it has a family, and the smallest p the design can reach."""
    held = f", Holm {c.holm:.3g}" if c.holm is not None else ""
    return f"p = {c.p:.3g}{held}, smallest attainable {c.min_p:.3g}"


def student_name(pair: PairReport) -> str:
    # Two pairs of the same models (e.g. a label-noise control) are told apart by the pair's name.
    if pair.name == f"{pair.teacher_model}->{pair.student_model}":
        return pair.student_model
    return f"{pair.student_model} ({pair.name})"


def table3(report: Report) -> TextTable:
    columns = report.table3.columns
    header = ["Teacher", "Student", "Teacher acc."] + [("Student (no KD)" if v == "none" else label(v))
                                                       for v in columns]
    rows = []
    for pair in report.pairs:
        cells = bold_best([cell_text(pair.cell(v)) for v in columns], [pair.cell(v).mean for v in columns])
        rows.append([(pair.teacher_model, False), (student_name(pair), False),
                     (cell_text(pair.teacher), False)] + cells)
    averages = report.table3.averages
    texts = [EMPTY if a is None else percent(a) for a in averages]
    rows.append([("Average", True), ("", False), (texts[0], False)] + bold_best(texts[1:], averages[1:]))
    return TextTable("Table 3: student test accuracy (%), mean ± sample std", header, rows, 2)


def table3_in(report: Report, measure: str) -> TextTable | None:
    """Table 3 again in another measure of the same students, where the runs recorded it: "top5" (top-5 test
    accuracy, more than 5 classes) or "paper" (the paper's best test accuracy of the last N epochs, `eval.best_of_last`,
    which selects on the test set). The teacher column is the trajectory teachers' top-5 (none for "paper")."""
    columns = report.table3.columns
    view = lambda cell: Cell(getattr(cell, measure), cell.planned)  # noqa: E731 - the same cell, in `measure`
    if not any(getattr(p.teacher, measure) or any(getattr(p.cell(v), measure) for v in columns) for p in report.pairs):
        return None
    header = ["Teacher", "Student", "Teacher top-5" if measure == "top5" else "Teacher acc."] + [
        ("Student (no KD)" if v == "none" else label(v)) for v in columns]
    rows = []
    for pair in report.pairs:
        cells = [view(pair.cell(v)) for v in columns]
        teacher = cell_text(view(pair.teacher)) if measure == "top5" else cell_text(pair.teacher)
        rows.append([(pair.teacher_model, False), (student_name(pair), False), (teacher, False)]
                    + bold_best([cell_text(c) for c in cells], [c.mean for c in cells]))
    title = {"top5": "Table 3, top-5: student top-5 test accuracy (%), mean ± sample std",
             "paper": "Table 3, the paper's metric: best student test accuracy of the last N epochs (%), mean ± "
                      "sample std (selects on the test set)"}[measure]
    return TextTable(title, header, rows, 2)


def comparison_table(report: Report) -> TextTable:
    header = ["Pair", "Comparison", "Unit (n)", "Mean Δ (points)", "95 % CI", "p", "Holm p", "Smallest p",
              "Wins / ties / losses", "Claim"]
    rows = []
    for pair in report.pairs:
        for key, c in pair.comparisons.items():
            what = f"{label(c.a)} − {label(c.b)}" + (" (gate)" if key == "gate" else "")
            if c.estimate is None:
                rows.append([(pair.name, False), (what, False)] + [(EMPTY, False)] * 8)
                continue
            wins, ties, losses = c.signs
            claim = "gate" if key == "gate" else str(pair.finding.claims.get(key, EMPTY))
            rows.append([(pair.name, False), (what, False), (units_text(c), False), (points(c.mean), False),
                         (ci_text(c), False), (f"{c.p:.3g}", False), (EMPTY if c.holm is None else f"{c.holm:.3g}",
                                                                     False),
                         (f"{c.min_p:.3g}", False), (f"{wins} / {ties} / {losses}", False), (claim, False)])
    return TextTable("Comparisons at the independent unit: student accuracy differences", header, rows, 2)


def ensemble_table(report: Report) -> TextTable:
    header = ["Pair", "Snapshot teachers", "Student (snapshot)", "Full-ensemble teachers", "Student (full ens.)",
              "Δ snapshot − full", "Snapshot better"]
    rows = []
    for pair in report.pairs:
        e = pair.ensemble
        if e is None:
            continue
        students = bold_best([cell_text(e.snapshot), cell_text(e.full)], [e.snapshot.mean, e.full.mean])
        wins = f"{e.snapshot_wins} of {len(e.diffs)}" if e.diffs else EMPTY
        diff = EMPTY if e.difference is None else points(100 * e.difference)
        rows.append([(pair.name, False), (cell_text(e.snapshot_teachers), False), students[0],
                     (cell_text(e.full_teachers), False), students[1], (diff, False), (wins, False)])
    return TextTable("Full ensemble vs snapshot ensemble: test accuracy (%)", header, rows, 1)


def cache_table(report: Report) -> TextTable:
    header = ["Pair", "Teacher", "Student (cached)", "Student (online)", "Δ cached − online", "Δ / pooled std",
              "Cached better", "Within seed noise", "Time cached (s)", "Time online (s)"]
    rows = []
    seconds = lambda s: EMPTY if s is None else f"{s:.1f}"  # noqa: E731
    for pair in report.pairs:
        for c in pair.cache:
            diff = ratio = noise = wins = EMPTY
            if c.difference is not None:
                diff = points(100 * c.difference)
                if c.pooled_std is not None:
                    ratio = points(c.difference / c.pooled_std)
                    noise = "yes" if abs(c.difference) <= c.pooled_std else "no"
            if c.diffs:
                better = sum(d > 0 for d in c.diffs.values())
                wins = f"{better} of {len(c.diffs)} (sign test p = {c.sign_p:.2f})"
            rows.append([(pair.name, False), (label(c.base), False), (cell_text(c.cached, flagged=False), False),
                         (cell_text(c.online, flagged=False), False), (diff, False), (ratio, False), (wins, False),
                         (noise, False), (seconds(c.seconds_cached), False), (seconds(c.seconds_online), False)])
    return TextTable("Teacher cache: student test accuracy (%), cached vs online teachers", header, rows, 2)


def time_table(time: ComputeTime) -> TextTable:
    rows = [[(part, False), (str(len(s)), False), (f"{sum(s):.0f}", False), (f"{statistics.mean(s):.1f}", False)]
            for part, s in time.parts.items()]
    rows.append([("total", True), (str(len(time.total)), False), (f"{sum(time.total):.0f}", True), ("", False)])
    return TextTable("Compute time: wall seconds per kind of run", ["Runs", "Count", "Total (s)", "Mean (s)"], rows, 1)


def selection_table(pair: PairReport, benchmark: SelectionBenchmark) -> TextTable:
    def mean_se(summary: tuple[float, float | None] | None) -> str:
        if summary is None:
            return EMPTY
        mean, se = summary
        return points(mean) + ("" if se is None else f" ± {se:.2f}")

    header = ["Selector", "Picked epoch (per trajectory)", "Regret (points)", "Gain over T^full (points)",
              "Trajectories", "Cost per trajectory (s)"]
    rows = [[(s.label, False), (", ".join(EMPTY if s.picks.get(t) is None else str(s.picks[t])
                                         for t in benchmark.trajectories), False),
             (mean_se(s.regret), False), (mean_se(s.gain), False), (str(s.trajectories), False),
             ("0" if s.key in ("T0.5", "Tfull", "best-val") else EMPTY if s.cost_s is None else f"{s.cost_s:.0f}",
              False)]
            for s in benchmark.selectors]
    return TextTable(f"Selection benchmark, {pair.name}", header, rows, 2)


def _estimate(value: tuple[float | None, float | None], digits: int) -> str:
    mean, se = value
    if mean is None:
        return "failed"
    return f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def trajectory_table(summary: TrajectorySummary) -> TextTable:
    header = ["Epoch", "Fraction", "Train %", "Val %", "Test %", "Confidence %", "p_t@τ", "Non-target entropy",
              "NC1", "I(X;F)", "I(Y;F)", "Score", ""]
    number = lambda value, spec: EMPTY if value is None else format(value, spec)  # noqa: E731
    rows = []
    for r in summary.rows:
        mark = "T*" if r.epoch == summary.selected_epoch else ("tie" if r.epoch in summary.ties else "")
        rows.append([(str(r.epoch), False), (f"{r.fraction:.2f}", False), (percent(r.train_acc), False),
                     (percent(r.val_acc), False), (percent(r.test_acc), False), (percent(r.confidence), False),
                     (number(r.p_target_t, ".3f"), False), (number(r.nontarget_entropy_t, ".3f"), False),
                     (number(r.nc1, ".3g"), False), (_estimate(r.i_xf, 2), False), (_estimate(r.i_yf, 3), False),
                     ("skipped" if r.score[0] is None else _estimate(r.score, 2), False), (mark, False)])
    return TextTable("", header, rows, 0)
