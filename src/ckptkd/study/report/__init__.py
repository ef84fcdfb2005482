"""`ckptkd report STUDY`: the study's results as the paper presents them, with the statistics it lacks, in
report.md, results.csv and plots/.

Everything is rebuilt from results.sqlite (opened read-only) and study.yaml; the teacher trajectories from the
analysis summaries the database keeps (or the teachers' run folders). A section that cannot be rebuilt because its
run folders are not here (they are not committed with a study) is carried over from the previous report, marked as
such, never dropped. The report has no timestamps and every resampling is seeded, so the same results give the
same files.

Accuracy: the mean test accuracy of each student's last k epochs (the run's `eval.last_k`, default 5), or the
last-epoch accuracy for studies run before it was recorded; never the best test epoch, which would select on the
test set (the paper reports the best of the last 10). Students are paired by (trajectory, seed).
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ... import stats
from ...config import epoch_at_fraction, read_yaml
from ...errors import UserError
from ...formatting import terminal_console
from ...run.storage import atomic_write_bytes, atomic_write_text, read_sealed_json, remove_stale_temporaries
from .. import variants as variants_mod
from ..queue import ResultsDB

EMPTY = "—"
CSV_COLUMNS = ("run_id", "kind", "name", "status", "pair", "role", "variant", "seed", "teacher_seed", "test_acc",
               "test_acc_last_k", "val_acc", "best_val_acc", "best_val_epoch", "teacher_test_acc", "health",
               "duration_s", "path")
TEACHER_FIGURES = ("information_plane", "class_correlation", "trajectory")
GATE_POINTS = 0.5          # T^full must beat no KD by this much (CI above 0) before teachers are ranked
CARRIED = "*Carried over from the previous report: the run folders it was built from are not here.*"
Cell = tuple[str, bool]    # (text, bold)


def _label(variant: str) -> str:
    return variants_mod.parse(variant).label


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _points(value: float) -> str:
    if round(value, 2) == 0:
        return "0.00"
    return f"{value:+.2f}".replace("-", "−")


def _done(row: dict) -> bool:
    return row["status"] == "complete" and bool(row["metrics"]) and row["metrics"].get("test_acc") is not None


def _accuracy(metrics: dict) -> float:
    last_k = metrics.get("test_acc_last_k")
    return last_k if last_k is not None else metrics["test_acc"]


def _flags(row: dict) -> list[str]:
    return [f["flag"] for f in ((row.get("metrics") or {}).get("health") or {}).get("flags", [])]


def _serves(row: dict) -> list[list]:
    """The (pair, variant, trajectory, seed) cells a student serves; older databases name one in the group."""
    group = row["group"] or {}
    if group.get("serves"):
        return [c for c in group["serves"] if len(c) == 4]
    pairs = group.get("pairs") or ([group["pair"]] if group.get("pair") else [])
    return [[p, group.get("variant"), group.get("teacher_seed", 0), group.get("seed")] for p in pairs]


@dataclass
class _Pair:
    name: str
    teacher_model: str
    student_model: str
    variants: list[str]
    teacher_epochs: int | None
    teachers: list[dict] = field(default_factory=list)
    analyses: dict[int, dict] = field(default_factory=dict)
    students: dict[str, dict[tuple[int, int], dict]] = field(default_factory=dict)  # variant -> (t, s) -> row

    def accuracy(self, variant: str) -> dict[tuple[int, int], float]:
        return {k: _accuracy(r["metrics"]) for k, r in sorted(self.students.get(variant, {}).items()) if _done(r)}

    def values(self, variant: str) -> list[float]:
        """One value per distinct run (a run serving several trajectories counts once)."""
        seen = {}
        for r in self.students.get(variant, {}).values():
            if _done(r):
                seen[r["run_id"]] = _accuracy(r["metrics"])
        return list(seen.values())

    def flagged(self, variant: str) -> int:
        return len({r["run_id"] for r in self.students.get(variant, {}).values() if _done(r) and _flags(r)})

    def teacher_accuracy(self) -> list[float]:
        return [r["metrics"]["test_acc"] for r in self.teachers if _done(r)]

    def ensemble_teacher_accuracy(self, variant: str) -> list[float]:
        by_set = {}
        for r in self.students.get(variant, {}).values():
            if _done(r) and r["metrics"].get("teacher_test_acc") is not None:
                by_set[tuple(r["metrics"].get("teachers") or [])] = r["metrics"]["teacher_test_acc"]
        return list(by_set.values())

    def teacher_epochs_of(self, variant: str) -> dict[int, tuple[int, ...]]:
        out = {}
        for (t, _s), r in self.students.get(variant, {}).items():
            if _done(r) and r["metrics"].get("teacher_epochs"):
                out[t] = tuple(r["metrics"]["teacher_epochs"])
        return out


def _pairs(study: dict, rows: list[dict]) -> list[_Pair]:
    pairs: dict[str, _Pair] = {}
    for spec in study.get("pairs") or []:
        teacher, student = spec.get("teacher") or {}, spec.get("student") or {}
        pairs[spec["name"]] = _Pair(spec["name"], (teacher.get("model") or {}).get("name", "?"),
                                    (student.get("model") or {}).get("name", "?"),
                                    list(spec.get("variants") or study.get("variants") or []),
                                    (teacher.get("schedule") or {}).get("epochs"))

    def pair(name: str, group: dict) -> _Pair:
        if name not in pairs:
            teacher_model, _, student_model = name.partition("->")
            pairs[name] = _Pair(name, group.get("teacher_model", teacher_model),
                                group.get("student_model", student_model or "?"), [], None)
        return pairs[name]

    for row in rows:
        group = row["group"] or {}
        role = group.get("role")
        if role == "student":
            for name, variant, trajectory, seed in _serves(row):
                pair(name, group).students.setdefault(variant, {})[(trajectory, seed)] = row
            continue
        for name in group.get("pairs") or ([group["pair"]] if group.get("pair") else []):
            if role == "teacher":
                pair(name, group).teachers.append(row)
            elif role == "analysis":
                pair(name, group).analyses[group.get("teacher_seed", 0)] = row
    for p in pairs.values():
        p.teachers.sort(key=lambda r: r["group"].get("teacher_seed", 0))
        seen = {v for v in p.students if v}
        p.variants = variants_mod.ordered(set(p.variants) | {v for v in seen if not v.endswith("@online")})
    return list(pairs.values())


@dataclass
class _Table:
    title: str
    header: list[str]
    rows: list[list[Cell]]
    text_columns: int  # the leading columns hold names, the rest numbers

    def markdown(self) -> list[str]:
        align = ["---"] * self.text_columns + ["---:"] * (len(self.header) - self.text_columns)
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(align) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(f"**{text}**" if bold else text for text, bold in row) + " |")
        return lines

    def width(self, transpose: bool = False) -> int:
        """Columns the terminal table needs with every cell on one line (borders and padding included)."""
        if transpose:
            columns = [[c for c in self.header[self.text_columns:]]] + [
                [" ".join(t for t, _ in row[:self.text_columns]).strip()] + [t for t, _ in row[self.text_columns:]]
                for row in self.rows]
        else:
            columns = [[self.header[i]] + [row[i][0] for row in self.rows] for i in range(len(self.header))]
        return sum(max(map(len, column)) + 3 for column in columns) + 1

    def rich(self, transpose: bool = False) -> Table:
        """For a terminal: rows as columns when the table is wide (one column per variant breaks words at 80)."""
        if not transpose:
            table = Table(title=self.title)
            for i, column in enumerate(self.header):
                table.add_column(column, justify="left" if i < self.text_columns else "right", no_wrap=True)
            for row in self.rows:
                table.add_row(*(Text(text, style="bold" if bold else "") for text, bold in row))
            return table
        table = Table(title=self.title)
        table.add_column("", no_wrap=True)
        for row in self.rows:
            table.add_column(" ".join(text for text, _ in row[:self.text_columns]).strip() or EMPTY,
                             justify="right", no_wrap=True)
        for i, column in enumerate(self.header[self.text_columns:], start=self.text_columns):
            table.add_row(column, *(Text(row[i][0], style="bold" if row[i][1] else "") for row in self.rows))
        return table


def _bold_best(cells: list[str], means: list[float | None]) -> list[Cell]:
    """Bold every cell whose mean is the row's maximum as displayed (two decimals in %), so shown ties tie."""
    shown = [None if m is None else round(100 * m, 2) for m in means]
    best = max((s for s in shown if s is not None), default=None)
    return [(text, best is not None and s == best) for text, s in zip(cells, shown)]


