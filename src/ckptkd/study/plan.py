"""A study's plan: every task of the grid (teacher runs, their analyses, students), the dependencies that order them,
and the groups of runs trained together.

Every task is one row of STUDY/results.sqlite keyed by the hash of its resolved config (`task_id`), so a plan made
again from the same study names the same tasks.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as config_mod
from ..formatting import slug
from . import variants as variants_mod

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


def plan(study: dict) -> list[Task]:
    """Every task of the grid, teachers first, with the dependencies that order them.

    Each pair has `trajectories` independent teacher trajectories (or one per student seed with teacher_per_seed),
    and every student seed runs under every trajectory, paired across variants. Tasks whose configs are identical
    are one task serving several (pair, variant, trajectory, seed) cells, listed in its group's "serves": pairs with
    identical teachers share the teacher runs (as the paper's grid shares WRN-40-2), a student without a teacher
    serves every trajectory, and T0.5 of a 60-epoch teacher is the same student as epoch30 of the curve.

    A student run is named after the first cell it serves: pair, variant, trajectory (for a variant that has a
    teacher) and seed, e.g. `cnn-to-mlp-T0.5-t1-s0`, `cnn-to-mlp-none-s0` (`run_names: variant`); studies begun
    before 0.4 keep their hash names (`run_names: hash`), which their tasks' ids hold."""
    tasks: dict[str, Task] = {}
    named: dict[str, str] = {}  # a student config's hash (its name aside) -> the name it was given
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
        teacher_slug = f"teacher-{slug(teacher_model)}-{task_id('teacher', identity)[:6]}"
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
            # The analysis reads the soft labels at the temperature its students distill at.
            analysis_cfg = {"run": own[0].path, **study["analysis"],
                            "temperature": analysis_temperature(study, pair)}
            analyses[t_seed] = add(Task(task_id("analyze", analysis_cfg), "analyze", f"{own[0].name}-analysis",
                                        analysis_cfg, own[0].path, depends_on=[own[0].run_id],
                                        group={**base, "role": "analysis", "teacher_seed": t_seed, "seed": t_seed,
                                               "pairs": [], "serves": []}), [[pair["name"]]])
        if any(v.base == "epoch" for v in parsed):  # the selection benchmark: the proxy selector too
            for t_seed in teacher_seeds:
                proxy_cfg = {"run": leads[t_seed].path, "student": pair["student"],
                             "epochs": proxy_epochs(pair["student"]), "seed": study["seeds"][0]}
                add(Task(task_id("proxy", proxy_cfg), "proxy", f"{leads[t_seed].name}-proxy", proxy_cfg,
                         leads[t_seed].path, depends_on=[leads[t_seed].run_id],
                         group={**base, "role": "proxy", "teacher_seed": t_seed, "seed": t_seed, "pairs": [],
                                "serves": []}), [[pair["name"]]])
        if not extra_members:
            for i, t_seed in enumerate(teacher_seeds):  # this trajectory and the next M - 1, in a fixed order
                picked = sorted(teacher_seeds[(i + j) % len(teacher_seeds)] for j in range(min(m, len(teacher_seeds))))
                members[t_seed] = [leads[s] for s in picked]
        pair_slug = slug(pair["name"].replace("->", "-to-"))
        names = list(pair["variants"]) + [f"{v}@online" for v in study["compare_online"]]
        hashed = study.get("run_names", "variant") == "hash"
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
                    if hashed:  # studies begun before 0.4: their tasks' ids hold these names
                        cfg["name"] = f"{pair_slug}-student-{task_id('student', cfg)[:8]}-s{seed}"
                    else:  # named after the first cell it serves; a run serving several keeps that one name
                        cell = f"{pair['name']}-{name}" + (f"-t{t_seed}" if teachers else "") + f"-s{seed}"
                        cfg["name"] = named.setdefault(task_id("student", cfg),
                                                       slug(cell.replace("->", "-to-"), keep="._=", collapse=True))
                    add(Task(task_id("distill", cfg), "distill", cfg["name"], cfg, str(runs / cfg["name"]),
                             depends_on=depends, group={**base, "role": "student", "variant": name, "seed": seed,
                                                        "teacher_seed": t_seed, "pairs": [], "serves": []}),
                        [[pair["name"], name, t_seed, seed]])
    return list(tasks.values())


def proxy_epochs(student: dict) -> int:
    """How long each proxy student of the selection benchmark trains (`selection.proxy`'s default share)."""
    from ..selection.proxy import PROXY_SHARE

    return max(1, round(PROXY_SHARE * student["schedule"]["epochs"]))


def analysis_temperature(study: dict, pair: dict) -> float:
    """`analysis.temperature` where the study sets it, else the temperature the pair's students distill at."""
    set_ = study["analysis"]["temperature"]
    return set_ if set_ is not None else pair["student"]["kd"]["temperature"]


def fuse_groups(tasks: list[Task], size: int) -> dict[str, list[str]]:
    """run_id -> the run_ids trained together with it: training and distillation tasks of one kind whose configs
    differ only in what `training.loop.MEMBER_KEYS` allows (seed, name, teachers, KD settings), in plan order, at
    most `size` to a group. Fixed by the plan alone, so every rerun and every worker forms the same groups."""
    from ..training.loop import group_key

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
    from ..training.recipe import pick_device

    return 32 if pick_device(cfg["device"]).type == "cuda" else 8
