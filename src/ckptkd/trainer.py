"""One training loop for teachers and students alike: a student is a model trained under an objective with a teacher.

`fit` composes named steps: the run folder (`run.RunWriter`: create/resume policy, checkpoints, resume state, the
manifest), the data, the teacher prepared in one call, the model, the objective (`engine.Objective`, built on
`losses.kd_loss`), one epoch of steps (`engine.train_epoch`), evaluation, and the log (`tracking.RunLog`).
Under torchrun every rank runs `fit`; rank 0 alone evaluates and writes (see `ckptkd.distributed`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from . import config as config_mod
from . import data as data_mod
from . import distributed, health
from .engine import (Objective, cache_settings, checkpoint_epochs, evaluate, make_optimizer, model_spec, pick_device,
                     test_epochs, train_epoch)
from .errors import UserError
from .models import from_spec
from .run import MANIFEST, Final, Manifest, Progress, Run, RunWriter, split_reference
from .storage import is_disk_full
from .tracking import RunLog


def fit(cfg: dict, out: str | Path, *, resume: bool = False, kind: str = "train", teacher=None,
        quiet: bool = False, on_epoch: Callable[[dict], None] | None = None) -> Run:
    """Train `cfg` into the run folder `out` (a student when `teacher` is given); `on_epoch(record)` is called after
    each epoch's files are written (a study uses it as a heartbeat)."""
    device = distributed.setup(pick_device(cfg["device"]))
    main = distributed.is_main()
    folder = RunWriter.open(out, cfg, resume=resume, writes=main)
    if folder.complete:
        return folder.run
    distributed.check_batch(cfg["data"]["batch_size"])
    distributed.barrier()  # every rank has looked at the folder before rank 0 writes to it
    data = data_mod.build(cfg["data"], device)
    spec = model_spec(cfg, data)
    if teacher is not None:
        teacher.prepare(data, cache=cache_settings(cfg, data), quiet=quiet or not main)
    torch.manual_seed(cfg["seed"])
    model = from_spec(spec).to(device)
    optimizer = make_optimizer(cfg, model)
    net = distributed.wrap(model, device)  # what the step calls; `model` is what is evaluated and saved
    progress = folder.begin(new_manifest(cfg, kind, spec, data, device, teacher), model, optimizer)
    log = RunLog(cfg, folder.path, quiet=quiet or not main, writes=main)
    log.started(progress.history if folder.resumable else None)
    objective, steps = Objective(cfg["kd"], teacher), data.steps_per_epoch(cfg["data"]["batch_size"])
    saved_at, tested_at = checkpoint_epochs(cfg), test_epochs(cfg)
    try:
        for epoch in range(progress.epoch + 1, cfg["schedule"]["epochs"] + 1):
            started = time.perf_counter()
            batches = data.train_batches(seed=cfg["seed"], epoch=epoch, batch_size=cfg["data"]["batch_size"],
                                         rank=distributed.rank(), world_size=distributed.world_size(),
                                         view_bank=objective.view_bank)
            bar, on_step = log.bar(batches, epoch, steps)
            trained = train_epoch(net, optimizer, objective, bar, cfg=cfg, steps_per_epoch=steps, progress=progress,
                                  on_step=on_step)
            record = {"epoch": epoch, "step": progress.step, **trained}
            if main:
                health.check_finite(record, last_good=progress.epoch)
                record.update(evaluate_epoch(model, data, cfg, epoch, progress, test=epoch in tested_at))
                record["time_s"] = time.perf_counter() - started
                progress.elapsed_s += record["time_s"]
                verdict = health.assess(progress.history + [record])
                entry = folder.end_epoch(record, model, optimizer, progress, checkpoint=epoch in saved_at,
                                         health=verdict)
                log.epoch(record, entry, verdict)
            else:
                progress.epoch = epoch
            if on_epoch is not None:
                on_epoch(record)
    except BaseException as error:
        if main:
            stopped(folder, progress, error)
        log.close()
        raise
    if main:
        final = final_numbers(progress, cfg["eval"]["last_k"])
        folder.finish(progress, final)
        log.finished(dataclasses.asdict(final))  # the trackers get the final numbers, then close
    log.close()
    distributed.barrier()  # the other ranks return once rank 0 has written the finished run
    return folder.run


def stopped(folder: RunWriter, progress: Progress, error: BaseException) -> None:
    """Mark a run that stopped early as failed (`fit` and `group.fit_group`); a full disk becomes the one-line
    error it is, saying what is still safe."""
    reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    try:
        folder.fail(progress, reason)
    except OSError:
        pass  # the disk that stopped the run may not take the manifest either; the previous one stays in place
    if is_disk_full(error):
        kept = f"epoch {progress.epoch}" if progress.epoch else "nothing yet"
        raise UserError(f"the disk is full ({error.filename or folder.path}): the run stopped; its last saved state "
                        f"({kept}) and manifest are intact. Free space and continue with --resume") from error


def evaluate_epoch(model, data: data_mod.Data, cfg: dict, epoch: int, progress: Progress, *, test: bool) -> dict:
    """Validation every epoch (it drives every choice), test only where it is reported: checkpoints, the last k."""
    batch = cfg["data"]["eval_batch_size"]
    val = evaluate(model, data, "val", batch)
    if val["acc"] > progress.best_val_acc:
        progress.best_val_acc, progress.best_val_epoch = val["acc"], epoch
    measured = {"val_loss": val["loss"], "val_acc": val["acc"]}
    if test:
        measured["test_acc"] = evaluate(model, data, "test", batch)["acc"]
    return measured


