"""`ckptkd study`: the paper's grid — teachers, their analysis, students from every kind of teacher — over seeds.

Every task (a training run, an analysis, a student) is one row of STUDY/results.sqlite keyed by the hash of its
resolved config. Processes claim rows one at a time, so a rerun skips finished work, resumes interrupted runs, and
several `ckptkd study` processes on one folder share the grid without doing anything twice. With `launcher: slurm`
the process coordinates instead (`slurm`): every ready group of tasks goes out as a Slurm job.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from .. import config as config_mod
from ..errors import RunsFailed, UserError, interrupting_signals
from ..run.storage import atomic_write_text, remove_stale_temporaries
from .config import HOW_KEYS, resolve_study
from .execution import execute, record
from .plan import fuse_groups, group_size, plan
from .queue import ClaimLost, ResultsDB
from .slurm import coordinate


def _release(db: ResultsDB, rows: list[dict]) -> None:
    for row in rows:
        try:
            db.release(row["run_id"])
        except ClaimLost:
            pass  # taken over by another worker already


def _work_locally(study_dir: Path, db: ResultsDB, groups: dict, *, say, poll_s: float,
                  max_tasks: int | None) -> bool:
    """Claim and run tasks in this process until none is left (True), or `max_tasks` are done (False)."""
    sent = [r for r in db.rows(status="running") if r.get("batch")]
    if sent:
        raise UserError(f"study: {len(sent)} tasks of {study_dir} are out as Slurm jobs (e.g. {sent[0]['name']}, "
                        f"job {sent[0].get('job') or 'not yet known'}); continue it with --launcher slurm")
    worker = f"{socket.gethostname()}:{os.getpid()}"
    done, total = 0, len(db.rows())
    while max_tasks is None or done < max_tasks:
        rows = db.claim_group(worker, groups)
        if not rows:
            if db.pending_count() == 0:
                return True
            time.sleep(poll_s)  # another process holds the tasks ours depend on
            continue
        finished = total - db.pending_count()
        started = time.perf_counter()
        if len(rows) == 1:
            say(f"[{finished + 1}/{total}] {rows[0]['kind']:<8} {rows[0]['name']} (attempt {rows[0]['attempts']}) ...")
        else:
            say(f"[{finished + 1}-{finished + len(rows)}/{total}] {rows[0]['kind']:<8} {len(rows)} runs as one "
                f"group: {', '.join(r['name'] for r in rows)} (attempt {max(r['attempts'] for r in rows)}) ...")
        try:
            results = execute(rows, study_dir, lambda run_ids: [db.heartbeat(r) for r in run_ids], say)
        except KeyboardInterrupt:
            _release(db, rows)  # not the tasks' fault: they keep their attempts and are claimed again
            raise
        except ClaimLost as lost:  # judged stale and taken over by another worker, which now owns it
            say(f"    given up: {lost}")
            _release(db, rows)
            continue
        except Exception as error:  # noqa: BLE001 - any failure of one task is recorded, the study goes on
            results = [error] * len(rows)
        for row, result in zip(rows, results):
            record(db, row, result, time.perf_counter() - started, say if len(rows) == 1 else
                   (lambda msg, name=row["name"]: say(f"{msg.rstrip()}  {name}")))
        done += len(rows)
    return False


def run_study(source: str | Path | dict, out: str | Path | None = None, *, overrides: list | dict | None = None,
              quiet: bool = False, report: bool = True, poll_s: float = 2.0, max_tasks: int | None = None) -> Path:
    """Run (or continue) the study into `out`; returns the study folder. `max_tasks` stops after that many tasks.

    A task that fails, with any error, is recorded with the error and retried until it has made `max_attempts`
    attempts (a worker killed mid-task counts as one); the tasks that depend on it are then blocked. A study that
    ends with such runs writes its report, then raises RunsFailed naming them."""
    study = resolve_study(source, overrides)
    study_dir = Path(out) if out is not None else Path("studies") / study["name"]
    study_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(study_dir, shared=True)  # a killed worker's half-written study.yaml
    saved = study_dir / "study.yaml"
    text_ = config_mod.dump(study)
    if saved.is_file():
        earlier = config_mod.read_yaml(saved)
        # Runs keep the names they were planned with: studies begun before 0.4 named them by hash.
        study["run_names"] = earlier.get("run_names", "hash")
        text_ = config_mod.dump(study)
        # The description is prose for the report and `fuse` says how runs are trained, not what they compute.
        before = {k: v for k, v in earlier.items() if k not in HOW_KEYS}
        now = {k: v for k, v in study.items() if k not in HOW_KEYS}
        if config_mod.identity(before) != config_mod.identity(now):
            raise UserError(f"study: {study_dir} holds a different study (its study.yaml differs); "
                            "choose another --out")
    if not saved.is_file() or saved.read_text() != text_:
        atomic_write_text(saved, text_)
    tasks = plan(study)
    db = ResultsDB(study_dir / "results.sqlite", stale_after_s=3600.0, max_attempts=study["max_attempts"])
    for task in tasks:
        db.add(task.run_id, kind=task.kind, name=task.name, config=task.config, path=task.path,
               depends_on=task.depends_on, group=task.group)
    say = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    first_run = next((t.config for t in tasks if t.kind in ("train", "distill")), None)
    groups = fuse_groups(tasks, group_size(study["fuse"], first_run)) if first_run is not None else {}
    try:
        with interrupting_signals():  # preemption gives the tasks back: no attempt is spent on it
            if study["launcher"] == "slurm":
                coordinate(study, study_dir, db, groups, say=say, poll_s=poll_s)
                finished = True
            else:
                finished = _work_locally(study_dir, db, groups, say=say, poll_s=poll_s, max_tasks=max_tasks)
        failed = [r["name"] for r in db.rows(status="failed") if r["attempts"] >= db.max_attempts] if finished else []
        blocked = len(db.blocked()) if failed else 0
    finally:
        db.close()
    if report and finished:
        from .report import write_report

        write_report(study_dir, quiet=quiet)
    if failed:
        raise RunsFailed(study_dir, failed, blocked)
    return study_dir