def _cell(values: list[float], expected: int | None = None, flagged: int = 0) -> str:
    """mean ± sample std in %; (n=k) when fewer runs completed than expected; ⚠k for runs with a health flag."""
    if not values:
        return EMPTY
    mean, std = stats.mean_std(values)
    text = _pct(mean) if std is None else f"{_pct(mean)} ± {_pct(std)}"
    if expected is not None and (len(values) < expected or len(values) == 1):
        text += f" (n={len(values)})"
    return text + (f" ⚠{flagged}" if flagged else "")


def _table3(pairs: list[_Pair], expected: dict[str, dict[str, int]]) -> _Table:
    columns = variants_mod.ordered({v for p in pairs for v in p.variants if variants_mod.parse(v).table == "table3"})
    header = ["Teacher", "Student", "Teacher acc."] + [("Student (no KD)" if v == "none" else _label(v))
                                                       for v in columns]
    rows, per_pair_means = [], []
    for pair in pairs:
        means = [statistics.mean(pair.values(v)) if pair.values(v) else None for v in columns]
        per_pair_means.append([statistics.mean(pair.teacher_accuracy()) if pair.teacher_accuracy() else None] + means)
        cells = _bold_best([_cell(pair.values(v), expected[pair.name].get(v), pair.flagged(v)) for v in columns],
                           means)
        # Two pairs of the same models (e.g. a label-noise control) are told apart by the pair's name.
        student = (pair.student_model if pair.name == f"{pair.teacher_model}->{pair.student_model}"
                   else f"{pair.student_model} ({pair.name})")
        rows.append([(pair.teacher_model, False), (student, False),
                     (_cell(pair.teacher_accuracy()), False)] + cells)
    # The average of a column is only shown when every pair has a number in it: a partial mean would mislead.
    columns_means = [[means[i] for means in per_pair_means] for i in range(len(columns) + 1)]
    averages = [statistics.mean(c) if c and None not in c else None for c in columns_means]
    average_cells = [EMPTY if a is None else _pct(a) for a in averages]
    rows.append([("Average", True), ("", False), (average_cells[0], False)]
                + _bold_best(average_cells[1:], averages[1:]))
    return _Table("Table 3: student test accuracy (%), mean ± sample std", header, rows, 2)


@dataclass
class _Comparison:
    """a − b over paired students, in points."""
    a: str
    b: str
    diffs: dict
    ci: tuple[float, float] | None
    p: float
    holm: float | None = None

    @property
    def mean(self) -> float | None:
        return 100 * statistics.mean(self.diffs.values()) if self.diffs else None

    @property
    def ci_points(self) -> tuple[float, float] | None:
        return None if self.ci is None else (100 * self.ci[0], 100 * self.ci[1])

    def ci_text(self) -> str:
        return EMPTY if self.ci is None else f"[{_points(100 * self.ci[0])}, {_points(100 * self.ci[1])}]"

    def sentence(self) -> str:
        if not self.diffs:
            return f"{_label(self.a)} and {_label(self.b)} cannot be compared: no paired students completed"
        wins, ties, losses = stats.sign_counts(list(self.diffs.values()))
        held = f", Holm-adjusted p = {self.holm:.3f}" if self.holm is not None else ""
        plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else ("es" if word.endswith("s") else "s"))
        return (f"{_label(self.a)} − {_label(self.b)} = {_points(self.mean)} points (95 % CI {self.ci_text()}, "
                f"{plural(wins, 'win')} / {plural(losses, 'loss')} in {len(self.diffs)} pairs, p = {self.p:.3f}"
                f"{held})")


def _compare(pair: _Pair, a: str, b: str) -> _Comparison:
    diffs = stats.paired_differences(pair.accuracy(a), pair.accuracy(b))
    return _Comparison(a, b, diffs, stats.hierarchical_bootstrap(diffs), stats.sign_flip_p(list(diffs.values())))


