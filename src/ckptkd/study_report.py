"""`ckptkd report STUDY`: the study's results as the paper presents them, in report.md, results.csv and plots/.

Everything is read from results.sqlite, study.yaml and the teachers' run folders; the report has no timestamps, so
identical results give identical files apart from the measured wall times. Accuracies are last-epoch test
accuracies; ± is the sample standard deviation (ddof = 1), so it is undefined for a single seed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .config import read_yaml
from .errors import UserError
from .plots import plt, save
from . import variants as variants_mod
from .results import ResultsDB
from .report import terminal_console
from .storage import atomic_write_bytes, atomic_write_text

EMPTY = "—"
CSV_COLUMNS = ("run_id", "kind", "name", "status", "pair", "role", "variant", "seed", "teacher_seed", "test_acc",
               "val_acc", "best_val_acc", "best_val_epoch", "teacher_test_acc", "duration_s", "path")
TEACHER_FIGURES = ("information_plane", "class_correlation", "trajectory")

Cell = tuple[str, bool]  # (text, bold)


def _fraction(variant: str) -> float | None:
    """The fraction of training an intermediate-teacher variant (T0.5) names; None for every other variant."""
    v = variants_mod.parse(variant)
    return v.fraction if v.base == "fraction" and v.table == "table3" and v.temperature is None else None


def _variant_order(variant: str) -> tuple:
    return variants_mod.parse(variant).order


def _label(variant: str) -> str:
    return variants_mod.parse(variant).label


def _meaning(variant: str, study: dict) -> str:
    return variants_mod.parse(variant).meaning(study)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.]+", "-", name).strip("-")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) >= 2 else None)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _signed(value: float) -> str:
    if round(value, 2) == 0:
        return "0.00"
    return f"{value:+.2f}".replace("-", "−")


def _cell(values: list[float], expected: int | None = None) -> str:
    """mean ± std in %; `expected` (the study's seed count) marks cells with fewer completed runs or a single one."""
    if not values:
        return EMPTY
    mean, std = _mean_std(values)
    text = _pct(mean) if std is None else f"{_pct(mean)} ± {_pct(std)}"
    if expected is not None and (len(values) < expected or len(values) == 1):
        text += f" (n={len(values)})"
    return text


def _done(row: dict) -> bool:
    return row["status"] == "complete" and bool(row["metrics"]) and row["metrics"].get("test_acc") is not None


@dataclass
class _Pair:
    name: str
    teacher_model: str
    student_model: str
    teachers: list[dict] = field(default_factory=list)
    analyses: list[dict] = field(default_factory=list)
    students: dict[str, list[dict]] = field(default_factory=dict)

    def accuracy(self, variant: str) -> dict[int, float]:
        """Completed students' test accuracy by seed: students with the same seed are paired across variants."""
        done = (r for r in self.students.get(variant, []) if _done(r))
        return {r["group"]["seed"]: r["metrics"]["test_acc"] for r in sorted(done, key=lambda r: r["group"]["seed"])}

    def values(self, variant: str) -> list[float]:
        return list(self.accuracy(variant).values())

    def teacher_accuracy(self) -> list[float]:
        return [r["metrics"]["test_acc"] for r in self.teachers if _done(r)]

    def ensemble_teacher_accuracy(self, variant: str) -> list[float]:
        """The teacher (ensemble) accuracy once per distinct teacher set: every student of a set reports the same."""
        by_set = {}
        for r in self.students.get(variant, []):
            if _done(r) and r["metrics"].get("teacher_test_acc") is not None:
                key = tuple(r["metrics"].get("teachers") or [r["group"].get("teacher_seed")])
                by_set[key] = r["metrics"]["teacher_test_acc"]
        return list(by_set.values())

    def teacher_epochs(self, variant: str) -> dict[Any, tuple[int, ...]]:
        done = (r for r in self.students.get(variant, []) if _done(r) and r["metrics"].get("teacher_epochs"))
        return {r["group"].get("teacher_seed"): tuple(r["metrics"]["teacher_epochs"]) for r in done}


def _pairs(study: dict, rows: list[dict]) -> list[_Pair]:
    pairs: dict[str, _Pair] = {}
    for spec in study.get("pairs") or []:
        teacher, student = spec.get("teacher") or {}, spec.get("student") or {}
        pairs[spec["name"]] = _Pair(spec["name"], (teacher.get("model") or {}).get("name", "?"),
                                    (student.get("model") or {}).get("name", "?"))
    for row in rows:
        group = row["group"] or {}
        # A teacher shared by several pairs (identical teacher configs) lists them all under "pairs".
        for name in group.get("pairs") or ([group["pair"]] if group.get("pair") else []):
            if name not in pairs:
                teacher_model, _, student_model = name.partition("->")
                pairs[name] = _Pair(name, group.get("teacher_model", teacher_model),
                                    group.get("student_model", student_model or "?"))
            pair = pairs[name]
            role = group.get("role")
            if role == "teacher":
                pair.teachers.append(row)
            elif role == "analysis":
                pair.analyses.append(row)
            elif role == "student":
                pair.students.setdefault(group.get("variant"), []).append(row)
    for pair in pairs.values():
        pair.teachers.sort(key=lambda r: r["group"].get("teacher_seed", 0))
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

    def rich(self) -> Table:
        table = Table(title=self.title)
        for i, column in enumerate(self.header):
            table.add_column(column, justify="left" if i < self.text_columns else "right", overflow="fold")
        for row in self.rows:
            table.add_row(*(Text(text, style="bold" if bold else "") for text, bold in row))
        return table


def _bold_best(cells: list[str], means: list[float | None]) -> list[Cell]:
    """Bold every cell whose mean is the row's maximum as displayed (two decimals in %), so shown ties tie."""
    shown = [None if m is None else round(100 * m, 2) for m in means]
    best = max((s for s in shown if s is not None), default=None)
    return [(text, best is not None and s == best) for text, s in zip(cells, shown)]


def _table3(pairs: list[_Pair], variants: list[str], seeds: int) -> _Table:
    columns = [v for v in variants if variants_mod.parse(v).table == "table3"]
    header = ["Teacher", "Student", "Teacher acc."] + [("Student (no KD)" if v == "none" else _label(v))
                                                       for v in columns]
    rows, per_pair_means = [], []
    for pair in pairs:
        means = [statistics.mean(pair.values(v)) if pair.values(v) else None for v in columns]
        per_pair_means.append([statistics.mean(pair.teacher_accuracy()) if pair.teacher_accuracy() else None] + means)
        cells = _bold_best([_cell(pair.values(v), seeds) for v in columns], means)
        rows.append([(pair.teacher_model, False), (pair.student_model, False),
                     (_cell(pair.teacher_accuracy()), False)] + cells)
    # The average of a column is only shown when every pair has a number in it: a partial mean would mislead.
    columns_means = [[means[i] for means in per_pair_means] for i in range(len(columns) + 1)]
    averages = [statistics.mean(c) if c and None not in c else None for c in columns_means]
    average_cells = [EMPTY if a is None else _pct(a) for a in averages]
    rows.append([("Average", True), ("", False), (average_cells[0], False)]
                + _bold_best(average_cells[1:], averages[1:]))
    return _Table("Table 3: student test accuracy (%), mean ± sample std over seeds", header, rows, 2)


def _ensemble_table(pairs: list[_Pair], seeds: int) -> _Table:
    header = ["Pair", "Snapshot teachers", "Student (snapshot)", "Full-ensemble teachers", "Student (full ens.)",
              "Δ snapshot − full", "Snapshot better"]
    rows = []
    for pair in pairs:
        snap, full = pair.accuracy("snapshot"), pair.accuracy("full_ensemble")
        means = [statistics.mean(snap.values()) if snap else None, statistics.mean(full.values()) if full else None]
        students = _bold_best([_cell(list(snap.values()), seeds), _cell(list(full.values()), seeds)], means)
        paired = sorted(snap.keys() & full.keys())
        wins = f"{sum(snap[s] > full[s] for s in paired)} of {len(paired)}" if paired else EMPTY
        diff = EMPTY if None in means else _signed(100 * (means[0] - means[1]))
        teachers = [_cell(pair.ensemble_teacher_accuracy(v)) for v in ("snapshot", "full_ensemble")]
        rows.append([(pair.name, False), (teachers[0], False), students[0], (teachers[1], False), students[1],
                     (diff, False), (wins, False)])
    return _Table("Full ensemble vs snapshot ensemble: test accuracy (%)", header, rows, 1)


ONLINE = "@online"


def _duration(row: dict) -> float | None:
    return (row.get("timings") or {}).get("duration_s") if row["status"] == "complete" else None


def _mean_seconds(rows: list[dict]) -> str:
    seconds = [d for d in map(_duration, rows) if d is not None]
    return f"{statistics.mean(seconds):.1f}" if seconds else EMPTY


def _cache_table(pairs: list[_Pair], online: list[str], seeds: int) -> _Table:
    header = ["Pair", "Teacher", "Student (cached)", "Student (online)", "Δ cached − online", "Δ / pooled std",
              "Cached better", "Within seed noise", "Time cached (s)", "Time online (s)"]
    rows = []
    for pair in pairs:
        for variant in online:
            base = variant[: -len(ONLINE)]
            cached, live = pair.accuracy(base), pair.accuracy(variant)
            diff = ratio = EMPTY
            noise = EMPTY
            if cached and live:
                (mean_c, std_c), (mean_o, std_o) = _mean_std(list(cached.values())), _mean_std(list(live.values()))
                diff = _signed(100 * (mean_c - mean_o))
                if std_c is not None and std_o is not None and std_c + std_o > 0:
                    pooled = math.sqrt((std_c ** 2 + std_o ** 2) / 2)
                    ratio = _signed((mean_c - mean_o) / pooled)
                    noise = "yes" if abs(mean_c - mean_o) <= pooled else "no"
            paired = sorted(cached.keys() & live.keys())
            wins = EMPTY
            if paired:
                better = sum(cached[s] > live[s] for s in paired)
                worse = sum(cached[s] < live[s] for s in paired)
                wins = f"{better} of {len(paired)} (sign test p = {_sign_test(better, worse):.2f})"
            rows.append([(pair.name, False), (_label(base), False), (_cell(list(cached.values()), seeds), False),
                         (_cell(list(live.values()), seeds), False), (diff, False), (ratio, False), (wins, False),
                         (noise, False), (_mean_seconds(pair.students.get(base, [])), False),
                         (_mean_seconds(pair.students.get(variant, [])), False)])
    return _Table("Teacher cache: student test accuracy (%), cached vs online teachers", header, rows, 2)


def _sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of paired wins against losses (ties left out): 1.0 when there is nothing to test."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


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


def _comparison(a: str, a_acc: dict[int, float], b: str, b_acc: dict[int, float]) -> tuple[str, float | None]:
    """A sentence comparing two variants' students, and the difference of their means in points (None: no numbers)."""
    if not a_acc or not b_acc:
        missing = a if not a_acc else b
        return f"{a} and {b} cannot be compared: {missing} has no completed students", None
    (mean_a, std_a), (mean_b, std_b) = _mean_std(list(a_acc.values())), _mean_std(list(b_acc.values()))
    diff = 100 * (mean_a - mean_b)
    details = [f"{_signed(diff)} points"]
    if std_a is None or std_b is None:
        details.append("pooled std undefined with fewer than 2 seeds")
    else:
        pooled = 100 * math.sqrt((std_a ** 2 + std_b ** 2) / 2)
        details.append(f"{_signed(diff / pooled)} pooled std" if pooled > 0 else "pooled std is 0")
    paired = a_acc.keys() & b_acc.keys()
    wins = sum(a_acc[s] > b_acc[s] for s in paired)

    def summary(mean: float, std: float | None) -> str:
        return f"{_pct(mean)} % (n=1, std undefined)" if std is None else f"{_pct(mean)} ± {_pct(std)} %"

    return (f"{a} reached {summary(mean_a, std_a)} vs {summary(mean_b, std_b)} for {b} "
            f"({', '.join(details)}; better on {wins} of {len(paired)} paired seeds)"), diff


def _relation(diff: float) -> str:
    return "equal to" if round(diff, 2) == 0 else ("above" if diff > 0 else "below")


def _epoch_text(epochs: dict[Any, tuple[int, ...]]) -> str:
    distinct = set(epochs.values())
    if len(distinct) == 1:
        return "epoch " + ", ".join(map(str, distinct.pop()))
    seeds = sorted(epochs)
    return (f"epochs {', '.join('+'.join(map(str, epochs[s])) for s in seeds)} for teacher seeds "
            f"{', '.join(map(str, seeds))}")


def _same_checkpoint(star: dict[Any, tuple[int, ...]], other: dict[Any, tuple[int, ...]], label: str) -> str:
    """Whether T* picked the checkpoint another variant uses, teacher by teacher (each teacher has its own T*)."""
    common = star.keys() & other.keys()
    same = sum(star[s] == other[s] for s in common)
    if same == len(common):
        return f"the same checkpoint as {label}"
    if same == 0:
        return f"a different checkpoint from {label}"
    return f"the same checkpoint as {label} for {same} of {len(common)} teachers"


def _paragraph(pair: _Pair, variants: list[str]) -> str:
    sentences = []
    intermediate = [v for v in variants if _fraction(v) is not None and pair.values(v)]
    best = max(intermediate, key=lambda v: statistics.mean(pair.values(v)), default=None)
    if best is not None:
        sentences.append(f"Of the intermediate teachers ({', '.join(_label(v) for v in intermediate)}), "
                         f"{_label(best)} gave the highest mean student accuracy.")
        if "Tfull" in variants:
            text, diff = _comparison(_label(best), pair.accuracy(best), "T^full", pair.accuracy("Tfull"))
            sentences.append(text + (f", so its mean is {_relation(diff)} that of T^full." if diff is not None
                                     else "."))
        if "Tstar" in variants:
            star, chosen = pair.teacher_epochs("Tstar"), pair.teacher_epochs(best)
            if star.keys() & chosen.keys():
                sentences.append(f"T*, the checkpoint selected by the information criterion, is "
                                 f"{_same_checkpoint(star, chosen, _label(best))} (T*: {_epoch_text(star)}; "
                                 f"{_label(best)}: {_epoch_text(chosen)}).")
            text, diff = _comparison("T*", pair.accuracy("Tstar"), _label(best), pair.accuracy(best))
            sentences.append(text + (f", so its mean is {_relation(diff)} that of the best intermediate teacher."
                                     if diff is not None else "."))
    elif any(_fraction(v) is not None for v in variants):
        sentences.append("No intermediate-teacher student has completed yet.")
    if "snapshot" in variants and "full_ensemble" in variants:
        text, diff = _comparison("the snapshot ensemble", pair.accuracy("snapshot"), "the full ensemble",
                                 pair.accuracy("full_ensemble"))
        sentences.append(text[0].upper() + text[1:] + (f", so its mean is {_relation(diff)} that of the full "
                                                       f"ensemble." if diff is not None else "."))
    return f"**{pair.name}.** " + " ".join(sentences)


def _trajectory(study: Path, pair: _Pair) -> tuple[list[str], Path | None]:
    """The trajectory section of one pair, and the teacher run folder it came from (None when not trained yet)."""
    teacher = next((r for r in pair.teachers if r["status"] == "complete"), None)
    if teacher is None:
        return [f"{pair.name}: the trajectory teacher has not completed yet."], None
    run = study / teacher["path"]
    teacher_seed = teacher["group"].get("teacher_seed")
    analysis_row = next((r for r in pair.analyses if r["status"] == "complete"
                         and r["group"].get("teacher_seed") == teacher_seed), None)
    analysis_path = run / "analysis.json"
    if analysis_row and (analysis_row["metrics"] or {}).get("analysis"):
        analysis_path = study / analysis_row["metrics"]["analysis"]
    manifest_path = run / "manifest.json"
    if not analysis_path.is_file() or not manifest_path.is_file():
        return [f"{pair.name}: the teacher {teacher['name']} has not been analysed yet."], run
    analysis = json.loads(analysis_path.read_text(encoding="utf-8"))
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    recorded = {c["epoch"]: c["metrics"] for c in manifest["checkpoints"]}
    selected = analysis["selected"]["epoch"]
    header = ["Epoch", "Fraction", "Train %", "Val %", "Test %", "Confidence %", "Non-target entropy", "I(X;F)",
              "I(Y;F)", "Score", ""]
    rows = []
    for r in analysis["checkpoints"]:
        test = recorded.get(r["epoch"], {}).get("test_acc")
        train = recorded.get(r["epoch"], {}).get("train_acc")
        rows.append([(str(r["epoch"]), False), (f"{r['fraction']:.2f}", False),
                     (EMPTY if train is None else _pct(train), False), (_pct(r["val_acc"]), False),
                     (EMPTY if test is None else _pct(test), False), (_pct(r["confidence"]), False),
                     (f"{r['nontarget_entropy']:.3f}", False), (f"{r['i_xf']:.3f}", False),
                     (f"{r['i_yf']:.3f}", False), (f"{r['score']:.3f}", False),
                     ("T*" if r["epoch"] == selected else "", False)])
    agreement = analysis.get("agreement") or {}

    def rho(key: str) -> str:
        value = agreement.get(key)
        return "undefined" if value is None else f"{value:.3f}"

    lines = [f"Teacher {teacher['name']} (teacher seed {teacher_seed}, `{teacher['path']}`); T* = epoch {selected}. "
             "Train %: accuracy on the training batches of that epoch (augmented when the run augments); val, "
             "confidence, entropy and the information estimates: the validation split.", ""]
    lines += _Table("", header, rows, 0).markdown()
    lines += ["", f"Spearman rank agreement of the probe/decoder and kNN estimators across checkpoints: "
                  f"I(X;F) {rho('spearman_i_xf')}, I(Y;F) {rho('spearman_i_yf')}, score {rho('spearman_score')}."]
    return lines, run


def _accuracy_plot(pairs: list[_Pair], variants: list[str], path: Path) -> str:
    shown = [v for v in variants if v != "none"]
    fig, axes = plt.subplots(1, len(pairs), figsize=((1.5 + 0.65 * len(shown)) * len(pairs), 3.6), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for x, variant in enumerate(shown):
            values = [100 * v for v in pair.values(variant)]
            if not values:
                continue
            ax.scatter(x + np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [x], values, s=12,
                       color="0.55", zorder=2)
            mean, std = _mean_std(values)
            ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="o", color="C0", capsize=4, zorder=3)
        baseline = [100 * v for v in pair.values("none")]
        if baseline:
            mean, std = _mean_std(baseline)
            ax.axhline(mean, color="crimson", ls="--", lw=1, label="no KD (mean ± std)")
            if std:
                ax.axhspan(mean - std, mean + std, color="crimson", alpha=0.08, lw=0)
            ax.legend(fontsize=7, frameon=False, loc="lower right")
        ax.set_xticks(range(len(shown)), [_label(v) for v in shown], rotation=30, ha="right")
        ax.set_ylabel("student test accuracy (%)")
        ax.set_title(f"{pair.teacher_model} → {pair.student_model}")
    fig.tight_layout()
    return save(fig, path)


def _load(study: Path) -> tuple[dict, list[dict]]:
    if not study.is_dir():
        raise UserError(f"study folder not found: {study}")
    if not (study / "results.sqlite").is_file() or not (study / "study.yaml").is_file():
        raise UserError(f"{study} is not a ckptkd study (it needs results.sqlite and study.yaml)")
    config = read_yaml(study / "study.yaml")
    with ResultsDB(study / "results.sqlite") as db:
        return config, db.rows()


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        group, metrics, timings = row["group"] or {}, row["metrics"] or {}, row["timings"] or {}
        values = {**{k: row[k] for k in ("run_id", "kind", "name", "status", "path")},
                  **{k: group.get(k) for k in ("pair", "role", "variant", "seed", "teacher_seed")},
                  **{k: metrics.get(k) for k in ("test_acc", "val_acc", "best_val_acc", "best_val_epoch",
                                                 "teacher_test_acc")},
                  "duration_s": timings.get("duration_s")}
        writer.writerow(["" if values[k] is None else values[k] for k in CSV_COLUMNS])
    return buffer.getvalue()


def _dataset(config: dict) -> str:
    names = [((p.get("teacher") or {}).get("data") or {}).get("name") for p in config.get("pairs") or []]
    if isinstance(config.get("data"), dict):
        names.insert(0, config["data"].get("name"))
    names = list(dict.fromkeys(n for n in names if n))
    return ", ".join(names) or "unknown"


def _header(config: dict, study: Path, rows: list[dict], pairs: list[_Pair], variants: list[str],
            seeds: list) -> list[str]:
    teacher_seeds = sorted({r["group"].get("teacher_seed") for p in pairs for v in p.students.values() for r in v}
                           - {None})
    sharing = {0: "no students yet", 1: "one trajectory teacher per pair, shared by all student seeds"}.get(
        len(teacher_seeds), "each student learned from the trajectory teacher of its teacher seed")
    complete = sum(r["status"] == "complete" for r in rows)
    lines = [f"# Study report: {config.get('name', study.name)}", "",
             f"- Data set: {_dataset(config)}",
             f"- Student seeds: {', '.join(map(str, seeds))}",
             f"- Teacher seeds used by students: {', '.join(map(str, teacher_seeds)) or EMPTY} ({sharing})",
             f"- Ensemble size M = {config.get('ensemble_size', EMPTY)}",
             "- Accuracies are last-epoch test accuracies in %. ± is the sample standard deviation (ddof = 1) over "
             "student seeds (over trajectory teachers for teacher accuracy); (n=k) marks a cell with fewer completed "
             "runs than seeds, and with n=1 the std is undefined.",
             f"- Runs: {len(rows)} in results.sqlite, {complete} complete.", ""]
    if config.get("description"):
        lines += [str(config["description"]).strip(), ""]
    if complete < len(rows):
        counts = {s: sum(r["status"] == s for r in rows) for s in ("pending", "running", "failed")}
        lines += [f"**{len(rows) - complete} of {len(rows)} runs are not complete** ("
                  + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                  + "); cells use the completed runs only and show — where none completed.", ""]
    return lines + ["Variants:", ""] + [f"- **{_label(v)}** (`{v}`): {_meaning(v, config)}" for v in variants] + [""]


def write_report(study: str | Path, *, console: Console | None = None,
                 quiet: bool = False) -> dict[str, str | list[str]]:
    """Write STUDY/report.md, STUDY/results.csv and STUDY/plots/*.png; print Table 3 and the ensemble table.

    Returns {"report": path, "csv": path, "plots": [paths]}.
    """
    study = Path(study)
    config, rows = _load(study)
    pairs = _pairs(config, rows)
    seen = {(r["group"] or {}).get("variant") for r in rows if (r["group"] or {}).get("role") == "student"}
    online = sorted({v for v in seen if v and v.endswith(ONLINE)}, key=_variant_order)
    variants = sorted(set(config.get("variants") or []) | (seen - {None} - set(online)), key=_variant_order)
    seeds = config.get("seeds") or sorted({r["group"]["seed"] for p in pairs for v in p.students.values() for r in v})
    lines = _header(config, study, rows, pairs, variants, seeds)

    table3 = _table3(pairs, variants, len(seeds))
    tables = [table3]
    lines += ["## Table 3: teacher checkpoints as teachers", "", "Best student accuracy of each row in bold; the "
              "Average row is the mean of the per-pair means (shown only when every pair has a number).", ""]
    lines += table3.markdown() + [""]
    if "snapshot" in variants and "full_ensemble" in variants:
        ensembles = _ensemble_table(pairs, len(seeds))
        tables.append(ensembles)
        lines += ["## Full ensemble vs snapshot ensemble", "",
                  "Teachers: the accuracy of the teacher ensemble, averaged over distinct teacher sets. Δ: difference "
                  "of the student means in points; Snapshot better: paired seeds on which the snapshot student won.",
                  ""]
        lines += ensembles.markdown() + [""]

    if online:
        cache_table = _cache_table(pairs, online, len(seeds))
        tables.append(cache_table)
        lines += ["## Teacher cache: cached vs online teachers", "",
                  "The same students (same seeds, so the same initial weights and batch order; the augmentation draws "
                  "differ, since cached students draw among each image's banked views) distilled from teacher "
                  "outputs looked up in the view-bank cache and from teachers run on every batch. Δ: cached − online "
                  "in points and in pooled standard deviations; within seed noise when |Δ| is at most one pooled "
                  "standard deviation. Cached better: paired seeds on which the cached student won, with the "
                  "two-sided sign test of wins against losses.", ""]
        lines += cache_table.markdown() + [""]

    time_table, cache_note = _time_table(rows)
    lines += ["## Compute time", "", "Wall time of each completed run as the study measured it (this machine, "
              "whatever else it was doing), summed by kind of run. A cache is built by the first student that needs "
              "it and reused by every later one.", ""]
    lines += time_table.markdown() + ["", cache_note, ""]

    plots_dir = study / "plots"
    plots, figures = [], []
    lines += ["## Teacher trajectories", ""]
    for pair in pairs:
        section, run = _trajectory(study, pair)
        lines += [f"### {pair.name}", ""] + section + [""]
        for figure in TEACHER_FIGURES:
            source = run / "plots" / f"{figure}.png" if run is not None else None
            if source is not None and source.is_file():
                target = plots_dir / f"{figure}_{_slug(pair.name)}.png"
                atomic_write_bytes(target, source.read_bytes())
                plots.append(str(target))
                figures += [f"![{figure.replace('_', ' ')}, {pair.name}](plots/{target.name})", ""]

    lines += ["## Plots", ""]
    if pairs:
        plots.insert(0, _accuracy_plot(pairs, variants, plots_dir / "accuracy_by_variant.png"))
        lines += ["![Student accuracy by variant](plots/accuracy_by_variant.png)", "",
                  "Student test accuracy by variant: mean ± std (error bars), one dot per seed; the dashed line and "
                  "band are the no-KD baseline's mean ± std.", ""]
    lines += figures
    lines += ["## Findings", ""] + [line for pair in pairs for line in (_paragraph(pair, variants), "")]

    not_complete = [r for r in rows if r["status"] != "complete"]
    if not_complete:
        # Whether a failed run will be retried depends on the study's max_attempts, which only its runner knows.
        failed = {r["run_id"] for r in rows if r["status"] == "failed"}
        lines += ["## Runs not complete", ""]
        for r in not_complete:
            error = f": {r['error'].splitlines()[0]}" if r["error"] else ""
            culprits = [dep for dep in r["depends_on"] if dep in failed]
            waits = f"; depends on failed {', '.join(culprits)}" if culprits else ""
            lines.append(f"- `{r['name']}` ({r['kind']}, {r['status']}, attempts: {r['attempts']}{waits}){error}")
        lines.append("")

    report, csv_path = study / "report.md", study / "results.csv"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(csv_path, _csv(rows))
    if not quiet:
        console = console or terminal_console()
        for table in tables:
            console.print(table.rich())
        if not_complete:
            console.print(f"{len(not_complete)} of {len(rows)} runs are not complete; see {report}")
    return {"report": str(report), "csv": str(csv_path), "plots": plots}
