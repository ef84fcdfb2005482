"""`ckptkd verify RUN|STUDY|FOLDER`: check every file ckptkd wrote in a run folder, in every run of a study or in every
run below a folder, and say what is damaged.

Read-only: it changes nothing. For each run it checks the manifest's checksum, every checkpoint against the sha256
the manifest records and against its own seal (its seal alone when the manifest is damaged), the resume state, the
teacher caches, the analysis and its cache; for a study also the database (SQLite's integrity check), the report's
data (report.json, which may hold the only copy of what a report carries over) and that every finished task's
folder is there. A temporary file a
killed write left behind is listed as harmless (the next --resume or run removes it).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..run.folder import ANALYSIS, MANIFEST, STATE, Run, runs_under
from ..run.storage import load_tensors, read_sealed_json, read_tensors


@dataclass
class Report:
    checked: int = 0
    damaged: list[str] = field(default_factory=list)    # one line each: the file and what is wrong
    leftovers: list[str] = field(default_factory=list)  # temporaries of killed writes: harmless
    missing_runs: int = 0                               # finished study tasks whose folders are gone (not committed)

    @property
    def ok(self) -> bool:
        return not self.damaged


def verify(path: str | Path) -> Report:
    """Check a run folder or a study folder (one holding results.sqlite)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"verify: {path} is not a folder")
    report = Report()
    if (path / "results.sqlite").is_file():
        _verify_study(path, report)
    elif (path / MANIFEST).is_file():
        _verify_run(path, report)
    elif runs := runs_under(path):  # a folder of runs, e.g. the students of distill --fuse
        for run in runs:
            _verify_run(run, report)
        report.leftovers += [str(p) for p in sorted(path.glob(".*.tmp"))]
    else:
        raise UserError(f"verify: {path} is neither a ckptkd run (no {MANIFEST}), nor a study (no results.sqlite), "
                        "nor a folder of runs")
    return report


def _check(report: Report, read) -> object | None:
    """Run one reader; its UserError (the one line naming the file) is a damaged file."""
    report.checked += 1
    try:
        return read()
    except UserError as error:
        report.damaged.append(str(error))
        return None


def _verify_run(path: Path, report: Report) -> None:
    run = Run(path)
    manifest = _check(report, lambda: run.manifest)
    if manifest is not None:
        for entry in manifest.checkpoints + manifest.ema_checkpoints:  # the weights' and, with optim.ema, the average's
            _check(report, lambda e=entry: load_tensors(path / e.path, e.sha256, what="checkpoint"))
    else:  # without the manifest's sha256s, each checkpoint is still checked against its own seal
        for file in sorted((path / "checkpoints").glob("*.safetensors")):
            _check(report, lambda f=file: read_tensors(f, what="checkpoint"))
    if (path / STATE).is_file():
        _check(report, lambda: read_tensors(path / STATE, what="resume state"))
    if (path / ANALYSIS).is_file():
        _check(report, run.analysis)  # its seal, and the fields select and reports read
    for cached in sorted(run.analysis_cache_dir.glob("*.json")):
        _check(report, lambda c=cached: read_sealed_json(c, "analysis cache", required=lambda _r: False))
    for cached in sorted(run.cache_dir.glob("*.safetensors")):
        _check(report, lambda c=cached: read_tensors(c, what="teacher cache"))
    report.leftovers += [str(p) for p in sorted(path.rglob(".*.tmp"))]


def _verify_study(path: Path, report: Report) -> None:
    report.checked += 1
    database = path / "results.sqlite"
    rows = None
    try:
        with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as db:
            problems = [row[0] for row in db.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                report.damaged.append(f"study database {database} is damaged ({problems[0]})")
            rows = db.execute("SELECT name, status, path, kind FROM runs").fetchall()
    except sqlite3.DatabaseError as error:
        report.damaged.append(f"study database {database} is damaged ({error})")
    if (path / "report.json").exists():
        from ..study.report.report_json import read_trajectories

        _check(report, lambda: read_trajectories(path / "report.json"))  # its seal, and what a report reads of it
    if rows is None:
        # Without the database the run folders are still worth checking: they are what a restored database
        # would point at, and a damaged database is no reason to miss a damaged checkpoint.
        rows = [(folder.name, None, str(folder.relative_to(path)), None)
                for folder in sorted(path.glob("runs/*")) if (folder / MANIFEST).is_file()]
    seen = set()
    for _name, status, run_path, kind in rows:
        folder = path / run_path
        if folder in seen:
            continue  # an analysis task shares its teacher's folder
        seen.add(folder)
        if (folder / MANIFEST).is_file():
            _verify_run(folder, report)
        elif status == "complete" and kind != "analyze":
            report.missing_runs += 1
    report.leftovers += [str(p) for p in sorted(path.glob(".*.tmp"))]
