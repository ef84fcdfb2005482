"""A study's YAML: defaults, validation up front, and every pair's teacher and student configs resolved."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..config import boolean, integer, list_of, number, text
from ..errors import UserError
from . import variants as variants_mod

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
    "margin": 0.3,
    "run_names": "variant",
    "launcher": "local",
    "slurm": {},
    "pairs": [],
}

# What each Slurm job of a study asks for (`launcher: slurm`); `extra` is passed to sbatch as it is (`{"constraint":
# "a100"}` -> --constraint=a100), `signal_delay_s` is how long before the time limit the job is warned (and requeues
# itself).
SLURM_DEFAULTS: dict[str, Any] = {
    "partition": None, "account": None, "qos": None, "time_min": 60, "gpus_per_task": 0, "cpus_per_task": 1,
    "mem_gb": None, "array_parallelism": 32, "signal_delay_s": 90, "extra": {},
}
SLURM_FIELDS = {
    "partition": text(nullable=True), "account": text(nullable=True), "qos": text(nullable=True),
    "time_min": integer(1, 525600), "gpus_per_task": integer(0, 64), "cpus_per_task": integer(1, 1024),
    "mem_gb": number(0.0, 1e6, lo_open=True, nullable=True), "array_parallelism": integer(1, 100000),
    "signal_delay_s": integer(0, 3600),
    "extra": lambda v: None if isinstance(v, dict) and all(isinstance(k, str) for k in v) else "a mapping of sbatch "
                                                                                                "options",
}

# Study keys that say how the grid is run, not what it computes: a study resumes under another setting of them.
# (`margin`, the equivalence margin of the report's verdicts in points, only changes how results are read;
# `max_attempts` how often a failing task is retried; `run_names` is always taken from the study folder's own
# study.yaml; `launcher` and `slurm` say where the tasks run.)
HOW_KEYS = ("description", "fuse", "margin", "max_attempts", "run_names", "launcher", "slurm")


ANALYSIS_FIELDS = {  # what `ckptkd analyze` accepts
    "seed": integer(0, config_mod.MAX_SEED),
    "temperature": number(0.0, lo_open=True, nullable=True),
    "split": lambda v: None if v in ("train", "val") else "train or val",
    "seeds": integer(1, 100),
}


def _fuse(v):
    if v in ("auto", "off") or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024):
        return None
    return "auto, off or the largest number of runs trained as one group (1 to 1024)"


MAX_STUDY_SEEDS = 1000  # student seeds per cell; each is a run per (pair, variant, trajectory)


def _seeds(v):
    if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_STUDY_SEEDS:
        return None
    if isinstance(v, list) and len(v) > MAX_STUDY_SEEDS:
        return f"at most {MAX_STUDY_SEEDS:,} seeds"
    return (list_of(integer(0, config_mod.MAX_SEED), min_len=1)(v)
            and f"a count from 1 to {MAX_STUDY_SEEDS:,}, or a list of seeds from 0 to {config_mod.MAX_SEED:,}")


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
    "margin": number(0.0, 100.0, lo_open=True),
    "run_names": lambda v: None if v in ("variant", "hash") else "variant or hash",
    "launcher": lambda v: None if v in ("local", "slurm") else "local or slurm",
    "slurm": lambda v: None if isinstance(v, dict) else "a mapping of Slurm resources",
}


def _load_run_config(source, where: str, base_dir: Path) -> dict:
    if isinstance(source, str):
        path = Path(source)
        if not path.is_absolute() and not path.exists():
            path = base_dir / path
        return config_mod.read_yaml(path)
    if isinstance(source, dict):
        return copy.deepcopy(source)
    raise UserError(f"study: {where} must be a config path or a mapping, got {source!r}")


def _name_bad_variant(variants, where: str) -> None:
    """The first item of a variant list that is not a variant, with parse's reason (not the whole list)."""
    for i, name in enumerate(variants if isinstance(variants, list) else []):
        try:
            variants_mod.parse(name)
        except ValueError as e:
            raise UserError(f"study: {where}[{i}]: {e}") from None


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
    _name_bad_variant(study["variants"], "variants")
    for key, check in STUDY_FIELDS.items():
        expected = check(study[key])
        if expected:
            raise UserError(f"study: {key} must be {expected}, got {study[key]!r}")
    if isinstance(study["seeds"], int):
        study["seeds"] = list(range(study["seeds"]))
    unknown = set(study["slurm"]) - set(SLURM_DEFAULTS)
    if unknown:
        raise UserError(f"study: unknown key 'slurm.{sorted(unknown)[0]}' (known: {', '.join(SLURM_DEFAULTS)})")
    study["slurm"] = {**SLURM_DEFAULTS, **study["slurm"]}
    for key, check in SLURM_FIELDS.items():
        expected = check(study["slurm"][key])
        if expected:
            raise UserError(f"study: slurm.{key} must be {expected}, got {study['slurm'][key]!r}")
    if not isinstance(study["pairs"], list) or not study["pairs"]:
        raise UserError("study: pairs must be a non-empty list of {teacher: CONFIG, student: CONFIG}")
    for section in ("common", "kd", "analysis"):
        if not isinstance(study[section], dict):
            raise UserError(f"study: {section} must be a mapping")
    study["analysis"] = {**STUDY_DEFAULTS["analysis"], **study["analysis"]}
    unknown = set(study["analysis"]) - set(STUDY_DEFAULTS["analysis"])
    if unknown:
        raise UserError(f"study: unknown key 'analysis.{sorted(map(str, unknown))[0]}' (known: "
                        f"{', '.join(STUDY_DEFAULTS['analysis'])})")
    for key, check in ANALYSIS_FIELDS.items():  # checked here, not when the first analysis task runs
        expected = check(study["analysis"][key])
        if expected:
            raise UserError(f"study: analysis.{key} must be {expected}, got {study['analysis'][key]!r}")
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
        _name_bad_variant(variants, f"pairs[{i}].variants")
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
            from ..training.schedules import checkpoint_epochs

            variants = variants + [f"epoch{e}" for e in checkpoint_epochs(teacher)]
        resolved_pairs.append({"name": name, "teacher": teacher, "student": student, "trajectories": trajectories,
                               "variants": variants_mod.ordered(variants)})
    if study["analysis"]["temperature"] is None:  # each teacher is analysed at its students' temperature
        by_teacher: dict[str, set] = {}
        for p in resolved_pairs:
            teacher = {k: v for k, v in p["teacher"].items() if k not in ("name", "seed")}
            key = json.dumps(config_mod.identity(teacher), sort_keys=True)
            by_teacher.setdefault(key, set()).add(p["student"]["kd"]["temperature"])
        if any(len(temps) > 1 for temps in by_teacher.values()):
            raise UserError("study: pairs that share a teacher distill at different kd.temperature values, and a "
                            "teacher run has one analysis: set analysis.temperature")
    names = [p["name"] for p in resolved_pairs]
    if len(set(names)) != len(names):
        raise UserError(f"study: two pairs share a name ({names}); give each pair a distinct name")
    study["pairs"] = resolved_pairs
    return study
