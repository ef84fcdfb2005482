"""The study database's rows as the report reads them: which runs finished, a run's accuracy and health flags, the
(pair, variant, trajectory, seed) cells a student serves, the rows of each pair, and each run's share of the wall
time. Pure: rows in, values out (the rows are never changed).

Accuracy: the mean test accuracy of a student's last k epochs (`test_acc_last_k`), or the last-epoch accuracy for
studies run before it was recorded; never the best test epoch, which would select on the test set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .. import variants as variants_mod


def done(row: dict) -> bool:
    """Whether a run completed with a test accuracy (the only runs any number of the report uses)."""
    return row["status"] == "complete" and bool(row["metrics"]) and row["metrics"].get("test_acc") is not None


def accuracy(metrics: dict) -> float:
    last_k = metrics.get("test_acc_last_k")
    return last_k if last_k is not None else metrics["test_acc"]


def paper_metric(metrics: dict) -> float | None:
    """The paper's metric where the run recorded it (`eval.best_of_last`): the best test accuracy of its last N
    epochs, which selects on the test set."""
    return metrics.get("test_acc_best_of_last")


def top5(metrics: dict) -> float | None:
    """Top-5 test accuracy, as `accuracy` reads top-1; None where it was not recorded (5 classes or fewer, or a run
    of ckptkd before 0.4)."""
    last_k = metrics.get("test_top5_last_k")
    return last_k if last_k is not None else metrics.get("test_top5")


def flags(row: dict) -> list[str]:
    return [f["flag"] for f in ((row.get("metrics") or {}).get("health") or {}).get("flags", [])]


def serves(row: dict) -> list[list]:
    """The (pair, variant, trajectory, seed) cells a student serves; older databases name one in the group."""
    group = row["group"] or {}
    if group.get("serves"):
        return [c for c in group["serves"] if len(c) == 4]
    pairs = group.get("pairs") or ([group["pair"]] if group.get("pair") else [])
    return [[p, group.get("variant"), group.get("teacher_seed", 0), group.get("seed")] for p in pairs]


class Durations:
    """Each completed run's share of the wall time. Runs trained as one group (claimed together: one claimer, one
    start) split the group's time evenly, so a sum over runs is the time the workers spent."""

    def __init__(self, rows: list[dict]):
        key = lambda r: (r.get("claimer"), (r.get("timings") or {}).get("started_at"))  # noqa: E731
        sizes = Counter(key(r) for r in rows if r["status"] == "complete")
        self._group = {r["run_id"]: sizes[key(r)] for r in rows if r["status"] == "complete"}
        self.fused_groups = sum(1 for n in sizes.values() if n > 1)

    def of(self, row: dict) -> float | None:
        seconds = (row.get("timings") or {}).get("duration_s") if row["status"] == "complete" else None
        return None if seconds is None else seconds / self._group.get(row["run_id"], 1)


