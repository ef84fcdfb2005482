"""`ckptkd study`: the paper's grid — teachers, their analysis, students from every kind of teacher — over seeds.

Every task (a training run, an analysis, a student) is one row of STUDY/results.sqlite keyed by the hash of its
resolved config. Processes claim rows one at a time, so a rerun skips finished work, resumes interrupted runs, and
several `ckptkd study` processes on one folder share the grid without doing anything twice.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import variants as variants_mod
from .config import boolean, integer, list_of, number, text
from .errors import UserError
from .results import ClaimLost, ResultsDB
from .storage import atomic_write_text, remove_stale_temporaries

# The paper's grid; any name of `variants.GRAMMAR` may be listed.
VARIANTS = ("none", "T0.3", "T0.5", "T0.7", "Tfull", "Tstar", "snapshot", "full_ensemble")

STUDY_DEFAULTS: dict[str, Any] = {
    "name": "study",
    "description": "",
    "seeds": 3,
    "ensemble_size": 3,
    "teacher_per_seed": False,
    "variants": list(VARIANTS),
    "snapshot": [0.3, 0.5, 0.7],
    "common": {},
    "kd": {},
    "analysis": {"seed": 0, "temperature": None, "split": "train", "seeds": 5},
    "trajectories": 1,
    "curve": False,
    "compare_online": [],
    "max_attempts": 3,
    "fuse": "auto",
    "pairs": [],
}

# Study keys that say how the grid is run, not what it computes: a study resumes under another setting of them.
HOW_KEYS = ("description", "fuse")


def _fuse(v):
    if v in ("auto", "off") or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024):
        return None
    return "auto, off or the largest number of runs trained as one group (1 to 1024)"


def _seeds(v):
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return None
    return list_of(integer(0), min_len=1)(v)


def _snapshot(v):
    if v == "top-info":
        return None
    return list_of(number(0.0, 1.0, lo_open=True), min_len=2)(v) and 'a list of at least 2 fractions or "top-info"'


STUDY_FIELDS = {
    "name": text(pattern=r"[A-Za-z0-9_.\-]+"),
    "description": lambda v: None if isinstance(v, str) else "text",
    "seeds": _seeds,
    "ensemble_size": integer(2, 16),
    "teacher_per_seed": boolean(),
    "trajectories": integer(1, 100),
    "curve": boolean(),
    "variants": list_of(variants_mod.check, min_len=1),
    "snapshot": _snapshot,
    "compare_online": list_of(lambda v: "a variant other than none" if v == "none" else variants_mod.check(v)),
    "max_attempts": integer(1, 100),
    "fuse": _fuse,
}


@dataclass
class Task:
    run_id: str
    kind: str                 # train | analyze | distill
    name: str
    config: dict
    path: str                 # relative to the study folder
    depends_on: list[str] = field(default_factory=list)
    group: dict = field(default_factory=dict)


def task_id(kind: str, config: dict) -> str:
    body = {"kind": kind, "config": config_mod.identity(config)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _load_run_config(source, where: str, base_dir: Path) -> dict:
    if isinstance(source, str):
        path = Path(source)
        if not path.is_absolute() and not path.exists():
            path = base_dir / path
        return config_mod.read_yaml(path)
    if isinstance(source, dict):
        return copy.deepcopy(source)
    raise UserError(f"study: {where} must be a config path or a mapping, got {source!r}")


def resolve_study(source: str | Path | dict, overrides: list[str] | dict | None = None) -> dict:
    """The study config with defaults filled in and every pair's teacher and student configs resolved."""
    if isinstance(source, (str, Path)):
        raw, base_dir = config_mod.read_yaml(source), Path(source).resolve().parent
    else:
        raw, base_dir = copy.deepcopy(source), Path.cwd()
    items = overrides.items() if isinstance(overrides, dict) else (config_mod.parse_override(o) for o in overrides or [])
    for key, value in items:
        if key.startswith(("common.", "kd.")) and key.count(".") >= 1:
            # `common` and `kd` hold run-config keys: `--set common.data.root=DIR` sets common["data.root"].
            section, rest = key.split(".", 1)
            raw.setdefault(section, {})[rest] = value
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    study = copy.deepcopy(STUDY_DEFAULTS)
    for key, value in raw.items():
        if key not in study:
            raise UserError(f"study: unknown key '{key}' (known: {', '.join(sorted(study))})")
        study[key] = value
    for key, check in STUDY_FIELDS.items():
        expected = check(study[key])
        if expected:
            raise UserError(f"study: {key} must be {expected}, got {study[key]!r}")
    if isinstance(study["seeds"], int):
        study["seeds"] = list(range(study["seeds"]))
    if not isinstance(study["pairs"], list) or not study["pairs"]:
        raise UserError("study: pairs must be a non-empty list of {teacher: CONFIG, student: CONFIG}")
    for section in ("common", "kd", "analysis"):
        if not isinstance(study[section], dict):
            raise UserError(f"study: {section} must be a mapping")
    study["analysis"] = {**STUDY_DEFAULTS["analysis"], **study["analysis"]}
    unknown = set(study["analysis"]) - set(STUDY_DEFAULTS["analysis"])
    if unknown or study["analysis"]["split"] not in ("train", "val"):
        raise UserError(f"study: analysis takes seed, temperature, split (train or val) and seeds, got "
                        f"{study['analysis']}")
    if study["teacher_per_seed"] and study["trajectories"] != 1:
        raise UserError("study: teacher_per_seed (one trajectory per student seed) and trajectories are exclusive")
    resolved_pairs = []
    for i, pair in enumerate(study["pairs"]):
        if not isinstance(pair, dict) or not {"teacher", "student"} <= set(pair):
            raise UserError(f"study: pairs[{i}] must have a teacher and a student config")
        unknown = set(pair) - {"teacher", "student", "teacher_set", "student_set", "name", "variants", "curve",
                               "trajectories"}
        if unknown:
            raise UserError(f"study: pairs[{i}] has unknown key(s) {sorted(unknown)}")
        variants = pair.get("variants", study["variants"])
        expected = STUDY_FIELDS["variants"](variants) or (None if isinstance(pair.get("curve", False), bool)
                                                          else "curve must be true or false")
        if expected:
            raise UserError(f"study: pairs[{i}].variants must be {expected}, got {variants!r}")
        trajectories = pair.get("trajectories", study["trajectories"])
        if STUDY_FIELDS["trajectories"](trajectories):
            raise UserError(f"study: pairs[{i}].trajectories must be an integer from 1 to 100, got {trajectories!r}")
        teacher = config_mod.resolve(_load_run_config(pair["teacher"], f"pairs[{i}].teacher", base_dir),
                                     {**study["common"], **pair.get("teacher_set", {})})
        student = config_mod.resolve(_load_run_config(pair["student"], f"pairs[{i}].student", base_dir),
                                     {**study["common"], **{f"kd.{k}": v for k, v in study["kd"].items()},
                                      **pair.get("student_set", {})})
        # The teacher must keep every checkpoint a variant refers to.
        chosen = [variants_mod.parse(v) for v in variants]
        wanted = {v.fraction for v in chosen if v.base == "fraction"} | {1.0}
        if any(v.base == "snapshot" for v in chosen) and study["snapshot"] != "top-info":
            wanted |= set(study["snapshot"])
        teacher["checkpoints"]["fractions"] = sorted(set(teacher["checkpoints"]["fractions"]) | wanted)
        epochs = {v.epoch for v in chosen if v.base == "epoch"}
        late = sorted(e for e in epochs if e > teacher["schedule"]["epochs"])
        if late:
            raise UserError(f"study: variants name teacher epochs {late} beyond the teacher's "
                            f"{teacher['schedule']['epochs']} epochs (pairs[{i}])")
        teacher["checkpoints"]["epochs"] = sorted(set(teacher["checkpoints"]["epochs"]) | epochs)
        name = pair.get("name") or f"{teacher['model']['name']}->{student['model']['name']}"
        if pair.get("curve", study["curve"]):  # the selection benchmark: a student from every saved checkpoint
            from .schedules import checkpoint_epochs

            variants = variants + [f"epoch{e}" for e in checkpoint_epochs(teacher)]
        resolved_pairs.append({"name": name, "teacher": teacher, "student": student, "trajectories": trajectories,
                               "variants": variants_mod.ordered(variants)})
    names = [p["name"] for p in resolved_pairs]
    if len(set(names)) != len(names):
        raise UserError(f"study: two pairs share a name ({names}); give each pair a distinct name")
    study["pairs"] = resolved_pairs
    return study


