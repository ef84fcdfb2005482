"""The training loop: one for teachers and students, single runs and groups (a single run is a group of one).

`fit(members)` trains N runs of one architecture together, each written as an ordinary run folder through its own
`RunWriter`. Each run's weights, optimizer state, BatchNorm statistics, seed, batch order, augmentation and teacher
targets stay its own; what they share is the loop, one batch gather, and the engine (`engines`) that computes the
step for all of them: the run's own model for a group of one, the models one after another, or one fused model. An
epoch is, for every engine:

  1. each run's epoch plan (order and augmentation from (seed, epoch) alone), one stacked batch per step
  2. steps at the schedule's learning rate, with the batch-weighted sums of loss, accuracy and named terms
  3. validation every epoch, test where it is reported, every run in one pass
  4. per run, the end-of-epoch sequence (`_Group.end_epoch`): non-finite loss check, best validation, health, the
     checkpoint and resume state and manifest, the log and trackers
and after the last epoch, each run's final numbers.

Under torchrun (a group of one only) every rank runs the loop on its slice of each global batch; rank 0 alone
evaluates and writes (see `distributed`).

Resume: each run resumes from its own folder. A kill between two runs' writes can leave some an epoch ahead of the
others; the group then trains from the earliest epoch and holds the runs that are ahead: they compute with the group
(its size is what it always was, so the others' arithmetic is unchanged) but their state is put back after the
epoch, until the group reaches them. So a resumed group ends bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .. import config as config_mod
from .. import memory
from .. import data as data_mod
from ..errors import UserError
from ..models import from_spec
from ..run import Final, Manifest, Progress, Run, RunWriter
from ..run.storage import is_disk_full
from . import distributed, health
from .ema import WeightAverage
from .engines import ENGINES, MEMORY_SHARE, available_bytes, choose_engine, split_for_memory, step_bytes
from .objective import TERMS, Objective
from .recipe import autocast_dtype, cache_settings, make_optimizer, model_spec, pick_device, step_batch, test_epochs
from .schedules import checkpoint_epochs, lr_at
from .tracking import RunLog

# Config sections that may differ between the members of a group: each member's seed, name, teachers and KD
# settings, and where it logs. Everything else (model, data, optimizer, schedule, checkpoints, evaluation, device,
# precision) is the group's.
MEMBER_KEYS = ("name", "seed", "kd", "log")


@dataclass
class Member:
    """One run of a group: its resolved config, its folder and its teacher (None: trained on the labels alone)."""
    cfg: dict
    out: Path
    teacher: object | None = None
    kind: str = "train"


def group_key(cfg: dict) -> str:
    """Runs whose configs agree outside `MEMBER_KEYS` can train as one group."""
    shared = {k: v for k, v in config_mod.identity(cfg).items() if k not in MEMBER_KEYS}
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


def check_group(members: list[Member]) -> None:
    if not members:
        raise UserError("a fused group needs at least one run")
    first = config_mod.flatten({k: v for k, v in members[0].cfg.items() if k not in MEMBER_KEYS})
    for m in members[1:]:
        other = config_mod.flatten({k: v for k, v in m.cfg.items() if k not in MEMBER_KEYS})
        differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differ:
            raise UserError(f"cannot train {m.out} in one group with {members[0].out}: their configs differ in "
                            f"{', '.join(differ[:4])} (only {', '.join(MEMBER_KEYS)} may differ)")
    outs = [str(Path(m.out).resolve()) for m in members]
    if len(set(outs)) != len(outs):
        raise UserError("a fused group names one run folder twice")


@dataclass
class _Training:
    """A member while it trains: its folder, its own model and optimizer (what its folder saves and resumes), its
    progress, its log, and in the end its outcome (its Run, or the error that stopped it alone)."""
    member: Member
    folder: RunWriter
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    progress: Progress | None = None
    log: RunLog | None = None
    outcome: Run | Exception | None = None
    ema_state: dict | None = None  # optim.ema: the averaged weights as last saved (None: start from the weights)


def fit(members: list[Member], *, resume: bool = False, quiet: bool = False, engine: str = "auto",
        on_epoch: Callable[[dict], None] | None = None,
        announce: Callable[[str], None] | None = None) -> list[Run | Exception]:
    """Train `members` together; returns each member's Run, or the error that stopped it alone (`health.Diverged`:
    that member is marked failed and the others go on). An interrupt or any other error stops the whole group, every
    unfinished member's folder marked interrupted or failed. Each member's folder is locked while this runs (one
    writer per run folder: another live process's folder is refused, naming it). `on_epoch({"epoch": N})` is called
    after each epoch's files are written (a study uses it as a heartbeat). A group of more than one says which
    engine it runs and why, in one line (to `announce` when given, else to the terminal unless `quiet`); a group of
    one with `engine="auto"` is an ordinary run, with no `fused` entry in its manifest."""
    check_group(members)
    cfg = members[0].cfg
    alone = len(members) == 1 and engine == "auto"
    if distributed.launched() and not alone:
        raise UserError("fused groups do not run under torchrun; train them in one process (or use fuse: off)")
    device = distributed.setup(pick_device(cfg["device"]))
    main = distributed.is_main()
    folders: list[RunWriter] = []
    try:
        for m in members:  # each takes its folder's lock: one writer per run folder
            folders.append(RunWriter.open(m.out, m.cfg, resume=resume, writes=main))
        with deterministic_algorithms(cfg["deterministic"]):
            outcomes = _train(members, folders, alone=alone, engine=engine, device=device, main=main, quiet=quiet,
                              on_epoch=on_epoch, announce=announce)
    finally:
        for folder in folders:
            folder.close()
    distributed.barrier()  # the other ranks return once rank 0 has written the finished runs
    return outcomes


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """`deterministic: true`: PyTorch's deterministic kernels only (an operation without one raises, naming it),
    cuDNN without autotuning, cuBLAS with a fixed workspace, for the run's duration; the process' settings are
    restored after. On a CPU ckptkd is bit-identical without it; on a GPU this is what makes a rerun repeat."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _train(members: list[Member], folders: list[RunWriter], *, alone: bool, engine: str, device: torch.device,
           main: bool, quiet: bool, on_epoch, announce) -> list[Run | Exception]:
    """`fit` once the folders are open: every member not complete yet trained, each outcome in member order."""
    cfg = members[0].cfg
    todo = [(m, f) for m, f in zip(members, folders) if not f.complete]
    if not todo:
        return [f.run for f in folders]
    distributed.check_batch(step_batch(cfg))
    distributed.barrier()  # every rank has looked at the folders before rank 0 writes to them
    data = data_mod.build(cfg["data"], device)
    spec = model_spec(cfg, data)
    _prepare_teachers([m for m, _ in todo], data, quiet=quiet or not main)
    runs = [_Training(m, f, *_initial_model(m.cfg, spec, device)) for m, f in todo]
    say = announce or (lambda message: None if quiet else print(message, file=sys.stderr, flush=True))
    chosen, why, groups = ("direct", "", [runs]) if alone else _engine_and_groups(runs, spec, engine, device, say)
    for group in groups:
        for position, run in enumerate(group):
            fused = None if alone else {"engine": chosen, "members": len(group), "index": position,
                                        "group": [str(r.folder.path) for r in group]}
            _begin(run, new_manifest(run.member.cfg, run.member.kind, spec, data, device, run.member.teacher),
                   fused, quiet=quiet or not main, main=main)
    try:
        for group in groups:
            if not alone:
                say(f"training {len(group)} runs as one group ({chosen}: {why})")
            _Group(group, data=data, engine=chosen, device=device, main=main).run(on_epoch)
    except BaseException as error:
        _stopped([run for run in runs if run.outcome is None], error, main)  # later groups' runs too
        raise
    outcomes = iter(run.outcome for run in runs)
    return [f.run if f.complete else next(outcomes) for f in folders]