def _comparisons(pair: _Pair) -> dict[str, _Comparison]:
    """The study's questions, each as a paired comparison; the intermediate teachers vs T^full share one Holm
    correction (the family the paper's claim is about)."""
    have = set(pair.variants)
    out: dict[str, _Comparison] = {}
    if {"Tfull", "none"} <= have:
        out["gate"] = _compare(pair, "Tfull", "none")
    intermediate = [v for v in pair.variants if variants_mod.parse(v).base == "fraction"
                    and variants_mod.parse(v).table == "table3" and variants_mod.parse(v).temperature is None]
    if "Tfull" in have:
        family = {v: _compare(pair, v, "Tfull") for v in intermediate}
        adjusted = stats.holm({v: c.p for v, c in family.items() if c.diffs})
        for v, c in family.items():
            c.holm = adjusted.get(v)
            out[v] = c
        for v in pair.variants:
            parsed = variants_mod.parse(v)
            if v != "Tfull" and parsed.table == "table3" and v not in out and parsed.base != "none":
                out[v] = _compare(pair, v, "Tfull")  # T*, softness controls
    if {"snapshot", "full_ensemble"} <= have:
        out["snapshot"] = _compare(pair, "snapshot", "full_ensemble")
    return out


def _comparison_table(pairs: list[_Pair], comparisons: dict[str, dict[str, _Comparison]]) -> _Table:
    header = ["Pair", "Comparison", "Pairs", "Mean Δ (points)", "95 % CI", "Wins / ties / losses", "p", "Holm p"]
    rows = []
    for pair in pairs:
        for key, c in comparisons[pair.name].items():
            what = f"{_label(c.a)} − {_label(c.b)}" + (" (gate)" if key == "gate" else "")
            if not c.diffs:
                rows.append([(pair.name, False), (what, False)] + [(EMPTY, False)] * 6)
                continue
            wins, ties, losses = stats.sign_counts(list(c.diffs.values()))
            rows.append([(pair.name, False), (what, False), (str(len(c.diffs)), False), (_points(c.mean), False),
                         (c.ci_text(), False), (f"{wins} / {ties} / {losses}", False), (f"{c.p:.3f}", False),
                         (EMPTY if c.holm is None else f"{c.holm:.3f}", False)])
    return _Table("Paired comparisons: student accuracy differences", header, rows, 2)


def _claim(c: _Comparison) -> str:
    """confirmed / refuted at this scale / inconclusive, for a comparison whose claim is 'a beats b'."""
    if not c.diffs or c.ci is None:
        return "inconclusive"
    p = c.holm if c.holm is not None else c.p
    low, high = c.ci_points
    if p < 0.05 and low > 0:
        return "confirmed"
    if high < GATE_POINTS:
        return "refuted at this scale"
    return "inconclusive"


def _findings(pair: _Pair, comparisons: dict[str, _Comparison]) -> tuple[str, str]:
    """(verdict, paragraph) for one pair."""
    gate = comparisons.get("gate")
    if gate is None:
        return "inconclusive", (f"**{pair.name}: inconclusive.** The study has no no-KD and T^full students to "
                                "compare, so whether KD helped at all is unknown; no teacher is ranked.")
    passed = gate.diffs and gate.ci is not None and gate.mean >= GATE_POINTS and gate.ci_points[0] > 0
    if not passed:
        return "inconclusive", (f"**{pair.name}: inconclusive: KD itself did not help here.** {gate.sentence()}; the "
                                f"gate needs at least +{GATE_POINTS:g} points with the interval above 0, so the "
                                "teacher variants are not ranked (their numbers are in the tables).")
    sentences = [f"KD helped: {gate.sentence()}."]
    intermediate = [comparisons[v] for v in pair.variants if v in comparisons
                    and variants_mod.parse(v).base == "fraction" and comparisons[v].holm is not None]
    verdict = "inconclusive"
    if intermediate:
        claims = [_claim(c) for c in intermediate]
        best = max(intermediate, key=lambda c: c.mean)
        if "confirmed" in claims:
            verdict = "confirmed"
            winners = [_label(c.a) for c, claim in zip(intermediate, claims) if claim == "confirmed"]
            sentences.append(f"An intermediate checkpoint is the better teacher: {', '.join(winners)} beat T^full "
                             f"after Holm's correction over the {len(intermediate)} intermediate teachers; the "
                             f"largest gain: {best.sentence()}.")
        elif all(claim == "refuted at this scale" for claim in claims):
            verdict = "refuted at this scale"
            sentences.append(f"No intermediate checkpoint beat T^full, and every interval rules out a gain of "
                             f"{GATE_POINTS:g} points or more; the closest: {best.sentence()}.")
        else:
            sentences.append(f"No intermediate checkpoint beat T^full significantly, but the data cannot rule out a "
                             f"gain of {GATE_POINTS:g} points; the best: {best.sentence()}.")
    for v in pair.variants:
        parsed = variants_mod.parse(v)
        if v in comparisons and parsed.base == "Tstar":
            sentences.append(f"T* (the information criterion's pick) against T^full: {_claim(comparisons[v])}; "
                             f"{comparisons[v].sentence()}.")
        elif v in comparisons and parsed.temperature is not None:
            sentences.append(f"The softness control {_label(v)} against T^full: {comparisons[v].sentence()}; if "
                             "softer targets alone explained a gain of the intermediate teachers, this would gain "
                             "as much.")
    if "snapshot" in comparisons:
        c = comparisons["snapshot"]
        sentences.append(f"Snapshot vs full ensemble: {_claim(c)}; {c.sentence()}.")
    return verdict, f"**{pair.name}: {verdict}.** " + " ".join(sentences)


