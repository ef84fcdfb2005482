"""Everything a report is built from, read in one place: study.yaml, the results database (opened read-only), the
analysis summaries the database lacks (from the teachers' run folders, where they are here), and the previous
report.json (for what can no longer be rebuilt)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import read_yaml
from ...errors import UserError
from ...run.storage import read_sealed_json
from ..queue import ResultsDB
from .report_json import completed_runs, read_trajectories
from .trajectories import Trajectory, is_summary


@dataclass
class Inputs:
    config: dict                                   # study.yaml; its name defaults to the folder's
    rows: list[dict]                               # ResultsDB.rows()
    blocked: dict[str, list[str]]                  # run_id -> the failed runs at the root of what blocks it
    trajectories: dict[str, dict]                  # analysis run_id -> its summary, read from its run folder
    previous: dict[tuple[str, int], Trajectory]    # (pair, trajectory) -> what the previous report.json held
    previous_complete: int | None                  # how many completed runs the previous report was written from


def load(study: Path) -> Inputs:
    if not study.is_dir():
        raise UserError(f"study folder not found: {study}")
    if not (study / "results.sqlite").exists() or not (study / "study.yaml").is_file():
        raise UserError(f"{study} is not a ckptkd study (it needs results.sqlite and study.yaml)")
    config = {"name": study.name, **read_yaml(study / "study.yaml")}
    db = ResultsDB(study / "results.sqlite", readonly=True, max_attempts=config.get("max_attempts", 2))
    try:
        rows = db.rows()
        blocked = {r["run_id"]: r["blocked_by"] for r in db.blocked()}
    finally:
        db.close()
    trajectories = {}
    for row in rows:
        if ((row["group"] or {}).get("role") == "analysis" and row["status"] == "complete"
                and not is_summary(row["metrics"])):
            summary = _analysis_summary(study, row)
            if summary is not None:
                trajectories[row["run_id"]] = summary
    return Inputs(config, rows, blocked, trajectories, read_trajectories(study / "report.json"),
                  completed_runs(study / "report.json"))


def _analysis_summary(study: Path, row: dict) -> dict | None:
    """An analysis' summary from the teacher's analysis.json (databases from before 0.3 kept only T*); None when
    the file is not here or is of an older format."""
    path = study / ((row["metrics"] or {}).get("analysis") or f"{row['path']}/analysis.json")
    if not path.is_file():
        return None
    from ...run import Run
    from ...run.folder import sealed_since_0_3
    from ..summaries import analysis_metrics

    analysis = read_sealed_json(path, "analysis", remedy=f"rerun `ckptkd analyze {path.parent}`",
                                required=sealed_since_0_3)
    if analysis.get("format") != 2:
        return None
    run = Run(study / row["path"])
    recorded = ({c.epoch: c.metrics for c in run.manifest.checkpoints}
                if (run.path / "manifest.json").is_file() else None)
    return analysis_metrics(analysis, Path(row["path"]), recorded)