def fit_one(member: Member, *, resume: bool = False, quiet: bool = False,
            on_epoch: Callable[[dict], None] | None = None) -> Run:
    """One run (`fit` of a group of one); a run that diverges raises its `health.Diverged`."""
    [outcome] = fit([member], resume=resume, quiet=quiet, on_epoch=on_epoch)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _initial_model(cfg: dict, spec: dict, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The run's model as its seed initialises it, and its optimizer."""
    torch.manual_seed(cfg["seed"])
    model = from_spec(spec).to(device)
    return model, make_optimizer(cfg, model)


def _engine_and_groups(runs: list[_Training], spec: dict, requested: str, device: torch.device,
                       say: Callable[[str], None]) -> tuple[str, str, list[list[_Training]]]:
    """The engine (and why), and the runs in groups that fit in memory (one group unless they do not)."""
    chosen, why = choose_engine(runs[0].model, spec, device, requested, runs[0].member.cfg["precision"])
    batch_size = runs[0].member.cfg["data"]["batch_size"]
    per_member = step_bytes(runs[0].model, spec, batch_size, device)
    groups = split_for_memory(runs, per_member, available_bytes(device))
    if len(groups) > 1:
        say(f"a group of {len(runs)} runs needs about {len(runs) * per_member / 2**20:.0f} MiB, more than "
            f"{MEMORY_SHARE:.0%} of the memory free here: training it as {len(groups)} groups of up to "
            f"{len(groups[0])}")
    return chosen, why, groups


def _begin(run: _Training, manifest: Manifest, fused: dict | None, *, quiet: bool, main: bool) -> None:
    """Restore the run's resume state (or start it fresh), write its first views, open its log."""
    manifest.fused = fused
    run.progress = run.folder.restore(run.model, run.optimizer)
    if run.member.cfg["optim"]["ema"]:
        run.ema_state = run.folder.restore_ema()
    manifest.health = health.assess(run.progress.history)  # a resumed run's verdict so far
    run.folder.begin(manifest, run.progress)
    run.log = RunLog(run.member.cfg, run.folder.path, quiet=quiet, writes=main)
    run.log.started(run.progress.history if run.folder.resumable else None)


def _stopped(runs: list[_Training], error: BaseException, main: bool) -> None:
    """Mark runs that stopped early as failed (rank 0); a full disk becomes the one-line error it is, saying what is
    still safe."""
    full = None
    for run in runs:
        if run.log is not None:
            run.log.close()
        if main and run.progress is not None:
            try:
                stopped(run.folder, run.progress, error)
            except UserError as disk_full:
                full = disk_full
    if full is not None:
        raise full from error


def _prepare_teachers(members: list[Member], data: data_mod.Data, *, quiet: bool) -> None:
    """Each teacher once, with its cache; members that share a teacher object must cache it alike. Under torchrun
    rank 0 builds the cache files while the other ranks wait, then they read them."""
    prepared: dict[int, dict | None] = {}
    for m in members:
        if m.teacher is None:
            continue
        cache = cache_settings(m.cfg, data) if m.teacher.cacheable else None
        if id(m.teacher) in prepared:
            if prepared[id(m.teacher)] != cache:
                raise ValueError(f"{m.out} shares a teacher object with another member but caches it otherwise "
                                 f"({cache} against {prepared[id(m.teacher)]}): give it a teacher of its own")
            continue
        prepared[id(m.teacher)] = cache
        m.teacher.prepare(data, quiet=quiet)
        if cache is not None:
            if distributed.is_main():
                m.teacher.attach_cache(data, **cache)
            distributed.barrier()
            if not distributed.is_main():
                m.teacher.attach_cache(data, **cache)


class _Group:
    """The runs of a group that train together, and the engine that trains those still going (a run that diverges
    leaves the group; the engine is rebuilt without it)."""

    def __init__(self, runs: list[_Training], *, data: data_mod.Data, engine: str, device: torch.device,
                 main: bool):
        self.runs, self.going, self.data = runs, list(runs), data
        self.chosen, self.device, self.main = engine, device, main
        self.cfg = runs[0].member.cfg
        self.saved_at, self.tested_at = set(checkpoint_epochs(self.cfg)), test_epochs(self.cfg)

    def build(self) -> None:
        going = self.going
        self.objective = Objective([r.member.teacher for r in going], [r.member.cfg["kd"] for r in going],
                                   self.data.num_classes, self.device)
        self.engine = ENGINES[self.chosen]([r.model for r in going], [r.optimizer for r in going], self.cfg,
                                           self.objective, self.device,
                                           loss_scales=[r.progress.loss_scale for r in going])
        decay = self.cfg["optim"]["ema"]
        self.ema = WeightAverage(self.engine, decay, going, [r.ema_state for r in going]) if decay else None

    def ema_states(self) -> list[dict]:
        """Each member's averaged weights, as its own model's state dict (exported under the averaged weights)."""
        states = []
        with self.ema.swapped():
            for j, run in enumerate(self.going):
                self.engine.export(j, run.model, run.optimizer)
                states.append({k: v.clone() for k, v in run.model.state_dict().items()})
        for j, run in enumerate(self.going):  # the members' own weights back in their models
            self.engine.export(j, run.model, run.optimizer)
        return states

    def run(self, on_epoch) -> None:
        epochs = self.cfg["schedule"]["epochs"]
        self.build()
        while self.going and min(r.progress.epoch for r in self.going) < epochs:
            epoch = min(r.progress.epoch for r in self.going) + 1
            diverged = self.epoch(epoch)
            if on_epoch is not None:
                on_epoch({"epoch": epoch})
            if diverged:  # they leave the group; the others go on in a group without them
                if self.ema is not None:
                    for run, state in zip(self.going, self.ema_states()):
                        run.ema_state = state
                for j, run in enumerate(self.going):
                    if run not in diverged:
                        self.engine.export(j, run.model, run.optimizer)
                self.going = [r for r in self.going if r not in diverged]
                if self.going:
                    self.build()
        for run in self.going:
            if self.main:
                final = final_numbers(run.progress, **self.cfg["eval"])
                run.outcome = run.folder.finish(run.progress, final)
                run.log.finished(dataclasses.asdict(final))  # the trackers get the final numbers, then close
            else:
                run.outcome = run.folder.run
                run.log.close()

    def epoch(self, epoch: int) -> list[_Training]:
        """Train, evaluate and record one epoch of every run going; returns the runs that diverged in it. Runs ahead
        of `epoch` (a kill between two runs' writes) compute with the group but keep their state: they hold."""
        cfg, going = self.cfg, self.going
        trains = [r.progress.epoch < epoch for r in going]
        started = time.perf_counter()
        batch_size = step_batch(cfg)  # one optimizer step's batch, computed in optim.accumulate pieces
        steps = self.data.steps_per_epoch(batch_size)
        batches = epoch_batches(self.data, self.objective, [r.member.cfg["seed"] for r in going], epoch, batch_size)
        bar, on_step = going[0].log.bar(batches, epoch, steps)
        sums, lr, step = train_epoch(self.engine, bar, cfg=cfg, steps_per_epoch=steps,
                                     start_step=going[trains.index(True)].progress.step, on_step=on_step,
                                     after_step=None if self.ema is None else self.ema.update)
        val = test = None
        averaged = [None] * len(going)
        if self.main:
            self.engine.train(False)
            val, test = self.evaluate(epoch)
            if self.ema is not None:
                with self.ema.swapped():
                    ema_val, ema_test = self.evaluate(epoch)
                averaged = [{"val": ema_val[j], "test": None if ema_test is None else ema_test[j], "state": state}
                            for j, state in enumerate(self.ema_states())]
        elapsed = (time.perf_counter() - started) / sum(trains)  # the group's time, shared by its trained runs
        diverged = []
        for j, run in enumerate(going):
            if not trains[j]:
                self.engine.restore(j, run.model, run.optimizer)
                continue
            if averaged[j] is not None:
                run.ema_state = averaged[j]["state"]
            means = (sums[j, :-1] / sums[j, -1]).tolist()  # batch-weighted: loss, accuracy, each term
            record = {"epoch": epoch, "step": step, "lr": lr, "train_loss": means[0], "train_acc": means[1],
                      **{f"train_{t}": means[2 + k] for k, t in enumerate(TERMS) if t in self.objective.names[j]}}
            try:
                self.end_epoch(j, run, record, None if val is None else val[j], None if test is None else test[j],
                               elapsed, averaged[j])
            except health.Diverged as error:
                run.outcome = error
                diverged.append(run)
        if self.ema is not None and not all(trains):  # a held member's average goes back to what it saved
            self.ema = WeightAverage(self.engine, cfg["optim"]["ema"], going, [r.ema_state for r in going])
        return diverged

    def evaluate(self, epoch: int) -> tuple[list[dict], list[dict] | None]:
        """Every member on the validation split, and on the test split where `epoch` is tested."""
        size, members = self.cfg["data"]["eval_batch_size"], len(self.going)
        val = evaluate(self.engine.logits, self.data, "val", size, members)
        test = evaluate(self.engine.logits, self.data, "test", size, members) if epoch in self.tested_at else None
        return val, test

    def end_epoch(self, j: int, run: _Training, record: dict, val: dict | None, test: dict | None,
                  elapsed: float, averaged: dict | None = None) -> None:
        """Run j's epoch, once trained: the one place a run's epoch is judged and recorded (non-finite loss, best
        validation, health, checkpoint and resume state and manifest, log and trackers)."""
        progress, folder = run.progress, run.folder
        try:
            health.check_finite(record, last_good=progress.epoch)
        except health.Diverged as error:
            if self.main:
                folder.fail(progress, str(error), health=health.assess(progress.history + [record]))
                if len(self.runs) > 1:  # a run alone raises it to its caller, which says it
                    run.log.say(f"{folder.path}: {error}")
            run.log.close()
            raise
        if not self.main:  # other ranks only keep count
            progress.epoch, progress.step = record["epoch"], record["step"]
            return
        if val["acc"] > progress.best_val_acc:
            progress.best_val_acc, progress.best_val_epoch = val["acc"], record["epoch"]
        record.update(val_loss=val["loss"], val_acc=val["acc"], **top5("val", val))
        if test is not None:
            record.update(test_acc=test["acc"], **top5("test", test))
        if averaged is not None:  # optim.ema: the averaged weights' numbers beside the weights' own
            record.update(ema_val_loss=averaged["val"]["loss"], ema_val_acc=averaged["val"]["acc"],
                          **{f"ema_{k}": v for k, v in top5("val", averaged["val"]).items()})
            if averaged["test"] is not None:
                record.update(ema_test_acc=averaged["test"]["acc"],
                              **{f"ema_{k}": v for k, v in top5("test", averaged["test"]).items()})
        record["time_s"] = elapsed
        progress.elapsed_s += elapsed
        progress.step = record["step"]
        verdict = health.assess(progress.history + [record])
        self.engine.export(j, run.model, run.optimizer)
        progress.loss_scale = self.engine.loss_scale(j)
        entry = folder.end_epoch(record, run.model, run.optimizer, progress,
                                 checkpoint=record["epoch"] in self.saved_at, health=verdict,
                                 ema=None if averaged is None else averaged["state"])
        run.log.epoch(record, entry, verdict)


TOP_K = 5


def epoch_batches(data: data_mod.Data, objective: Objective, seeds: list[int], epoch: int,
                  batch_size: int) -> Iterator[data_mod.Batch]:
    """The epoch's batches of every member, stacked [N, B, ...]: each member's order and augmentation drawn from
    (its seed, epoch) alone, so resuming at an epoch boundary replays exactly; under torchrun this rank's slice."""
    plans = [data.epoch_plan(seed=seed, epoch=epoch, view_bank=objective.view_bank(j)) for j, seed in enumerate(seeds)]
    objective.begin_epoch(plans)
    return data.group_batches(plans, batch_size, rank=distributed.rank(), world_size=distributed.world_size())


def train_epoch(engine, batches: Iterable[data_mod.Batch], *, cfg: dict, steps_per_epoch: int, start_step: int,
                on_step: Callable[[torch.Tensor, float], None] | None = None,
                after_step: Callable[[], None] | None = None) -> tuple[torch.Tensor, float, int]:
    """Steps over `batches` at the schedule's per-step learning rate (`start_step` the first step's global index).
    Returns per-member sums [N, 2 + len(TERMS) + 1]
    (loss, correct, each term, each times the batch size; the last column the count), summed over every rank, the
    lr of the last step and the step count after the epoch."""
    precision = autocast_dtype(cfg)
    engine.train(True)
    sums, lr, step = None, cfg["optim"]["lr"], start_step
    for batch in batches:
        lr = lr_at(cfg["schedule"], cfg["optim"]["lr"], step, steps_per_epoch)
        logits, losses, terms = engine.step(batch, lr, precision, cfg["optim"]["accumulate"])
        if after_step is not None:  # optim.ema's update
            after_step()
        step += 1
        with torch.no_grad():  # kept on the device: reading a value here would make a GPU wait every step
            b = batch.y.shape[1]
            values = torch.stack([losses.double() * b, (logits.argmax(-1) == batch.y).sum(1).double(),
                                  *(terms[t].double() * b for t in TERMS),
                                  torch.full_like(losses, b, dtype=torch.float64)], dim=1)
        sums = values if sums is None else sums + values
        if on_step is not None:
            on_step(losses.sum(), lr)
    return distributed.all_sum(sums), lr, step


@torch.inference_mode()
def evaluate(logits_of: Callable[[torch.Tensor], torch.Tensor], data: data_mod.Data, split: str, batch_size: int,
             members: int = 1) -> list[dict[str, float]]:
    """Loss, accuracy and top-5 accuracy of every member on one split, in one pass: `logits_of(x)` -> [members, B,
    C], with the models already in eval mode. Top-5 is None with 5 classes or fewer, where it is always 1."""
    device = data.device
    loss_sum = torch.zeros(members, dtype=torch.float64, device=device)
    correct = torch.zeros(members, dtype=torch.int64, device=device)
    in_top5 = torch.zeros(members, dtype=torch.int64, device=device)
    count = 0
    for x, y in data.eval_batches(split, batch_size):
        logits = logits_of(x)
        for i in range(members):
            loss_sum[i] += F.cross_entropy(logits[i].float(), y, reduction="sum").double()
        correct += (logits.argmax(-1) == y).sum(1)
        if data.num_classes > TOP_K:
            in_top5 += (logits.topk(TOP_K, dim=-1).indices == y[:, None]).any(-1).sum(1)
        count += len(y)
    top5 = (lambda i: float(in_top5[i]) / count) if data.num_classes > TOP_K else (lambda i: None)
    return [{"loss": float(loss_sum[i]) / count, "acc": float(correct[i]) / count, "top5": top5(i)}
            for i in range(members)]


def stopped(folder: RunWriter, progress: Progress, error: BaseException) -> None:
    """Mark a run that stopped early: interrupted (Ctrl-C, or a signal that asks a process to stop: `--resume`
    continues it), else failed; a full disk becomes the one-line error it is, saying what is still safe."""
    try:
        if isinstance(error, KeyboardInterrupt):
            folder.interrupt(progress, f"interrupted by {error}" if str(error) else "interrupted")
        else:
            folder.fail(progress, f"{type(error).__name__}: {error}")
    except OSError:
        pass  # the disk that stopped the run may not take the manifest either; the previous one stays in place
    kept = f"epoch {progress.epoch}" if progress.epoch else "nothing yet"
    if is_disk_full(error):
        raise UserError(f"the disk is full ({error.filename or folder.path}): the run stopped; its last saved state "
                        f"({kept}) and manifest are intact. Free space and continue with --resume") from error
    if memory.is_out_of_memory(error):
        said = " ".join(str(error).split())[:160] or type(error).__name__
        raise UserError(f"out of memory training {folder.path} ({said}): the run stopped and is marked failed "
                        f"(saved: {kept}); train it again with a smaller data.batch_size or data.eval_batch_size, "
                        "or a smaller model") from error


def top5(split: str, measured: dict) -> dict:
    """A record's top-5 key for a split, left out where top-5 says nothing (5 classes or fewer)."""
    return {} if measured["top5"] is None else {f"{split}_top5": measured["top5"]}


def final_numbers(progress: Progress, last_k: int, best_of_last: int = 0) -> Final:
    last = progress.history[-1]
    paper = [h["test_acc"] for h in progress.history[-best_of_last:]] if best_of_last else []
    tail = progress.history[-last_k:]  # every one of the last k epochs was tested
    top5_tail = [h.get("test_top5") for h in tail]
    return Final(epoch=last["epoch"], train_acc=last["train_acc"], val_acc=last["val_acc"], test_acc=last["test_acc"],
                 best_val_acc=progress.best_val_acc, best_val_epoch=progress.best_val_epoch,
                 train_time_s=round(progress.elapsed_s, 3), test_acc_last_k=statistics.mean(h["test_acc"] for h in tail),
                 last_k=len(tail), test_top5=last.get("test_top5"),
                 # None unless every epoch of the tail has it (a run resumed from a version before top-5 does not)
                 test_top5_last_k=None if None in top5_tail else statistics.mean(top5_tail),
                 test_acc_best_of_last=max(paper) if paper else None, best_of_last=len(paper) or None)


def new_manifest(cfg: dict, kind: str, spec: dict, data: data_mod.Data, device: torch.device, teacher) -> Manifest:
    return Manifest(
        kind=kind, name=cfg["name"], model=spec, data=data.describe(), seed=cfg["seed"],
        epochs=cfg["schedule"]["epochs"], steps_per_epoch=data.steps_per_epoch(step_batch(cfg)),
        teachers=teacher.describe() if teacher is not None else [],
        teacher_ensemble=teacher.summary() if teacher is not None else None,
        allow_incomplete=bool(teacher is not None and teacher.allow_incomplete),
        device=str(device), precision=cfg["precision"], torch=torch.__version__,
        threads=torch.get_num_threads(),  # CPU results are bit-identical only at the same thread count
        distributed=distributed.describe())