def _ensemble_table(pairs: list[_Pair], expected: dict) -> _Table:
    header = ["Pair", "Snapshot teachers", "Student (snapshot)", "Full-ensemble teachers", "Student (full ens.)",
              "Δ snapshot − full", "Snapshot better"]
    rows = []
    for pair in pairs:
        if not {"snapshot", "full_ensemble"} <= set(pair.variants):
            continue
        snap, full = pair.values("snapshot"), pair.values("full_ensemble")
        means = [statistics.mean(snap) if snap else None, statistics.mean(full) if full else None]
        students = _bold_best([_cell(snap, expected[pair.name].get("snapshot"), pair.flagged("snapshot")),
                               _cell(full, expected[pair.name].get("full_ensemble"), pair.flagged("full_ensemble"))],
                              means)
        diffs = list(stats.paired_differences(pair.accuracy("snapshot"), pair.accuracy("full_ensemble")).values())
        wins = f"{sum(d > 0 for d in diffs)} of {len(diffs)}" if diffs else EMPTY
        diff = EMPTY if None in means else _points(100 * (means[0] - means[1]))
        teachers = [_cell(pair.ensemble_teacher_accuracy(v)) for v in ("snapshot", "full_ensemble")]
        rows.append([(pair.name, False), (teachers[0], False), students[0], (teachers[1], False), students[1],
                     (diff, False), (wins, False)])
    return _Table("Full ensemble vs snapshot ensemble: test accuracy (%)", header, rows, 1)


def _duration(row: dict) -> float | None:
    """A run's share of the wall time: runs trained as one group (claimed together: one claimer, one start) split
    the group's time evenly, so a sum over runs is the time the workers spent."""
    seconds = (row.get("timings") or {}).get("duration_s") if row["status"] == "complete" else None
    return None if seconds is None else seconds / row.get("claimed_with", 1)


def _mark_groups(rows: list[dict]) -> int:
    """Set each completed row's `claimed_with` (the size of the group it was claimed in); returns how many groups
    of more than one run there were."""
    key = lambda r: (r.get("claimer"), (r.get("timings") or {}).get("started_at"))  # noqa: E731
    sizes = Counter(key(r) for r in rows if r["status"] == "complete")
    for r in rows:
        if r["status"] == "complete":
            r["claimed_with"] = sizes[key(r)]
    return sum(1 for n in sizes.values() if n > 1)


def _mean_seconds(rows) -> str:
    seconds = [d for d in map(_duration, rows) if d is not None]
    return f"{statistics.mean(seconds):.1f}" if seconds else EMPTY


def _cache_table(pairs: list[_Pair], online: list[str], expected: dict) -> _Table:
    header = ["Pair", "Teacher", "Student (cached)", "Student (online)", "Δ cached − online", "Δ / pooled std",
              "Cached better", "Within seed noise", "Time cached (s)", "Time online (s)"]
    rows = []
    for pair in pairs:
        for variant in online:
            base = variants_mod.parse(variant).plain.name
            cached, live = pair.accuracy(base), pair.accuracy(variant)
            diff = ratio = noise = wins = EMPTY
            if cached and live:
                (mean_c, std_c), (mean_o, std_o) = stats.mean_std(list(cached.values())), stats.mean_std(
                    list(live.values()))
                diff = _points(100 * (mean_c - mean_o))
                if std_c is not None and std_o is not None and std_c + std_o > 0:
                    pooled = math.sqrt((std_c ** 2 + std_o ** 2) / 2)
                    ratio = _points((mean_c - mean_o) / pooled)
                    noise = "yes" if abs(mean_c - mean_o) <= pooled else "no"
            paired = stats.paired_differences(cached, live)
            if paired:
                better, _, worse = stats.sign_counts(list(paired.values()))
                wins = f"{better} of {len(paired)} (sign test p = {stats.sign_test(better, worse):.2f})"
            rows.append([(pair.name, False), (_label(base), False),
                         (_cell(pair.values(base), expected[pair.name].get(base)), False),
                         (_cell(pair.values(variant), expected[pair.name].get(variant)), False), (diff, False),
                         (ratio, False), (wins, False), (noise, False),
                         (_mean_seconds(pair.students.get(base, {}).values()), False),
                         (_mean_seconds(pair.students.get(variant, {}).values()), False)])
    return _Table("Teacher cache: student test accuracy (%), cached vs online teachers", header, rows, 2)


def _time_table(rows: list[dict]) -> tuple[_Table, str]:
    """Wall time summed by kind of run, and a sentence on the teacher caches built and reused."""
    parts: dict[str, list[float]] = {}
    built = reused = 0
    build_s = 0.0
    for row in rows:
        seconds = _duration(row)
        if seconds is None:
            continue
        group, metrics = row["group"] or {}, row["metrics"] or {}
        role = group.get("role")
        if role == "analysis" or row["kind"] == "analyze":
            part = "checkpoint analysis"
        elif role != "student":
            part = "teacher training"
        elif group.get("variant") == "none" or not metrics.get("teachers"):
            part = "students, no KD"
        else:
            cache = metrics.get("teacher_cache")
            part = "KD students, cached teachers" if cache else "KD students, teachers online"
            if cache:
                built += cache.get("built", 0)
                reused += cache.get("reused", 0)
                build_s += cache.get("seconds", 0.0) if cache.get("built") else 0.0
        parts.setdefault(part, []).append(seconds)
    order = ["teacher training", "checkpoint analysis", "students, no KD", "KD students, cached teachers",
             "KD students, teachers online"]
    table_rows = [[(part, False), (str(len(parts[part])), False), (f"{sum(parts[part]):.0f}", False),
                   (f"{statistics.mean(parts[part]):.1f}", False)] for part in order if part in parts]
    total = [d for d in map(_duration, rows) if d is not None]
    table_rows.append([("total", True), (str(len(total)), False), (f"{sum(total):.0f}", True), ("", False)])
    note = (f"Teacher caches: {built} built ({build_s:.0f} s, inside the KD-student times above) and reused "
            f"{reused} times." if built or reused else "No teacher cache was used.")
    return _Table("Compute time: wall seconds per kind of run", ["Runs", "Count", "Total (s)", "Mean (s)"],
                  table_rows, 1), note


# ---- the selection benchmark: one student per saved checkpoint, and how much each selector loses ----

SELECTORS = (("T* (info, train)", "info@train"), ("info, val", "info@val"), ("kNN info, train", "knn-info@train"),
             ("p_target, train", "p_target@train"), ("non-target entropy, train", "nontarget_entropy@train"),
             ("NC1, train", "nc1@train"), ("best val accuracy", "best-val"), ("T^0.5", "T0.5"), ("T^full", "Tfull"))


