"""The teacher trajectories of a study: per pair and trajectory, the analysis summary of the teacher's saved
checkpoints (accuracies, confidence, the information estimates, the criterion's score and T*).

A summary comes from the database (`ckptkd.study.summaries.analysis_metrics`, kept since 0.3), else from the
teacher's analysis.json in its run folder, else from the previous report.json, where it is marked carried over:
run folders are not committed with a study, and a report never loses what it had.
"""

from __future__ import annotations

from dataclasses import dataclass


def is_summary(metrics: dict | None) -> bool:
    """Whether an analysis row's metrics hold the whole trajectory summary (older databases kept only T*)."""
    trajectory = (metrics or {}).get("trajectory")
    return bool(trajectory) and isinstance(trajectory[0].get("i_xf"), list)


def _estimate(value) -> tuple[float | None, float | None]:
    """(mean, se) of an estimate stored as [mean, se] or as a bare mean."""
    if isinstance(value, (list, tuple)):
        return value[0], value[1]
    return value, None


@dataclass
class TrajectoryRow:
    """One saved checkpoint. Accuracies and confidence are fractions; the estimates are (mean, SE) over split seeds,
    with a mean of None where the estimate failed (a score of None: skipped)."""
    epoch: int
    fraction: float
    train_acc: float | None
    val_acc: float
    test_acc: float | None
    confidence: float
    p_target_t: float | None
    nontarget_entropy_t: float | None
    nc1: float | None
    i_xf: tuple[float | None, float | None]
    i_yf: tuple[float | None, float | None]
    score: tuple[float | None, float | None]

    @classmethod
    def from_metrics(cls, r: dict) -> TrajectoryRow:
        return cls(r["epoch"], r["fraction"], r.get("train_acc"), r["val_acc"], r.get("test_acc"), r["confidence"],
                   r.get("p_target_t"), r.get("nontarget_entropy_t"), r.get("nc1"), _estimate(r["i_xf"]),
                   _estimate(r["i_yf"]), _estimate(r["score"]))


@dataclass
class TrajectorySummary:
    """What the report shows of one analysed teacher trajectory. `agreement`: the Spearman rank agreement of the
    probe/decoder and kNN estimators across checkpoints (keys spearman_i_xf, spearman_i_yf, spearman_score; a value
    of None where undefined); `selected_epoch` is T* (the tie-aware pick), `argmax` T*_info (the criterion's pure
    argmax; None for summaries kept before 0.4)."""
    selected_epoch: int
    ties: list[int]
    criterion: str | None
    split: str | None
    rows: list[TrajectoryRow]
    agreement: dict[str, float | None]
    argmax: int | None = None

    @classmethod
    def from_metrics(cls, metrics: dict) -> TrajectorySummary:
        """From an analysis summary as the database keeps it (`analysis_metrics`)."""
        return cls(metrics["selected_epoch"], list(metrics.get("ties") or []), metrics.get("criterion"),
                   metrics.get("split"), [TrajectoryRow.from_metrics(r) for r in metrics["trajectory"]],
                   dict(metrics.get("agreement") or {}), metrics.get("argmax"))


@dataclass
class Trajectory:
    """One teacher trajectory of a pair: its number, the teacher's run folder (relative to the study; None when its
    analysis has not completed), its summary (None when it could not be read from anywhere), and whether the
    summary was carried over from the previous report.json."""
    number: int
    path: str | None
    summary: TrajectorySummary | None
    carried: bool = False

    @classmethod
    def from_json(cls, obj: dict) -> Trajectory:
        """From `dataclasses.asdict(trajectory)` as report.json holds it (KeyError/TypeError/ValueError if not)."""
        summary = obj["summary"]
        if summary is not None:
            rows = [TrajectoryRow(**{k: tuple(v) if k in ("i_xf", "i_yf", "score") else v for k, v in r.items()})
                    for r in summary["rows"]]
            summary = TrajectorySummary(**{**summary, "rows": rows})
        return cls(int(obj["number"]), obj["path"], summary, bool(obj["carried"]))