def _slug(text_: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text_.replace("->", "-to-").replace("@", "-"))


def plan(study: dict) -> list[Task]:
    """Every task of the grid, teachers first, with the dependencies that order them.

    Each pair has `trajectories` independent teacher trajectories (or one per student seed with teacher_per_seed),
    and every student seed runs under every trajectory, paired across variants. Tasks whose configs are identical
    are one task serving several (pair, variant, trajectory, seed) cells, listed in its group's "serves": pairs with
    identical teachers share the teacher runs (as the paper's grid shares WRN-40-2), a student without a teacher
    serves every trajectory, and T0.5 of a 60-epoch teacher is the same student as epoch30 of the curve."""
    tasks: dict[str, Task] = {}
    runs = Path("runs")
    # References stay relative to the study folder, so a task's id does not depend on how the folder is spelled.
    m = study["ensemble_size"]

    def add(task: Task, serves: list) -> Task:
        task = tasks.setdefault(task.run_id, task)
        for cell in serves:
            if cell not in task.group["serves"]:
                task.group["serves"].append(cell)
        pair = cell[0]
        if pair not in task.group["pairs"]:
            task.group["pairs"].append(pair)
        return task

    def train_task(cfg: dict, group: dict, pair: str) -> Task:
        return add(Task(task_id("train", cfg), "train", cfg["name"], cfg, str(runs / cfg["name"]),
                        group={**group, "pairs": [], "serves": []}), [[pair]])

    for pair in study["pairs"]:
        teacher_model, student_model = pair["teacher"]["model"]["name"], pair["student"]["model"]["name"]
        identity = {k: v for k, v in pair["teacher"].items() if k not in ("name", "seed")}
        teacher_slug = f"teacher-{_slug(teacher_model)}-{task_id('teacher', identity)[:6]}"
        base = {"pair": pair["name"], "teacher_model": teacher_model, "student_model": student_model}
        parsed = [variants_mod.parse(v) for v in pair["variants"] + study["compare_online"]]
        if study["teacher_per_seed"]:
            teacher_seeds = list(study["seeds"])
        else:
            teacher_seeds = [study["seeds"][0] + t for t in range(pair["trajectories"])]
        # A full ensemble takes the last checkpoints of other trajectories when there are enough of them;
        # otherwise independent members are trained for it.
        full = any(v.base == "full_ensemble" for v in parsed)
        extra_members = full and len(teacher_seeds) < m
        leads, analyses, members = {}, {}, {}
        for t_seed in teacher_seeds:
            own = []
            for k in range(m if extra_members else 1):
                seed = t_seed + 1000 * k  # independent runs for the full ensemble, never colliding with student seeds
                cfg = copy.deepcopy(pair["teacher"])
                cfg["seed"] = seed
                cfg["name"] = f"{teacher_slug}-s{t_seed}" + (f"-m{k}" if k else "")
                own.append(train_task(cfg, {**base, "role": "teacher" if k == 0 else "ensemble_member",
                                            "teacher_seed": t_seed, "seed": seed}, pair["name"]))
            leads[t_seed], members[t_seed] = own[0], own
            analysis_cfg = {"run": own[0].path, **study["analysis"]}
            analyses[t_seed] = add(Task(task_id("analyze", analysis_cfg), "analyze", f"{own[0].name}-analysis",
                                        analysis_cfg, own[0].path, depends_on=[own[0].run_id],
                                        group={**base, "role": "analysis", "teacher_seed": t_seed, "seed": t_seed,
                                               "pairs": [], "serves": []}), [[pair["name"]]])
        if not extra_members:
            for i, t_seed in enumerate(teacher_seeds):  # this trajectory and the next M - 1, in a fixed order
                picked = sorted(teacher_seeds[(i + j) % len(teacher_seeds)] for j in range(min(m, len(teacher_seeds))))
                members[t_seed] = [leads[s] for s in picked]
        slug = _slug(pair["name"])
        names = list(pair["variants"]) + [f"{v}@online" for v in study["compare_online"]]
        for t_seed in teacher_seeds:
            ctx = variants_mod.Context(lead=leads[t_seed].path, members=[t.path for t in members[t_seed]],
                                       lead_id=leads[t_seed].run_id, member_ids=[t.run_id for t in members[t_seed]],
                                       analysis_id=analyses[t_seed].run_id, snapshot=study["snapshot"],
                                       ensemble_size=m, epochs=pair["teacher"]["schedule"]["epochs"])
            for seed in ([t_seed] if study["teacher_per_seed"] else study["seeds"]):
                for name in names:
                    variant = variants_mod.parse(name)
                    teachers, depends = variant.teachers(ctx)
                    cfg = copy.deepcopy(pair["student"])
                    cfg["seed"] = seed
                    cfg["kd"]["teachers"] = teachers
                    if variant.online:  # the same student with teachers run on every batch, to check the cache
                        cfg["kd"]["cache"] = "off"
                    if variant.temperature is not None:
                        cfg["kd"]["temperature"] = variant.temperature
                    cfg["name"] = f"{slug}-student-{task_id('student', cfg)[:8]}-s{seed}"
                    add(Task(task_id("distill", cfg), "distill", cfg["name"], cfg, str(runs / cfg["name"]),
                             depends_on=depends, group={**base, "role": "student", "variant": name, "seed": seed,
                                                        "teacher_seed": t_seed, "pairs": [], "serves": []}),
                        [[pair["name"], name, t_seed, seed]])
    return list(tasks.values())