def final_numbers(progress: Progress, last_k: int) -> Final:
    last = progress.history[-1]
    tail = [h["test_acc"] for h in progress.history[-last_k:]]  # every one of the last k epochs was tested
    return Final(epoch=last["epoch"], train_acc=last["train_acc"], val_acc=last["val_acc"], test_acc=last["test_acc"],
                 best_val_acc=progress.best_val_acc, best_val_epoch=progress.best_val_epoch,
                 train_time_s=round(progress.elapsed_s, 3), test_acc_last_k=statistics.mean(tail), last_k=len(tail))


def new_manifest(cfg: dict, kind: str, spec: dict, data: data_mod.Data, device: torch.device, teacher) -> Manifest:
    return Manifest(
        kind=kind, name=cfg["name"], model=spec, data=data.describe(), seed=cfg["seed"],
        epochs=cfg["schedule"]["epochs"], steps_per_epoch=data.steps_per_epoch(cfg["data"]["batch_size"]),
        teachers=teacher.describe() if teacher is not None else [],
        teacher_ensemble=teacher.summary() if teacher is not None else None,
        allow_incomplete=bool(teacher is not None and teacher.allow_incomplete),
        device=str(device), precision=cfg["precision"], torch=torch.__version__,
        threads=torch.get_num_threads(),  # CPU results are bit-identical only at the same thread count
        distributed=distributed.describe())


def default_out(cfg: dict) -> Path:
    return Path("runs") / cfg["name"]


def train(config: str | Path | dict, overrides: dict | list | None = None, out: str | Path | None = None, *,
          resume: bool = False, quiet: bool = False, on_epoch: Callable[[dict], None] | None = None) -> Run:
    """Train a model and keep its trajectory. `config` is a YAML path or dict; `overrides` maps dotted keys to values."""
    cfg = config_mod.resolve(config, overrides)
    if cfg["kd"]["teachers"]:
        raise UserError("config: kd.teachers is set; use `ckptkd distill` to train a student")
    return fit(cfg, out if out is not None else default_out(cfg), resume=resume, quiet=quiet, on_epoch=on_epoch)


def make_teacher(cfg: dict, *, quiet: bool = False, allow_incomplete: bool = False):
    """The frozen teacher a resolved config names in kd.teachers (None when it names none)."""
    from .teachers import Teacher

    kd = cfg["kd"]
    if not kd["teachers"]:
        return None
    # Teachers compute at the run's precision unless kd.autocast says otherwise.
    autocast = kd["autocast"] if kd["autocast"] != "auto" else {"fp32": "none", "bf16": "bf16"}[cfg["precision"]]
    return Teacher.from_references(kd["teachers"], quiet=quiet, channels_last=kd["channels_last"], autocast=autocast,
                                   allow_incomplete=allow_incomplete, mode=kd["teacher_mode"])


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
    return fit(cfg, out if out is not None else default_out(cfg), resume=resume, kind="distill",
               teacher=teacher, quiet=quiet, on_epoch=on_epoch)


def distill_fused(config: str | Path | dict, teachers: list[str | list[str] | None], seeds: list[int] | None = None,
                  overrides: dict | list | None = None, out: str | Path | None = None, *, resume: bool = False,
                  quiet: bool = False, allow_incomplete: bool = False, group_size: int = 8,
                  engine: str = "auto") -> list[Run]:
    """Distill one student per (teacher, seed), trained together in groups of at most `group_size` (`ckptkd.group`),
    as even as possible.

    Each entry of `teachers` is one student's teachers: a reference (`RUN@0.5`, `RUN@0.3,0.5,0.7`), several joined
    by `+` or given as a list (a full ensemble), or None / "none" for the CE-only baseline. Student (t, s) is written
    to OUT/<teacher>-s<seed>, an ordinary run folder; `seeds` defaults to the config's seed."""
    from .group import Member, fit_group

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
    for references, slug in zip(entries, slugs):  # one teacher per entry, shared by its seeds' students
        cfg = copy.deepcopy(base)
        cfg["kd"]["teachers"] = references
        teacher = make_teacher(cfg, quiet=quiet, allow_incomplete=allow_incomplete)
        for seed in seeds:
            member_cfg = copy.deepcopy(cfg)
            member_cfg["seed"] = seed
            members.append(Member(member_cfg, root / f"{slug}-s{seed}", teacher, "distill"))
    runs: list[Run] = []
    failed: list[tuple[Member, Exception]] = []
    count = -(-len(members) // group_size)  # as few groups as group_size allows, as even as possible: 9 -> 4 + 5
    for k in range(count):
        group = members[k * len(members) // count:(k + 1) * len(members) // count]
        for member, outcome in zip(group, fit_group(group, resume=resume, quiet=quiet, engine=engine)):
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
    def slug(references: list[str], depth: int) -> str:
        if not references:
            return "none"
        parts = []
        for r in references:
            folder, selector = split_reference(r)  # the selector as given: none if the reference names none
            given = f"@{selector}" if r != str(folder) and r.endswith(f"@{selector}") else ""
            parts.append("-".join(Path(os.path.abspath(folder)).parts[-depth:]) + given)
        return "".join(c if c.isalnum() or c in "._-+@=," else "-" for c in "+".join(parts))

    depths = [1] * len(entries)
    while True:
        slugs = [slug(refs, d) for refs, d in zip(entries, depths)]
        clashing = [i for i, s in enumerate(slugs) if slugs.count(s) > 1]
        deeper = [i for i in clashing if slug(entries[i], depths[i] + 1) != slugs[i]]
        if not deeper:  # distinct at every depth, or as deep as their paths go
            return slugs
        for i in deeper:
            depths[i] += 1