def _curve(pair: _Pair) -> dict[int, dict[int, dict[int, float]]]:
    """trajectory -> teacher epoch -> seed -> student accuracy, from the epoch<N> students."""
    out: dict[int, dict[int, dict[int, float]]] = {}
    for variant in pair.variants:
        parsed = variants_mod.parse(variant)
        if parsed.base != "epoch":
            continue
        for (t, s), acc in pair.accuracy(variant).items():
            out.setdefault(t, {}).setdefault(parsed.epoch, {})[s] = acc
    return out


def _picks(pair: _Pair, trajectory: int, epochs: list[int]) -> dict[str, int | None]:
    row = pair.analyses.get(trajectory)
    metrics = (row or {}).get("metrics") or {}
    picks = metrics.get("picks") or {}
    out = {}
    for label, key in SELECTORS:
        if key == "best-val":
            rows = metrics.get("trajectory") or []
            best = max(rows, key=lambda r: (r.get("val_acc") or -1, r["epoch"]), default=None)
            out[label] = best["epoch"] if best else None
        elif key == "T0.5":
            out[label] = epoch_at_fraction(0.5, pair.teacher_epochs) if pair.teacher_epochs else None
        elif key == "Tfull":
            out[label] = max(epochs) if epochs else None
        else:
            out[label] = (picks.get(key) or {}).get("t_star")
    return out


def _selection_section(pair: _Pair, plots_dir: Path) -> tuple[list[str], str | None]:
    curve = _curve(pair)
    if not curve:
        return [], None
    regrets: dict[str, list[float]] = {label: [] for label, _ in SELECTORS}
    gains: dict[str, list[float]] = {label: [] for label, _ in SELECTORS}
    chosen: dict[str, dict[int, int | None]] = {label: {} for label, _ in SELECTORS}
    for t, by_epoch in sorted(curve.items()):
        epochs = sorted(by_epoch)
        best = max(epochs, key=lambda e: (statistics.mean(by_epoch[e].values()), e))
        last = max(epochs)
        for label, pick in _picks(pair, t, epochs).items():
            chosen[label][t] = pick
            if pick not in by_epoch:
                continue
            for s, acc in by_epoch[pick].items():
                if s in by_epoch[best]:
                    regrets[label].append(100 * (acc - by_epoch[best][s]))
                if s in by_epoch[last]:
                    gains[label].append(100 * (acc - by_epoch[last][s]))

    def mean_se(values: list[float]) -> str:
        if not values:
            return EMPTY
        mean, se = stats.mean_se(values)
        return _points(mean) + ("" if se is None else f" ± {se:.2f}")

    header = ["Selector", "Picked epoch (per trajectory)", "Regret (points)", "Gain over T^full (points)", "n"]
    rows = [[(label, False), (", ".join(EMPTY if chosen[label].get(t) is None else str(chosen[label][t])
                                       for t in sorted(curve)), False),
             (mean_se(regrets[label]), False), (mean_se(gains[label]), False), (str(len(regrets[label])), False)]
            for label, _ in SELECTORS]
    table = _Table(f"Selection benchmark, {pair.name}", header, rows, 2)
    lines = [f"Every saved checkpoint of each trajectory taught a student (the `epoch<N>` variants), so the best "
             f"teacher in hindsight is known: the epoch whose students have the highest mean accuracy over seeds, "
             f"per trajectory. Regret: the accuracy of the student of a selector's pick minus that of the best "
             f"epoch's student with the same seed (0 is perfect, negative is lost); gain: minus T^full's student. "
             f"Mean ± SE over (trajectory, seed).", ""] + table.markdown()
    path = plots_dir / f"selection_{_slug(pair.name)}.png"
    _selection_plot(pair, curve, chosen, path)
    lines += ["", f"![Student accuracy against teacher epoch, {pair.name}](plots/{path.name})", "",
              "Student accuracy against the epoch of the checkpoint that taught it (mean ± SE over seeds, one line "
              "per trajectory), with each selector's pick marked on its trajectory's line.", ""]
    return lines, str(path)