def fuse_groups(tasks: list[Task], size: int) -> dict[str, list[str]]:
    """run_id -> the run_ids trained together with it: training and distillation tasks of one kind whose configs
    differ only in what `group.MEMBER_KEYS` allows (seed, name, teachers, KD settings), in plan order, at most `size`
    to a group. Fixed by the plan alone, so every rerun and every worker forms the same groups."""
    from .group import group_key

    by_key: dict[tuple, list[str]] = {}
    for task in tasks:
        if task.kind in ("train", "distill"):
            by_key.setdefault((task.kind, group_key(task.config)), []).append(task.run_id)
    groups = {}
    for ids in by_key.values():
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            for run_id in chunk:
                groups[run_id] = chunk
    return groups


def group_size(fuse, cfg: dict) -> int:
    """`fuse: auto` groups 8 runs on a CPU (fused throughput levels off there: benchmarks/README.md) and 32 on a
    GPU; `off` is 1; a number is that many."""
    if fuse == "off":
        return 1
    if fuse != "auto":
        return fuse
    from .engine import pick_device

    return 32 if pick_device(cfg["device"]).type == "cuda" else 8


def _student_config(task: dict, study_dir: Path) -> dict:
    cfg = copy.deepcopy(task["config"])
    cfg["kd"]["teachers"] = [str(study_dir / reference) for reference in cfg["kd"]["teachers"]]
    return cfg


