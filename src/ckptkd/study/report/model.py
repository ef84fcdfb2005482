"""The study report as data: what report.md, results.csv, the terminal and the plots show, with no formatting.

`build(config, rows, blocked, trajectories)` is pure: it takes study.yaml (as a dict), the results database's rows,
the failed runs blocking each blocked run (`ResultsDB.blocked`), and the analysis summaries that were read from run
folders (by analysis run_id), and reads no file. Accuracies and their differences are fractions unless a name or
docstring says points; seconds are seconds. Students are paired by (trajectory, seed).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ... import stats
from .. import variants as variants_mod
from .comparisons import Comparison, pair_comparisons
from .rows import Durations, PairRows, done, flags, pair_rows, paper_metric, top5
from .selection import SelectionBenchmark, selection_benchmark
from .trajectories import Trajectory, TrajectorySummary, is_summary
from .verdicts import DEFAULT_MARGIN, Finding, finding

TIME_PARTS = ("teacher training", "checkpoint analysis", "proxy selection", "students, no KD",
              "KD students, cached teachers", "KD students, teachers online")


@dataclass
class Cell:
    """The students (or teachers) of one table cell: one accuracy per distinct run, how many runs were planned
    (None where no count applies), how many of the completed ones were flagged unhealthy, and the top-5 accuracy of
    the runs that recorded one."""
    values: list[float]
    planned: int | None = None
    flagged: int = 0
    top5: list[float] = field(default_factory=list)
    paper: list[float] = field(default_factory=list)  # the paper's best-of-the-last-N metric, where recorded

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values) if self.values else None


@dataclass
class Header:
    """The study as a whole. `definitions`: the study.yaml settings that define the variants (ensemble_size,
    snapshot), as written; `datasets`: (name, label noise fraction) of the teachers' data, distinct, in pair order;
    `variants`: every pair's variants but the epoch<N> ones, ordered; `curve`: whether any pair has epoch<N>
    students; `status`: how many runs the database has in each status; `margin`: the equivalence margin in points
    (study key `margin`)."""
    name: str
    description: str | None
    datasets: list[tuple[str, float]]
    definitions: dict
    trajectories: list[int]
    seeds: list[int]
    last_k: bool
    runs: int
    status: dict[str, int]
    variants: list[str]
    curve: bool
    margin: float = DEFAULT_MARGIN


@dataclass
class EnsembleComparison:
    """Snapshot vs full ensemble of one pair: the teacher ensembles' accuracy (once per distinct set of teachers),
    the students, and their paired differences (snapshot − full)."""
    snapshot_teachers: Cell
    snapshot: Cell
    full_teachers: Cell
    full: Cell
    diffs: dict[tuple[int, int], float]

    @property
    def difference(self) -> float | None:
        """Difference of the student means; None unless both have students."""
        if self.snapshot.mean is None or self.full.mean is None:
            return None
        return self.snapshot.mean - self.full.mean

    @property
    def snapshot_wins(self) -> int:
        return sum(d > 0 for d in self.diffs.values())


@dataclass
class CacheComparison:
    """Cached vs online teachers for one variant of one pair. `difference` and the standard deviations are over the
    students' (trajectory, seed) cells; `pooled_std` is None unless both have a nonzero sample std; `sign_p` is the
    sign test of the paired wins against losses (None without paired students); seconds: mean time per student."""
    variant: str          # the online one (e.g. T0.5@online)
    base: str             # its cached twin (T0.5)
    cached: Cell
    online: Cell
    difference: float | None
    pooled_std: float | None
    diffs: dict[tuple[int, int], float]
    sign_p: float | None
    seconds_cached: float | None
    seconds_online: float | None


@dataclass
class PairReport:
    name: str
    teacher_model: str
    student_model: str
    variants: list[str]
    teacher: Cell                     # the trajectory teachers' test accuracy
    cells: dict[str, Cell]            # variant -> its students (every variant the pair has students or plans for)
    comparisons: dict[str, Comparison]
    finding: Finding
    ensemble: EnsembleComparison | None
    cache: list[CacheComparison]
    selection: SelectionBenchmark | None
    trajectories: list[Trajectory]    # empty until a teacher has completed
    lead_teacher: str | None          # the first completed teacher's run folder: where its figures are

    def cell(self, variant: str) -> Cell:
        return self.cells.get(variant) or Cell([])


@dataclass
class Flagged:
    name: str
    what: str                  # the student's variant, else the run's kind
    flags: list[dict]          # {flag, epoch, detail} as the run's health check recorded them


@dataclass
class Health:
    assessed: bool             # False for studies from before runs were checked
    flagged: list[Flagged]


@dataclass
class ComputeTime:
    """Wall seconds of the completed runs (each run's share of its fused group's time) by kind of run, in
    TIME_PARTS order; the teacher caches built (with their build seconds, inside the KD students' times) and
    reused; the span from the first run's start to the last run's end and the worker processes."""
    parts: dict[str, list[float]]
    total: list[float]
    caches_built: int
    caches_reused: int
    cache_seconds: float
    fused_groups: int
    span_s: float | None
    workers: int


@dataclass
class Unfinished:
    name: str
    kind: str
    status: str
    attempts: int
    blocked_by: list[str]      # the names of the failed runs at the root of the chain
    error: str | None          # the first line of the last error


@dataclass
class RunRecord:
    """One database row as results.csv lists it (fields in column order)."""
    run_id: str
    kind: str
    name: str
    status: str
    pair: str | None
    role: str | None
    variant: str | None
    seed: int | None
    teacher_seed: int | None
    test_acc: float | None
    test_acc_last_k: float | None
    test_top5: float | None
    test_top5_last_k: float | None
    test_acc_best_of_last: float | None
    val_acc: float | None
    best_val_acc: float | None
    best_val_epoch: int | None
    teacher_test_acc: float | None
    health: list[str]
    duration_s: float | None
    path: str


@dataclass
class Table3:
    """The columns (Table 3's single-teacher variants of every pair) and the Average row: the mean of the per-pair
    means of each column, teacher accuracy first; None unless every pair has a number in the column."""
    columns: list[str]
    averages: list[float | None]


@dataclass
class Report:
    header: Header
    pairs: list[PairReport]
    table3: Table3
    online: list[str]          # the @online variants of any pair, ordered
    health: Health
    time: ComputeTime
    unfinished: list[Unfinished]
    runs: list[RunRecord] = field(default_factory=list)

    def carry_over(self, previous: dict[tuple[str, int], Trajectory]) -> list[Trajectory]:
        """Fill each trajectory that has no summary from the previous report's (pair, number) -> Trajectory, marked
        carried; returns those filled."""
        carried = []
        for pair in self.pairs:
            for i, t in enumerate(pair.trajectories):
                old = previous.get((pair.name, t.number))
                if t.summary is None and old is not None and old.summary is not None:
                    pair.trajectories[i] = Trajectory(t.number, old.path, old.summary, carried=True)
                    carried.append(pair.trajectories[i])
        return carried


# ---- building it ----

def _header(config: dict, rows: list[dict], pairs: list[PairRows]) -> Header:
    datasets = []
    for p in config.get("pairs") or []:
        data = (p.get("teacher") or {}).get("data") or {}
        # data.val_fraction: 0 leaves no held-out images: every "val" number is the training images' (said here)
        name = data.get("name") and data["name"] + (" (no held-out validation: \"val\" numbers are the training "
                                                    "images')" if data.get("val_fraction") == 0 else "")
        if name and (name, data.get("label_noise") or 0) not in datasets:
            datasets.append((name, data.get("label_noise") or 0))
    students = [r for r in rows if (r["group"] or {}).get("role") == "student" and done(r)]
    variants = variants_mod.ordered({v for p in pairs for v in p.variants if variants_mod.parse(v).base != "epoch"})
    return Header(
        name=config.get("name"), description=config.get("description"), datasets=datasets,
        definitions={k: config[k] for k in ("ensemble_size", "snapshot") if k in config},
        trajectories=sorted({t for p in pairs for cells in p.students.values() for (t, _s) in cells}),
        seeds=sorted({s for p in pairs for cells in p.students.values() for (_t, s) in cells}),
        last_k=any((r["metrics"] or {}).get("test_acc_last_k") is not None for r in students), runs=len(rows),
        status={s: sum(r["status"] == s for r in rows) for s in ("complete", "pending", "running", "failed")},
        variants=variants,
        curve=any(variants_mod.parse(v).base == "epoch" for p in pairs for v in p.variants),
        margin=config.get("margin", DEFAULT_MARGIN))


def _cells(pair: PairRows) -> dict[str, Cell]:
    return {v: Cell(pair.values(v), pair.planned(v), pair.flagged(v), pair.values(v, top5),
                    pair.values(v, paper_metric))
            for v in variants_mod.ordered(set(pair.variants) | {v for v in pair.students if v})}


def _ensemble(pair: PairRows, cells: dict[str, Cell]) -> EnsembleComparison | None:
    if not {"snapshot", "full_ensemble"} <= set(pair.variants):
        return None
    return EnsembleComparison(
        Cell(pair.ensemble_teacher_accuracy("snapshot")), cells["snapshot"],
        Cell(pair.ensemble_teacher_accuracy("full_ensemble")), cells["full_ensemble"],
        stats.paired_differences(pair.accuracy("snapshot"), pair.accuracy("full_ensemble")))


def _cache(pair: PairRows, online: list[str], cells: dict[str, Cell], durations: Durations) -> list[CacheComparison]:
    def seconds(variant: str) -> float | None:
        # per cell, as the students serve them: a run serving several cells counts in each
        values = [d for d in map(durations.of, pair.students.get(variant, {}).values()) if d is not None]
        return statistics.mean(values) if values else None

    out = []
    for variant in online:
        base = variants_mod.parse(variant).plain.name
        cached, live = pair.accuracy(base), pair.accuracy(variant)
        difference = pooled = None
        if cached and live:
            (mean_c, std_c), (mean_o, std_o) = stats.mean_std(list(cached.values())), stats.mean_std(
                list(live.values()))
            difference = mean_c - mean_o
            if std_c is not None and std_o is not None and std_c + std_o > 0:
                pooled = math.sqrt((std_c ** 2 + std_o ** 2) / 2)
        diffs = stats.paired_differences(cached, live)
        wins, _, losses = stats.sign_counts(list(diffs.values()))
        out.append(CacheComparison(variant, base, cells.get(base) or Cell([]), cells.get(variant) or Cell([]),
                                   difference, pooled, diffs, stats.sign_test(wins, losses) if diffs else None,
                                   seconds(base), seconds(variant)))
    return out


def _trajectories(pair: PairRows, summaries: dict[str, dict]) -> list[Trajectory]:
    numbers = sorted(pair.analyses) or sorted({r["group"].get("teacher_seed", 0) for r in pair.teachers})
    out = []
    for t in numbers:
        row = pair.analyses.get(t)
        if row is None or row["status"] != "complete":
            out.append(Trajectory(t, None, None))
            continue
        metrics = row["metrics"] if is_summary(row["metrics"]) else summaries.get(row["run_id"])
        out.append(Trajectory(t, row["path"], None if metrics is None else TrajectorySummary.from_metrics(metrics)))
    return out


def _time(rows: list[dict], durations: Durations) -> ComputeTime:
    parts: dict[str, list[float]] = {}
    built = reused = 0
    build_s = 0.0
    for row in rows:
        seconds = durations.of(row)
        if seconds is None:
            continue
        group, metrics = row["group"] or {}, row["metrics"] or {}
        role = group.get("role")
        if role == "analysis" or row["kind"] == "analyze":
            part = "checkpoint analysis"
        elif row["kind"] == "proxy":
            part = "proxy selection"
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
    timings = [r["timings"] for r in rows if r["status"] == "complete" and (r.get("timings") or {}).get("started_at")]
    span = (max(t["finished_at"] for t in timings) - min(t["started_at"] for t in timings)) if timings else None
    return ComputeTime({part: parts[part] for part in TIME_PARTS if part in parts},
                       [d for d in map(durations.of, rows) if d is not None], built, reused, build_s,
                       durations.fused_groups, span, len({r["claimer"] for r in rows if r["status"] == "complete"}))


def _record(row: dict) -> RunRecord:
    group, metrics, timings = row["group"] or {}, row["metrics"] or {}, row["timings"] or {}
    return RunRecord(**{k: row[k] for k in ("run_id", "kind", "name", "status", "path")},
                     **{k: group.get(k) for k in ("pair", "role", "variant", "seed", "teacher_seed")},
                     **{k: metrics.get(k) for k in ("test_acc", "test_acc_last_k", "test_top5", "test_top5_last_k",
                                                    "test_acc_best_of_last", "val_acc", "best_val_acc",
                                                    "best_val_epoch", "teacher_test_acc")},
                     health=flags(row), duration_s=timings.get("duration_s"))


def build(config: dict, rows: list[dict], blocked: dict[str, list[str]], trajectories: dict[str, dict]) -> Report:
    """The report of a study: `config` is study.yaml, `rows` the database's rows (`ResultsDB.rows`), `blocked` run_id
    -> the run_ids of the failed runs blocking it, `trajectories` analysis run_id -> its summary as
    `analysis_metrics` gives it, for the analyses whose database row lacks one (read from their run folders)."""
    groups = pair_rows(config, rows)
    durations = Durations(rows)
    online = variants_mod.ordered({v for p in groups for v in p.students if v and v.endswith("@online")})
    pairs = []
    for g in groups:
        cells = _cells(g)
        comparisons = pair_comparisons(g)
        lead = next((r for r in g.teachers if r["status"] == "complete"), None)
        pairs.append(PairReport(
            g.name, g.teacher_model, g.student_model, g.variants, Cell(g.teacher_accuracy(), top5=g.teacher_top5()),
            cells, comparisons,
            finding(g.variants, comparisons, config.get("margin", DEFAULT_MARGIN)), _ensemble(g, cells),
            _cache(g, online, cells, durations), selection_benchmark(g, durations.of), _trajectories(g, trajectories),
            lead["path"] if lead is not None else None))

    columns = variants_mod.ordered({v for p in pairs for v in p.variants if variants_mod.parse(v).table == "table3"})
    # A column's average is only given when every pair has a number in it: a partial mean would mislead.
    per_pair = [[p.teacher.mean] + [p.cell(v).mean for v in columns] for p in pairs]
    averages = [statistics.mean(c) if c and None not in c else None
                for c in ([means[i] for means in per_pair] for i in range(len(columns) + 1))]

    flagged = [Flagged(r["name"], (r["group"] or {}).get("variant") or r["kind"], r["metrics"]["health"]["flags"])
               for r in rows if done(r) and flags(r)]
    health = Health(any("health" in (r["metrics"] or {}) for r in rows if done(r)), flagged)
    names = {r["run_id"]: r["name"] for r in rows}
    unfinished = [Unfinished(r["name"], r["kind"], r["status"], r["attempts"],
                             [names.get(c, c) for c in blocked.get(r["run_id"], [])],
                             r["error"].splitlines()[0] if r["error"] else None)
                  for r in rows if r["status"] != "complete"]
    return Report(_header(config, rows, groups), pairs, Table3(columns, averages), online, health,
                  _time(rows, durations), unfinished, [_record(r) for r in rows])