def _selection_plot(pair: _Pair, curve: dict, chosen: dict, path: Path) -> str:
    from ...selection.plots import plt, save

    markers = "*^vsDPXo<>"
    fig, ax = plt.subplots(figsize=(8, 4.4), layout="constrained")
    for i, (t, by_epoch) in enumerate(sorted(curve.items())):
        epochs = sorted(by_epoch)
        means = [100 * statistics.mean(by_epoch[e].values()) for e in epochs]
        ses = [100 * (stats.mean_se(list(by_epoch[e].values()))[1] or 0.0) for e in epochs]
        color = f"C{i}"
        ax.errorbar(epochs, means, yerr=ses, fmt="-", color=color, capsize=2, lw=1.2, label=f"trajectory {t}")
        for j, (label, _) in enumerate(SELECTORS):
            pick = chosen[label].get(t)
            if pick in by_epoch:
                ax.scatter([pick], [means[epochs.index(pick)]], marker=markers[j % len(markers)], s=70,
                           facecolor="none", edgecolor=color, lw=1.1, zorder=3,
                           label=label if i == 0 else None)
    ax.set_xlabel("teacher epoch (the checkpoint that taught the student)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"selection benchmark — {pair.teacher_model} → {pair.student_model}")
    fig.legend(loc="outside right center", fontsize=7, frameon=False)
    return save(fig, path)


# ---- teacher trajectories ----

def _trajectory_rows(pair: _Pair, study: Path, t: int) -> tuple[dict | None, str | None]:
    """The analysis summary of trajectory t: from the database, else from the teacher's analysis.json."""
    row = pair.analyses.get(t)
    if row is None or row["status"] != "complete":
        return None, None
    metrics = row["metrics"] or {}
    if metrics.get("trajectory") and isinstance(metrics["trajectory"][0].get("i_xf"), list):
        return metrics, row["path"]
    path = study / (metrics.get("analysis") or f"{row['path']}/analysis.json")
    if path.is_file():
        from ..summaries import analysis_metrics

        from ...run import Run
        from ...run.folder import sealed_since_0_3

        analysis = read_sealed_json(path, "analysis", remedy=f"rerun `ckptkd analyze {path.parent}`",
                                    required=sealed_since_0_3)
        if analysis.get("format") == 2:
            run = Run(study / row["path"])
            recorded = ({c.epoch: c.metrics for c in run.manifest.checkpoints}
                        if (run.path / "manifest.json").is_file() else None)
            return analysis_metrics(analysis, Path(row["path"]), recorded), row["path"]
    return None, row["path"]


def _pm(pair_value, digits: int) -> str:
    mean, se = pair_value if isinstance(pair_value, list) else (pair_value, None)
    if mean is None:
        return "failed"
    return f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def _trajectory_section(pair: _Pair, study: Path, t: int) -> list[str] | None:
    metrics, path = _trajectory_rows(pair, study, t)
    if metrics is None:
        return None
    header = ["Epoch", "Fraction", "Train %", "Val %", "Test %", "Confidence %", "p_t@τ", "Non-target entropy",
              "NC1", "I(X;F)", "I(Y;F)", "Score", ""]
    rows = []
    selected, ties = metrics["selected_epoch"], metrics.get("ties") or []
    for r in metrics["trajectory"]:
        num = lambda key, spec: EMPTY if r.get(key) is None else format(r[key], spec)
        rows.append([(str(r["epoch"]), False), (f"{r['fraction']:.2f}", False),
                     (EMPTY if r.get("train_acc") is None else _pct(r["train_acc"]), False),
                     (_pct(r["val_acc"]), False), (EMPTY if r.get("test_acc") is None else _pct(r["test_acc"]), False),
                     (_pct(r["confidence"]), False), (num("p_target_t", ".3f"), False),
                     (num("nontarget_entropy_t", ".3f"), False), (num("nc1", ".3g"), False),
                     (_pm(r["i_xf"], 2), False), (_pm(r["i_yf"], 3), False),
                     ("skipped" if r["score"][0] is None else _pm(r["score"], 2), False),
                     ("T*" if r["epoch"] == selected else ("tie" if r["epoch"] in ties else ""), False)])
    agreement = metrics.get("agreement") or {}
    rho = lambda key: "undefined" if agreement.get(key) is None else f"{agreement[key]:.3f}"
    lines = [f"Trajectory {t} (`{path}`): T* = epoch {selected} by {metrics.get('criterion')}, tied with "
             f"{', '.join(str(e) for e in ties if e != selected) or 'none'}. Train %: the un-augmented training "
             f"images in eval mode; confidence, p_t@τ (the tempered probability of the true class), non-target "
             f"entropy (nats, at τ) and NC1 on the {metrics.get('split')} split; I(X;F), I(Y;F) and the score: "
             "mean ± SE over split seeds.", ""]
    lines += _Table("", header, rows, 0).markdown()
    lines += ["", f"Spearman rank agreement of the probe/decoder and kNN estimators across checkpoints: I(X;F) "
                  f"{rho('spearman_i_xf')}, I(Y;F) {rho('spearman_i_yf')}, score {rho('spearman_score')}."]
    return lines


def _previous_sections(report: Path) -> dict[str, list[str]]:
    """A previous report's sections by heading ("## X" or "### X"), body lines without the heading."""
    if not report.is_file():
        return {}
    sections, current = {}, None
    for line in report.read_text(encoding="utf-8").splitlines():
        if line.startswith("## ") or line.startswith("### "):
            current = line
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    for body in sections.values():
        while body and not body[-1].strip():
            body.pop()
    return sections


def _carry(previous: dict[str, list[str]], heading: str) -> list[str] | None:
    body = previous.get(heading)
    if body is None:
        return None
    body = [line for line in body if line != CARRIED]
    while body and not body[0].strip():
        body.pop(0)
    return [CARRIED, ""] + body


def _accuracy_plot(pairs: list[_Pair], path: Path) -> str:
    from ...selection.plots import plt, save

    shown = {p.name: [v for v in p.variants if v != "none" and variants_mod.parse(v).table in ("table3", "ensembles")]
             for p in pairs}
    width = max(len(v) for v in shown.values()) if shown else 1
    fig, axes = plt.subplots(1, len(pairs), figsize=((1.5 + 0.65 * width) * len(pairs), 3.8), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for x, variant in enumerate(shown[pair.name]):
            values = [100 * v for v in pair.values(variant)]
            if not values:
                continue
            ax.scatter(x + np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [x], values, s=12,
                       color="0.55", zorder=2)
            mean, std = stats.mean_std(values)
            ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="o", color="C0", capsize=4, zorder=3)
        baseline = [100 * v for v in pair.values("none")]
        if baseline:
            mean, std = stats.mean_std(baseline)
            ax.axhline(mean, color="crimson", ls="--", lw=1, label="no KD (mean ± std)")
            if std:
                ax.axhspan(mean - std, mean + std, color="crimson", alpha=0.08, lw=0)
            ax.legend(fontsize=7, frameon=False, loc="best")
        ax.set_xticks(range(len(shown[pair.name])), [_label(v) for v in shown[pair.name]], rotation=30, ha="right")
        ax.set_ylabel("student test accuracy (%)")
        ax.set_title(pair.name, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.]+", "-", name).strip("-")


def _load(study: Path) -> tuple[dict, list[dict], ResultsDB]:
    if not study.is_dir():
        raise UserError(f"study folder not found: {study}")
    if not (study / "results.sqlite").is_file() or not (study / "study.yaml").is_file():
        raise UserError(f"{study} is not a ckptkd study (it needs results.sqlite and study.yaml)")
    config = read_yaml(study / "study.yaml")
    db = ResultsDB(study / "results.sqlite", readonly=True, max_attempts=config.get("max_attempts", 2))
    return config, db.rows(), db


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        group, metrics, timings = row["group"] or {}, row["metrics"] or {}, row["timings"] or {}
        values = {**{k: row[k] for k in ("run_id", "kind", "name", "status", "path")},
                  **{k: group.get(k) for k in ("pair", "role", "variant", "seed", "teacher_seed")},
                  **{k: metrics.get(k) for k in ("test_acc", "test_acc_last_k", "val_acc", "best_val_acc",
                                                 "best_val_epoch", "teacher_test_acc")},
                  "health": " ".join(_flags(row)), "duration_s": timings.get("duration_s")}
        writer.writerow(["" if values[k] is None else values[k] for k in CSV_COLUMNS])
    return buffer.getvalue()


def _dataset(config: dict) -> str:
    names = []
    for p in config.get("pairs") or []:
        data = (p.get("teacher") or {}).get("data") or {}
        if data.get("name"):
            noise = data.get("label_noise") or 0
            names.append(data["name"] + (f" ({100 * noise:g} % label noise)" if noise else ""))
    return ", ".join(dict.fromkeys(names)) or "unknown"


def _expected(config: dict, pairs: list[_Pair]) -> dict[str, dict[str, int]]:
    """How many distinct students each cell should have once complete (from the planned rows)."""
    return {p.name: {v: len({r["run_id"] for r in cells.values()}) for v, cells in p.students.items()}
            for p in pairs}


def _header(config: dict, study: Path, rows: list[dict], pairs: list[_Pair], metric: str) -> list[str]:
    trajectories = sorted({t for p in pairs for cells in p.students.values() for (t, _s) in cells})
    seeds = sorted({s for p in pairs for cells in p.students.values() for (_t, s) in cells})
    complete = sum(r["status"] == "complete" for r in rows)
    lines = [f"# Study report: {config.get('name', study.name)}", "",
             f"- Data set: {_dataset(config)}",
             f"- Teacher trajectories: {len(trajectories)} (numbered {', '.join(map(str, trajectories)) or EMPTY}); "
             f"student seeds: {', '.join(map(str, seeds)) or EMPTY} (students are paired by trajectory and seed: the same teacher "
             "run, initial weights and batch order across variants)",
             f"- Ensemble size M = {config.get('ensemble_size', EMPTY)}",
             f"- Accuracy: {metric} in %. ± in tables is the sample standard deviation (ddof = 1) over the students "
             "of a cell (over trajectories for teacher accuracy); (n=k) marks a cell with fewer completed runs than "
             "planned, and with n=1 the std is undefined; ⚠k counts students whose run was flagged unhealthy "
             "(see Run health), which are kept in the numbers, not hidden.",
             f"- Paired comparisons: mean of the paired differences, a 95 % hierarchical bootstrap interval "
             f"(trajectories, then seeds within them, resampled; 10,000 draws), a two-sided sign-flip randomisation "
             f"test, and Holm's correction over the intermediate teachers. Gate: unless T^full beats no KD by at "
             f"least {GATE_POINTS:g} points with its interval above 0, no teacher is ranked.",
             f"- Runs: {len(rows)} in results.sqlite, {complete} complete.", ""]
    if config.get("description"):
        lines += [str(config["description"]).strip(), ""]
    if complete < len(rows):
        counts = {s: sum(r["status"] == s for r in rows) for s in ("pending", "running", "failed")}
        lines += [f"**{len(rows) - complete} of {len(rows)} runs are not complete** ("
                  + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                  + "); cells use the completed runs only and show — where none completed.", ""]
    variants = variants_mod.ordered({v for p in pairs for v in p.variants if variants_mod.parse(v).base != "epoch"})
    curve = any(variants_mod.parse(v).base == "epoch" for p in pairs for v in p.variants)
    lines += ["Variants:", ""] + [f"- **{_label(v)}** (`{v}`): {variants_mod.parse(v).meaning(config)}"
                                  for v in variants]
    if curve:
        lines.append("- **T@N** (`epoch<N>`): KD from the teacher's checkpoint at epoch N, for every saved "
                     "checkpoint (the selection benchmark)")
    return lines + [""]


def write_report(study: str | Path, *, console: Console | None = None,
                 quiet: bool = False) -> dict[str, str | list[str]]:
    """Write STUDY/report.md, STUDY/results.csv and STUDY/plots/*.png; print the findings and the main tables.

    Returns {"report": path, "csv": path, "plots": [paths], "carried_over": [headings], "verdicts": {pair: ...}}.
    """
    study = Path(study)
    config, rows, db = _load(study)
    groups = _mark_groups(rows)  # before any time is read: a group's runs share its time
    for leftovers in (study, study / "plots"):  # of a killed report
        remove_stale_temporaries(leftovers, shared=True)
    try:
        blocked = {r["run_id"]: r["blocked_by"] for r in db.blocked()}
    finally:
        db.close()
    report = study / "report.md"
    previous = _previous_sections(report)
    pairs = _pairs(config, rows)
    expected = _expected(config, pairs)
    students = [r for r in rows if (r["group"] or {}).get("role") == "student" and _done(r)]
    have_last_k = any((r["metrics"] or {}).get("test_acc_last_k") is not None for r in students)
    metric = ("the mean test accuracy of each student's last k epochs (k = `eval.last_k`, default 5)" if have_last_k
              else "last-epoch test accuracy (this study predates the last-k mean)")
    lines = _header(config, study, rows, pairs, metric)
    plots_dir = study / "plots"
    plots, carried = [], []

    comparisons = {p.name: _comparisons(p) for p in pairs}
    verdicts, paragraphs = {}, []
    for pair in pairs:
        verdicts[pair.name], text = _findings(pair, comparisons[pair.name])
        paragraphs += [text, ""]
    lines += ["## Findings", ""] + paragraphs

    table3 = _table3(pairs, expected)
    tables = [table3]
    lines += ["## Table 3: teacher checkpoints as teachers", "", "Best student accuracy of each row in bold; the "
              "Average row is the mean of the per-pair means (shown only when every pair has a number).", ""]
    lines += table3.markdown() + [""]
    compared = _comparison_table(pairs, comparisons)
    if compared.rows:
        tables.append(compared)
        lines += ["## Paired comparisons", "", "Δ: first minus second variant, in points, over students paired by "
                  "(trajectory, seed). Holm p: adjusted over the intermediate teachers of a pair.", ""]
        lines += compared.markdown() + [""]
    ensembles = _ensemble_table(pairs, expected)
    if ensembles.rows:
        tables.append(ensembles)
        lines += ["## Full ensemble vs snapshot ensemble", "",
                  "Teachers: the accuracy of the teacher ensemble, averaged over distinct teacher sets. Δ: difference "
                  "of the student means in points; Snapshot better: paired students for which the snapshot won.", ""]
        lines += ensembles.markdown() + [""]
    online = variants_mod.ordered({v for p in pairs for v in p.students if v and v.endswith("@online")})
    if online:
        cache_table = _cache_table(pairs, online, expected)
        tables.append(cache_table)
        lines += ["## Teacher cache: cached vs online teachers", "",
                  "The same students (same seeds, so the same initial weights and batch order; the augmentation draws "
                  "differ, since cached students draw among each image's banked views) distilled from teacher "
                  "outputs looked up in the view-bank cache and from teachers run on every batch. Δ: cached − online "
                  "in points and in pooled standard deviations; within seed noise when |Δ| is at most one pooled "
                  "standard deviation. Cached better: paired students for which the cached one won, with the "
                  "two-sided sign test of wins against losses.", ""]
        lines += cache_table.markdown() + [""]

    for pair in pairs:
        section, plot = _selection_section(pair, plots_dir)
        if section:
            lines += [f"## Selection benchmark: {pair.name}", ""] + section
            plots.append(plot)

    flagged = [r for r in rows if _done(r) and _flags(r)]
    lines += ["## Run health", ""]
    if flagged:
        lines += [f"{len(flagged)} completed runs were flagged (kept in every number above, marked ⚠):", ""]
        for r in flagged:
            details = "; ".join(f"{f['flag']} at epoch {f['epoch']}: {f['detail']}"
                                for f in r["metrics"]["health"]["flags"])
            lines.append(f"- `{r['name']}` ({(r['group'] or {}).get('variant') or r['kind']}): {details}")
    elif any("health" in (r["metrics"] or {}) for r in rows if _done(r)):
        lines.append("No run was flagged: no training loss rose for several epochs and no training accuracy "
                     "collapsed.")
    else:
        lines.append("This study predates run health checks: its runs were not assessed.")
    lines.append("")

    time_table, cache_note = _time_table(rows)
    timings = [r["timings"] for r in rows if r["status"] == "complete" and (r.get("timings") or {}).get("started_at")]
    span = (f" From the first run's start to the last run's end the study took "
            f"{(max(t['finished_at'] for t in timings) - min(t['started_at'] for t in timings)) / 60:.1f} minutes "
            f"on {len({r['claimer'] for r in rows if r['status'] == 'complete'})} worker process(es)."
            if timings else "")
    fused = (f" {groups} groups of runs were trained together (fused; `fuse` in study.yaml): each run of a group is "
             "given an even share of the group's time." if groups else "")
    lines += ["## Compute time", "", "Wall time of each completed run as the study measured it (this machine, "
              "whatever else it was doing), summed by kind of run. A cache is built by the first student that needs "
              f"it and reused by every later one.{fused}{span}", ""]
    lines += time_table.markdown() + ["", cache_note, ""]

    figures = []
    lines += ["## Teacher trajectories", ""]
    for pair in pairs:
        trajectories = sorted(pair.analyses) or sorted({r["group"].get("teacher_seed", 0) for r in pair.teachers})
        if not trajectories:
            lines += [f"### {pair.name}", "", f"{pair.name}: the trajectory teacher has not completed yet.", ""]
            continue
        for t in trajectories:
            heading = f"### {pair.name}" if len(trajectories) == 1 else f"### {pair.name}, trajectory {t}"
            section = _trajectory_section(pair, study, t)
            if section is None:
                # A report from before trajectories were numbered had one section per pair: keep it with the first.
                section = _carry(previous, heading) or (_carry(previous, f"### {pair.name}")
                                                        if t == trajectories[0] else None)
                if section is not None:
                    carried.append(heading)
                else:
                    section = [f"{pair.name}: the teacher of trajectory {t} has not been analysed yet."]
            lines += [heading, ""] + section + [""]
        lead = next((r for r in pair.teachers if r["status"] == "complete"), None)
        for figure in TEACHER_FIGURES:
            target = plots_dir / f"{figure}_{_slug(pair.name)}.png"
            source = study / lead["path"] / "plots" / f"{figure}.png" if lead is not None else None
            if source is not None and source.is_file():
                atomic_write_bytes(target, source.read_bytes())
            if target.is_file():  # rebuilt, or kept from an earlier report when the run folder is not here
                plots.append(str(target))
                figures += [f"![{figure.replace('_', ' ')}, {pair.name}](plots/{target.name})", ""]

    lines += ["## Plots", ""]
    if pairs:
        plots.insert(0, _accuracy_plot(pairs, plots_dir / "accuracy_by_variant.png"))
        lines += ["![Student accuracy by variant](plots/accuracy_by_variant.png)", "",
                  "Student test accuracy by variant: mean ± std (error bars), one dot per student; the dashed line "
                  "and band are the no-KD baseline's mean ± std.", ""]
    lines += figures

    not_complete = [r for r in rows if r["status"] != "complete"]
    names = {r["run_id"]: r["name"] for r in rows}
    if not_complete:
        lines += ["## Runs not complete", ""]
        for r in not_complete:
            error = f": {r['error'].splitlines()[0]}" if r["error"] else ""
            culprits = [names.get(c, c) for c in blocked.get(r["run_id"], [])]
            waits = f"; blocked by failed {', '.join(culprits)}" if culprits else ""
            lines.append(f"- `{r['name']}` ({r['kind']}, {r['status']}, attempts: {r['attempts']}{waits}){error}")
        lines.append("")

    csv_path = study / "results.csv"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(csv_path, _csv(rows))
    if not quiet:
        console = console or terminal_console()
        for text in paragraphs:
            if text:
                console.print(text.replace("**", ""))
        skipped = []
        for table in tables:  # whole words only: a table too wide for the terminal is turned, or left to report.md
            fitting = next((table.rich(transpose=turned) for turned in (False, True)
                            if table.width(turned) <= console.width), None)
            if fitting is None:
                skipped.append(table.title.split(":")[0])
            else:
                console.print(fitting)
        if skipped:
            console.print(f"too wide for {console.width} columns, in {report}: {'; '.join(skipped)}")
        if carried:
            console.print(f"carried over from the previous report (run folders not here): {', '.join(carried)}")
        if not_complete:
            console.print(f"{len(not_complete)} of {len(rows)} runs are not complete; see {report}")
    return {"report": str(report), "csv": str(csv_path), "plots": plots, "carried_over": carried,
            "verdicts": verdicts}