def _execute(task: dict, study_dir: Path, db: ResultsDB) -> tuple[dict, dict]:
    """Run one task (resuming its folder if an earlier attempt left one); returns (metrics, timings)."""
    from .analysis import analyze
    from .run import Run
    from .trainer import distill, fit

    out = study_dir / task["path"]
    heartbeat = lambda _record: db.heartbeat(task["run_id"])
    cfg = copy.deepcopy(task["config"])
    if task["kind"] == "analyze":
        result = analyze(out, seed=cfg["seed"], temperature=cfg["temperature"], split=cfg["split"],
                         seeds=cfg["seeds"], quiet=True)
        recorded = {c.epoch: c.metrics for c in Run(out).manifest.checkpoints}
        return analysis_metrics(result, Path(task["path"]), recorded), {}
    if task["kind"] == "train":
        run = fit(cfg, out, resume=True, quiet=True, on_epoch=heartbeat)
    else:
        run = distill(_student_config(task, study_dir), out=out, resume=True, quiet=True, on_epoch=heartbeat)
    return run_metrics(task["kind"], run)


def _execute_group(rows: list[dict], study_dir: Path, db: ResultsDB,
                   say) -> list[tuple[dict, dict] | Exception]:
    """Train the runs of `rows` as one group (`group.fit_group`); per row its (metrics, timings) or the error that
    stopped it alone."""
    from .group import Member, fit_group
    from .trainer import make_teacher

    members, teachers = [], {}
    for row in rows:
        cfg = _student_config(row, study_dir) if row["kind"] == "distill" else copy.deepcopy(row["config"])
        teacher = None
        if cfg["kd"]["teachers"]:
            # Members that name the same teachers, computed and cached the same way, share one (prepared once). The
            # cache settings are part of it: an @online student must not get a teacher answering from a cache.
            key = teacher_key(cfg)
            if key not in teachers:
                teachers[key] = make_teacher(cfg, quiet=True)
            teacher = teachers[key]
        members.append(Member(cfg, study_dir / row["path"], teacher, row["kind"]))

    def heartbeat(_record):
        for row in rows:
            db.heartbeat(row["run_id"])

    outcomes = fit_group(members, resume=True, quiet=True, on_epoch=heartbeat, announce=say)
    return [outcome if isinstance(outcome, Exception) else run_metrics(row["kind"], outcome)
            for row, outcome in zip(rows, outcomes)]


