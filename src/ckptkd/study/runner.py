"""`ckptkd study`: the paper's grid — teachers, their analysis, students from every kind of teacher — over seeds.

Every task (a training run, an analysis, a student) is one row of STUDY/results.sqlite keyed by the hash of its
resolved config. Processes claim rows one at a time, so a rerun skips finished work, resumes interrupted runs, and
several `ckptkd study` processes on one folder share the grid without doing anything twice.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import time
from pathlib import Path

from .. import config as config_mod
from ..errors import RunsFailed, UserError, interrupting_signals
from ..run import relative_to
from ..run.storage import atomic_write_text, remove_stale_temporaries
from .config import HOW_KEYS, resolve_study
from .plan import fuse_groups, group_size, plan
from .queue import ClaimLost, ResultsDB
from .summaries import analysis_metrics, run_metrics


def _student_config(task: dict, study_dir: Path) -> dict:
    """A student task's config as its run folder keeps it: its teachers named relative to that folder (the task names
    them relative to the study), so that nothing it stores depends on the working directory or on where the study
    folder lies: a study resumes from anywhere, and after a move."""
    cfg = copy.deepcopy(task["config"])
    out = study_dir / task["path"]
    cfg["kd"]["teachers"] = [relative_to(str(study_dir / reference), out) for reference in cfg["kd"]["teachers"]]
    return cfg


def _execute(task: dict, study_dir: Path, db: ResultsDB) -> tuple[dict, dict]:
    """Run one task (resuming its folder if an earlier attempt left one); returns (metrics, timings)."""
    from ..run import Run
    from ..selection.analysis import analyze
    from ..training.api import make_teacher
    from ..training.loop import Member, fit_one

    out = study_dir / task["path"]
    heartbeat = lambda _record: db.heartbeat(task["run_id"])
    cfg = copy.deepcopy(task["config"])
    if task["kind"] == "proxy":
        from ..selection.proxy import proxy_select

        result = proxy_select(study_dir / cfg["run"], cfg["student"], epochs=cfg["epochs"], seed=cfg["seed"],
                              quiet=True)
        return {k: result[k] for k in ("t_star", "scores", "epochs", "seed", "cost_s", "skipped")}, {}
    if task["kind"] == "analyze":
        result = analyze(out, seed=cfg["seed"], temperature=cfg["temperature"], split=cfg["split"],
                         seeds=cfg["seeds"], quiet=True)
        recorded = {c.epoch: c.metrics for c in Run(out).manifest.checkpoints}
        return analysis_metrics(result, Path(task["path"]), recorded), {}
    if task["kind"] == "train":
        run = fit_one(Member(cfg, out), resume=True, quiet=True, on_epoch=heartbeat)
    else:
        cfg = _student_config(task, study_dir)
        member = Member(cfg, out, make_teacher(cfg, quiet=True, base=out), "distill")
        run = fit_one(member, resume=True, quiet=True, on_epoch=heartbeat)
    return run_metrics(task["kind"], run)


def _execute_group(rows: list[dict], study_dir: Path, db: ResultsDB,
                   say) -> list[tuple[dict, dict] | Exception]:
    """Train the runs of `rows` as one group (`training.loop.fit`); per row its (metrics, timings) or the error that
    stopped it alone."""
    from ..training.api import make_teacher
    from ..training.loop import Member, fit

    members, teachers = [], {}
    for row in rows:
        cfg = _student_config(row, study_dir) if row["kind"] == "distill" else copy.deepcopy(row["config"])
        teacher = None
        if cfg["kd"]["teachers"]:
            # Members that name the same teachers, computed and cached the same way, share one (prepared once). The
            # cache settings are part of it: an @online student must not get a teacher answering from a cache.
            key = teacher_key(cfg)
            if key not in teachers:  # the students' folders are siblings: their references read alike
                teachers[key] = make_teacher(cfg, quiet=True, base=study_dir / row["path"])
            teacher = teachers[key]
        members.append(Member(cfg, study_dir / row["path"], teacher, row["kind"]))

    def heartbeat(_record):
        for row in rows:
            db.heartbeat(row["run_id"])

    outcomes = fit(members, resume=True, quiet=True, on_epoch=heartbeat, announce=say)
    return [outcome if isinstance(outcome, Exception) else run_metrics(row["kind"], outcome)
            for row, outcome in zip(rows, outcomes)]


def teacher_key(cfg: dict) -> str:
    """What makes two students' teachers the same object: their references and how they compute and cache."""
    kd = cfg["kd"]
    return json.dumps([{k: kd[k] for k in ("teachers", "channels_last", "autocast", "teacher_mode", "cache", "views",
                                           "cache_dir")}, cfg["precision"]], sort_keys=True)


def _release(db: ResultsDB, rows: list[dict]) -> None:
    for row in rows:
        try:
            db.release(row["run_id"])
        except ClaimLost:
            pass  # taken over by another worker already


def _record(db: ResultsDB, row: dict, result, seconds: float, say) -> None:
    """Record one task's result (its (metrics, timings), or the error that stopped it) and say so."""
    if isinstance(result, Exception):
        message = str(result) if isinstance(result, UserError) else f"{type(result).__name__}: {result}"
        db.fail(row["run_id"], error=message)
        say(f"    failed: {message.splitlines()[0] if message else type(result).__name__}")
        return
    metrics, timings = result
    db.complete(row["run_id"], metrics=metrics, timings=timings)
    outcome = {"analyze": lambda: f"T* = epoch {metrics['selected_epoch']}",
               "proxy": lambda: f"proxy pick = epoch {metrics['t_star']}"}.get(
        row["kind"], lambda: f"test {100 * metrics['test_acc']:.2f}%")()
    flags = [] if row["kind"] in ("analyze", "proxy") else metrics["health"]["flags"]
    flagged = f"  warning: {', '.join(f['flag'] for f in flags)}" if flags else ""
    say(f"    {outcome} ({seconds:.1f} s){flagged}")


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
    worker = f"{socket.gethostname()}:{os.getpid()}"
    say = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    first_run = next((t.config for t in tasks if t.kind in ("train", "distill")), None)
    groups = fuse_groups(tasks, group_size(study["fuse"], first_run)) if first_run is not None else {}
    done = 0
    total = len(tasks)
    try:
        with interrupting_signals():  # preemption gives the tasks back: no attempt is spent on it
            while max_tasks is None or done < max_tasks:
                rows = db.claim_group(worker, groups)
                if not rows:
                    if db.pending_count() == 0:
                        break
                    time.sleep(poll_s)  # another process holds the tasks ours depend on
                    continue
                finished = total - db.pending_count()
                started = time.perf_counter()
                if len(rows) == 1:
                    row = rows[0]
                    say(f"[{finished + 1}/{total}] {row['kind']:<8} {row['name']} (attempt {row['attempts']}) ...")
                    work = lambda: [_execute(row, study_dir, db)]  # noqa: E731
                else:
                    say(f"[{finished + 1}-{finished + len(rows)}/{total}] {rows[0]['kind']:<8} {len(rows)} runs as one "
                        f"group: {', '.join(r['name'] for r in rows)} (attempt {max(r['attempts'] for r in rows)}) ...")
                    work = lambda: _execute_group(rows, study_dir, db, say)  # noqa: E731
                try:
                    results = work()
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
                    _record(db, row, result, time.perf_counter() - started, say if len(rows) == 1 else
                            (lambda msg, name=row["name"]: say(f"{msg.rstrip()}  {name}")))
                done += len(rows)
        finished = max_tasks is None or done < max_tasks
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