@dataclass
class PairRows:
    """The database rows of one teacher -> student pair: its teachers, analyses by trajectory, and students by
    variant and (trajectory, seed). One student run may fill several cells (a no-KD student serves every
    trajectory of its seed)."""
    name: str
    teacher_model: str
    student_model: str
    variants: list[str]
    teacher_epochs: int | None
    teachers: list[dict] = field(default_factory=list)
    analyses: dict[int, dict] = field(default_factory=dict)
    proxies: dict[int, dict] = field(default_factory=dict)       # trajectory -> its proxy selection's row
    students: dict[str, dict[tuple[int, int], dict]] = field(default_factory=dict)  # variant -> (t, s) -> row

    def accuracy(self, variant: str) -> dict[tuple[int, int], float]:
        """(trajectory, seed) -> accuracy of the completed students of a variant: what comparisons pair up."""
        return {k: accuracy(r["metrics"]) for k, r in sorted(self.students.get(variant, {}).items()) if done(r)}

    def run_ids(self, variant: str) -> dict[tuple[int, int], str]:
        """(trajectory, seed) -> the run that fills the cell, for the completed students of a variant."""
        return {k: r["run_id"] for k, r in sorted(self.students.get(variant, {}).items()) if done(r)}

    def shared(self, variant: str) -> bool:
        """Whether the variant's runs serve several trajectories (no KD, a full ensemble of the same members): its
        unit is then the run, not the trajectory."""
        trajectories: dict[str, set[int]] = {}
        for (t, _s), run_id in self.run_ids(variant).items():
            trajectories.setdefault(run_id, set()).add(t)
        return any(len(ts) > 1 for ts in trajectories.values())

    def values(self, variant: str, measure=None) -> list[float]:
        """One value per distinct run (a run serving several trajectories counts once), of `measure` (default: the
        module's `accuracy`, top-1; or `top5`); runs without the measure are left out."""
        measure = measure or accuracy  # the module's function (the class' own `accuracy` is another thing)
        seen = {}
        for r in self.students.get(variant, {}).values():
            if done(r):
                seen[r["run_id"]] = measure(r["metrics"])
        return [v for v in seen.values() if v is not None]

    def planned(self, variant: str) -> int | None:
        """How many distinct students the variant has in the database, finished or not; None for none at all."""
        cells = self.students.get(variant)
        return None if cells is None else len({r["run_id"] for r in cells.values()})

    def flagged(self, variant: str) -> int:
        return len({r["run_id"] for r in self.students.get(variant, {}).values() if done(r) and flags(r)})

    def teacher_accuracy(self) -> list[float]:
        return [r["metrics"]["test_acc"] for r in self.teachers if done(r)]

    def teacher_top5(self) -> list[float]:
        return [r["metrics"]["test_top5"] for r in self.teachers if done(r) and r["metrics"].get("test_top5")
                is not None]

    def ensemble_teacher_accuracy(self, variant: str) -> list[float]:
        """The teacher ensemble's accuracy, once per distinct set of teachers."""
        by_set = {}
        for r in self.students.get(variant, {}).values():
            if done(r) and r["metrics"].get("teacher_test_acc") is not None:
                by_set[tuple(r["metrics"].get("teachers") or [])] = r["metrics"]["teacher_test_acc"]
        return list(by_set.values())


def pair_rows(study: dict, rows: list[dict]) -> list[PairRows]:
    """The pairs of study.yaml in its order, then any pair only the database names, each with its rows."""
    pairs: dict[str, PairRows] = {}
    for spec in study.get("pairs") or []:
        teacher, student = spec.get("teacher") or {}, spec.get("student") or {}
        pairs[spec["name"]] = PairRows(spec["name"], (teacher.get("model") or {}).get("name", "?"),
                                       (student.get("model") or {}).get("name", "?"),
                                       list(spec.get("variants") or study.get("variants") or []),
                                       (teacher.get("schedule") or {}).get("epochs"))

    def pair(name: str, group: dict) -> PairRows:
        if name not in pairs:
            teacher_model, _, student_model = name.partition("->")
            pairs[name] = PairRows(name, group.get("teacher_model", teacher_model),
                                   group.get("student_model", student_model or "?"), [], None)
        return pairs[name]

    for row in rows:
        group = row["group"] or {}
        role = group.get("role")
        if role == "student":
            for name, variant, trajectory, seed in serves(row):
                pair(name, group).students.setdefault(variant, {})[(trajectory, seed)] = row
            continue
        for name in group.get("pairs") or ([group["pair"]] if group.get("pair") else []):
            if role == "teacher":
                pair(name, group).teachers.append(row)
            elif role == "analysis":
                pair(name, group).analyses[group.get("teacher_seed", 0)] = row
            elif role == "proxy":
                pair(name, group).proxies[group.get("teacher_seed", 0)] = row
    for p in pairs.values():
        p.teachers.sort(key=lambda r: r["group"].get("teacher_seed", 0))
        seen = {v for v in p.students if v}
        # Online twins are compared with their cached variant in a table of their own, not given columns.
        p.variants = variants_mod.ordered(set(p.variants) | {v for v in seen if not v.endswith("@online")})
    return list(pairs.values())
