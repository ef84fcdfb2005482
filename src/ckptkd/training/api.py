"""The training API the CLI is a face of: `train` a teacher, `distill` a student, `distill_fused` many students at
once. Each resolves its config and hands the loop (`loop.fit`) its runs."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

from .. import config as config_mod
from ..errors import UserError
from ..formatting import slug
from ..run import MANIFEST, Run, split_reference
from .loop import Member, fit, fit_one


def default_out(cfg: dict) -> Path:
    return Path("runs") / cfg["name"]


def train(config: str | Path | dict, overrides: dict | list | None = None, out: str | Path | None = None, *,
          resume: bool = False, quiet: bool = False, on_epoch: Callable[[dict], None] | None = None) -> Run:
    """Train a model and keep its trajectory. `config` is a YAML path or dict; `overrides` maps dotted keys to values."""
    cfg = config_mod.resolve(config, overrides)
    if cfg["kd"]["teachers"]:
        raise UserError("config: kd.teachers is set; use `ckptkd distill` to train a student")
    return fit_one(Member(cfg, Path(out if out is not None else default_out(cfg))), resume=resume, quiet=quiet,
                   on_epoch=on_epoch)


def make_teacher(cfg: dict, *, quiet: bool = False, allow_incomplete: bool = False, base: str | Path | None = None):
    """The frozen teacher a resolved config names in kd.teachers (None when it names none); relative references are
    taken from `base` (default: the working directory)."""
    from ..teachers import Teacher

    kd = cfg["kd"]
    if not kd["teachers"]:
        return None
    # Teachers compute at the run's precision unless kd.autocast says otherwise.
    autocast = kd["autocast"] if kd["autocast"] != "auto" else {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}[cfg["precision"]]
    return Teacher.from_references(kd["teachers"], quiet=quiet, channels_last=kd["channels_last"], autocast=autocast,
                                   allow_incomplete=allow_incomplete, mode=kd["teacher_mode"], base=base)


def distill(config: str | Path | dict, teachers: list[str] | None = None, overrides: dict | list | None = None,
            out: str | Path | None = None, *, resume: bool = False, quiet: bool = False,
            allow_incomplete: bool = False, on_epoch: Callable[[dict], None] | None = None) -> Run:
    """Train a student under teachers given as checkpoint references (none: the CE-only baseline).

    A teacher run that did not complete is refused unless `allow_incomplete`, which the manifest then records."""
    cfg = config_mod.resolve(config, overrides)
    if teachers:  # `none` (alone) is the CE baseline; `A+B` is the ensemble of A and B, as `--teacher A --teacher B`
        if "none" in teachers and len(teachers) > 1:
            raise UserError("--teacher none (no teacher) cannot be given with other teachers")
        cfg["kd"]["teachers"] = [r for entry in teachers for r in parse_teacher_entry(entry)]
    teacher = make_teacher(cfg, quiet=quiet, allow_incomplete=allow_incomplete)
    return fit_one(Member(cfg, Path(out if out is not None else default_out(cfg)), teacher, "distill"),
                   resume=resume, quiet=quiet, on_epoch=on_epoch)


def distill_fused(config: str | Path | dict, teachers: list[str | list[str] | None], seeds: list[int] | None = None,
                  overrides: dict | list | None = None, out: str | Path | None = None, *, resume: bool = False,
                  quiet: bool = False, allow_incomplete: bool = False, group_size: int = 8,
                  engine: str = "auto") -> list[Run]:
    """Distill one student per (teacher, seed), trained together in groups of at most `group_size` (`loop.fit`),
    as even as possible.

    Each entry of `teachers` is one student's teachers: a reference (`RUN@0.5`, `RUN@0.3,0.5,0.7`), several joined
    by `+` or given as a list (a full ensemble), or None / "none" for the CE-only baseline. Student (t, s) is written
    to OUT/<teacher>-s<seed>, an ordinary run folder; `seeds` defaults to the config's seed."""
    base = config_mod.resolve(config, overrides)
    root = Path(out) if out is not None else default_out(base)
    if (root / MANIFEST).is_file() or (root / "results.sqlite").is_file():
        raise UserError(f"--out {root} is a run or a study folder; students are written into a folder of their own, "
                        "one subfolder each: choose another --out")
    seeds = list(seeds) if seeds else [base["seed"]]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: a seed is listed twice ({seeds})")
    entries = [parse_teacher_entry(entry) for entry in teachers]
    for i, references in enumerate(entries):
        if references in entries[:i]:
            raise UserError(f"--teacher {'+'.join(references) or 'none'} is listed twice: each --teacher is one "
                            "student per seed")
    slugs = teacher_slugs(entries)
    clash = next((s for s in slugs if slugs.count(s) > 1), None)
    if clash is not None:  # e.g. runs/t@0.5 and ./runs/t@0.5; refused before any teacher is loaded
        raise UserError(f"two --teacher entries name the same checkpoints ({clash}); list each once")
    members = []
    for references, folder_name in zip(entries, slugs):  # one teacher per entry, shared by its seeds' students
        cfg = copy.deepcopy(base)
        cfg["kd"]["teachers"] = references
        teacher = make_teacher(cfg, quiet=quiet, allow_incomplete=allow_incomplete)
        for seed in seeds:
            member_cfg = copy.deepcopy(cfg)
            member_cfg["seed"] = seed
            members.append(Member(member_cfg, root / f"{folder_name}-s{seed}", teacher, "distill"))
    runs: list[Run] = []
    failed: list[tuple[Member, Exception]] = []
    count = -(-len(members) // group_size)  # as few groups as group_size allows, as even as possible: 9 -> 4 + 5
    for k in range(count):
        group = members[k * len(members) // count:(k + 1) * len(members) // count]
        for member, outcome in zip(group, fit(group, resume=resume, quiet=quiet, engine=engine)):
            if isinstance(outcome, Exception):
                failed.append((member, outcome))
            else:
                runs.append(outcome)
    if failed:
        member, error = failed[0]
        others = f"the other {len(runs)} are complete" if runs else "none is complete"
        raise UserError(f"{len(failed)} of {len(members)} students failed (first {member.out}: {error}); {others}")
    return runs


def parse_teacher_entry(entry: str | list[str] | None) -> list[str]:
    """One student's teachers: `none` -> [], `A+B` -> [A, B] (unless A+B is itself a run folder's path, as the
    folders `distill --fuse` names after ensembles are)."""
    if entry is None or entry == "none":
        return []
    if isinstance(entry, str):
        references = [entry] if split_reference(entry)[0].exists() else entry.split("+")
    else:
        references = list(entry)
    if not references or any(not isinstance(r, str) or not r.strip() for r in references):
        raise UserError(f"--teacher: {entry!r} is not a checkpoint reference (RUN@SELECTOR, A+B for an ensemble, "
                        "or none)")
    if len(references) > 1 and "none" in (r.strip() for r in references):
        raise UserError(f"--teacher {entry!r}: none (no teacher) cannot join an ensemble")
    return [r.strip() for r in references]


def teacher_slugs(entries: list[list[str]]) -> list[str]:
    """Folder names for students' teachers: `none`, or the references with path separators made safe. A run is
    named by its folder's name, with as many parent folders as it takes to tell it from the others' (runs/a/t and
    runs/b/t give a-t and b-t)."""
    def name(references: list[str], depth: int) -> str:
        if not references:
            return "none"
        parts = []
        for r in references:
            folder, selector = split_reference(r)  # the selector as given: none if the reference names none
            given = f"@{selector}" if r != str(folder) and r.endswith(f"@{selector}") else ""
            parts.append("-".join(Path(os.path.abspath(folder)).parts[-depth:]) + given)
        return slug("+".join(parts), keep="._-+@=,")

    depths = [1] * len(entries)
    while True:
        slugs = [name(refs, d) for refs, d in zip(entries, depths)]
        clashing = [i for i, s in enumerate(slugs) if slugs.count(s) > 1]
        deeper = [i for i in clashing if name(entries[i], depths[i] + 1) != slugs[i]]
        if not deeper:  # distinct at every depth, or as deep as their paths go
            return slugs
        for i in deeper:
            depths[i] += 1