def teacher_key(cfg: dict) -> str:
    """What makes two students' teachers the same object: their references and how they compute and cache."""
    kd = cfg["kd"]
    return json.dumps([{k: kd[k] for k in ("teachers", "channels_last", "autocast", "teacher_mode", "cache", "views",
                                           "cache_dir")}, cfg["precision"]], sort_keys=True)


def run_metrics(kind: str, run) -> tuple[dict, dict]:
    """What the study database keeps of a finished training run: (metrics, timings)."""
    manifest = run.manifest
    final = manifest.final
    metrics = {"test_acc": final.test_acc, "val_acc": final.val_acc, "train_acc": final.train_acc,
               "best_val_acc": final.best_val_acc, "best_val_epoch": final.best_val_epoch,
               "train_time_s": final.train_time_s, "test_acc_last_k": final.test_acc_last_k, "last_k": final.last_k,
               "health": manifest.health}
    if kind == "distill":
        ensemble = manifest.teacher_ensemble or {}
        metrics.update(teacher_val_acc=ensemble.get("val_acc"), teacher_test_acc=ensemble.get("test_acc"),
                       teachers=[t["reference"] for t in manifest.teachers],
                       teacher_epochs=[t["epoch"] for t in manifest.teachers],
                       teacher_cache=ensemble.get("cache"))
    return metrics, {"train_time_s": final.train_time_s}


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
    outcome = (f"T* = epoch {metrics['selected_epoch']}" if row["kind"] == "analyze"
               else f"test {100 * metrics['test_acc']:.2f}%")
    flags = [] if row["kind"] == "analyze" else metrics["health"]["flags"]
    flagged = f"  warning: {', '.join(f['flag'] for f in flags)}" if flags else ""
    say(f"    {outcome} ({seconds:.1f} s){flagged}")


def analysis_metrics(analysis: dict, path: Path, recorded: dict[int, dict] | None = None) -> dict:
    """What the study database keeps of an analysis: enough to rebuild the report's trajectory section even when
    the run folders are gone (they are not committed with a study's results)."""
    split = analysis["split"]
    scores = {row["epoch"]: row for row in analysis["criteria"][analysis["selected"]["criterion"]]["scores"]}
    trajectory = []
    for r in analysis["checkpoints"]:
        m, est = r[split], r[split]["estimates"]
        row = scores.get(r["epoch"], {})
        trajectory.append({"epoch": r["epoch"], "fraction": r["fraction"], "val_acc": r["val"]["acc"],
                           "train_acc": r["train"]["acc"], "test_acc": (recorded or {}).get(r["epoch"], {}).get(
                               "test_acc"),
                           "confidence": m["confidence"], "p_target_t": m["p_target_t"],
                           "nontarget_entropy_t": m["nontarget_entropy_t"], "nc1": m["nc1"],
                           **{q: [est[q]["mean"], est[q]["se"]] for q in ("i_xf", "i_yf")},
                           "score": [row.get("score"), row.get("se")]})
    return {"selected_epoch": analysis["selected"]["epoch"], "analysis": str(path / "analysis.json"),
            "split": split, "criterion": analysis["selected"]["criterion"], "ties": analysis["selected"]["ties"],
            "trajectory": trajectory, "agreement": analysis.get("agreement"),
            "picks": {key: {"t_star": c["t_star"], "ties": c["ties"], "flat": c["flat"]}
                      for key, c in analysis["criteria"].items()}}


def run_study(source: str | Path | dict, out: str | Path | None = None, *, overrides: list | dict | None = None,
              quiet: bool = False, report: bool = True, poll_s: float = 2.0, max_tasks: int | None = None) -> Path:
    """Run (or continue) the study into `out`; returns the study folder. `max_tasks` stops after that many tasks.

    A task that fails, with any error, is recorded with the error and retried until it has made `max_attempts`
    attempts (a worker killed mid-task counts as one); the tasks that depend on it are then blocked."""
    study = resolve_study(source, overrides)
    study_dir = Path(out) if out is not None else Path("studies") / study["name"]
    study_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(study_dir, shared=True)  # a killed worker's half-written study.yaml
    saved = study_dir / "study.yaml"
    text_ = config_mod.dump(study)
    if saved.is_file():
        # The description is prose for the report and `fuse` says how runs are trained, not what they compute.
        before = {k: v for k, v in config_mod.read_yaml(saved).items() if k not in HOW_KEYS}
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
    finally:
        db.close()
    if report and (max_tasks is None or done < max_tasks):
        from .study_report import write_report

        write_report(study_dir, quiet=quiet)
    return study_dir
