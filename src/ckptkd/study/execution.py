"""Running a study's tasks: one task or a group trained together, into their run folders (resuming what an earlier
attempt left), and recording each outcome in the results database. The same code runs in a local study worker and
in a Slurm job of the Slurm launcher."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import UserError
from ..run import relative_to
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


def execute(rows: list[dict], study_dir: Path, heartbeat=None, say=None) -> list[tuple[dict, dict] | Exception]:
    """Run the tasks of `rows` (one task, or a group trained together), resuming the folders earlier attempts left;
    per row its (metrics, timings) or the error that stopped it. `heartbeat(run_ids)` is called after every epoch.
    An interruption (Ctrl-C, SIGTERM) is raised, not returned: it is no task's fault."""
    beat = (lambda _record: heartbeat([r["run_id"] for r in rows])) if heartbeat else None
    if len(rows) > 1:
        return _execute_group(rows, study_dir, beat, say)
    try:
        return [_execute(rows[0], study_dir, beat)]
    except ClaimLost:
        raise  # not the task's failure: another worker owns it now
    except Exception as error:  # noqa: BLE001 - any failure of one task is recorded, the study goes on
        return [error]


def error_message(error: Exception) -> str:
    """What a failed attempt records: a UserError's own one line, any other error with its type."""
    return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"


def _execute(task: dict, study_dir: Path, heartbeat) -> tuple[dict, dict]:
    """Run one task (resuming its folder if an earlier attempt left one); returns (metrics, timings)."""
    from ..run import Run
    from ..selection.analysis import analyze
    from ..training.api import make_teacher
    from ..training.loop import Member, fit_one

    out = study_dir / task["path"]
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


def _execute_group(rows: list[dict], study_dir: Path, heartbeat, say) -> list[tuple[dict, dict] | Exception]:
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

    outcomes = fit(members, resume=True, quiet=True, on_epoch=heartbeat, announce=say)
    return [outcome if isinstance(outcome, Exception) else run_metrics(row["kind"], outcome)
            for row, outcome in zip(rows, outcomes)]


def teacher_key(cfg: dict) -> str:
    """What makes two students' teachers the same object: their references and how they compute and cache."""
    kd = cfg["kd"]
    return json.dumps([{k: kd[k] for k in ("teachers", "channels_last", "autocast", "teacher_mode", "cache", "views",
                                           "cache_dir")}, cfg["precision"]], sort_keys=True)


def record(db: ResultsDB, row: dict, result, seconds: float, say) -> None:
    """Record one task's result (its (metrics, timings), or the error that stopped it) and say so."""
    if isinstance(result, Exception):
        message = error_message(result)
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
