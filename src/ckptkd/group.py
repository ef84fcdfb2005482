"""Train a group of runs of one architecture together: many students (or teachers) at the cost of a few.

A study's students differ only in their seed and their teachers; small ones are overhead-bound, so training them one
after another wastes most of the machine. `fit_group` trains N such runs in one loop: one batch gather for all N (each
run still sees exactly its own batches), one forward, one loss (`losses.kd_loss_members`), one backward, one
optimizer step, one evaluation pass. Each run's weights, optimizer state, BatchNorm statistics, seed, batch order,
augmentation and teacher targets stay its own, and each is written as an ordinary run folder through its own
`RunWriter`, so the result cannot be told from N runs of `fit` except by the `fused` entry of its manifest.

How the N models compute (`engine`):
  fused    one wide model (`ckptkd.fused`: grouped convolutions, batched matmuls, BatchNorm over N x C channels)
           with one optimizer over its stacked parameters: every op's fixed cost is paid once for N.
  looped   the N models one after another inside the shared loop: for a model too large to gain from fusion
           (on a CPU, grouped convolutions of wide layers are slower than separate ones: `choose_engine`; such a
           convolutional model runs channels-last, which is faster there), or one the rewrite cannot fuse.
Either way the engine works on its own copy of the members; `export`/`restore` move a member's state between it and
the ordinary (model, optimizer) pair its run folder saves and resumes from.

Resume: each member resumes from its own folder. A kill between members' writes can leave some members an epoch
ahead of the others; the group then trains from the earliest epoch and holds the members that are ahead: they
compute with the group (the group's size is what it always was, so the others' arithmetic is unchanged) but their
state is put back after the epoch, until the group reaches them. So a resumed group ends bit-identical to an
uninterrupted one on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import config as config_mod
from . import data as data_mod
from . import distributed, health
from .engine import (cache_settings, checkpoint_epochs, forward, make_optimizer, model_spec, pick_device,
                     test_epochs)
from .errors import UserError
from .losses import kd_loss_members, soft_targets
from .models import from_spec
from .run import Run, RunWriter
from .schedules import lr_at
from .tracking import RunLog
from .trainer import final_numbers, fit, new_manifest, stopped

# Config sections that may differ between the members of a group: each member's seed, name, teachers and KD
# settings, and where it logs. Everything else (model, data, optimizer, schedule, checkpoints, evaluation, device,
# precision) is the group's.
MEMBER_KEYS = ("name", "seed", "kd", "log")

# On a CPU, fusion pays when a model is overhead-bound: below this many forward FLOPs per image. Measured with
# benchmarks/fused_probe.py on 2 cores (N = 8): fused / one-after-another 1.4-2.3x for models of 0.1-2 MFLOPs
# (the Fashion and digits students, resnet8 on 8x8, lenet5), 0.7x for resnet8 on 32x32 (25 MFLOPs) and 0.4x for
# resnet20 on 32x32 (82 MFLOPs), where grouped convolutions of 16-64 channels are slower than separate ones.
CPU_FUSE_MAX_FLOPS = 10e6


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


def forward_costs(model: torch.nn.Module, spec: dict, device: torch.device) -> tuple[float, float]:
    """(forward FLOPs, activation bytes) per image, measured on a batch of 2 in eval mode (nothing of the model
    changes): the FLOPs decide the engine, the activations (every module's output) how many members fit."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(2, spec["in_channels"], *spec["image_size"], device=device)
    outputs = [0]

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            outputs[0] += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() / 2, outputs[0] / 2


def step_bytes(model: torch.nn.Module, spec: dict, batch_size: int, device: torch.device) -> int:
    """About what one member's training step holds: its parameters four times (weights, gradients, optimizer
    state, the engine's copy) and twice the activations of a batch (kept for backward, and their gradients)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(4 * params + 2 * forward_costs(model, spec, device)[1] * batch_size)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# A group may use this share of the memory that is free when it starts.
MEMORY_SHARE = 0.5


def split_for_memory(members: list, per_member: int, free: int) -> list[list]:
    """`members` in groups that fit in MEMORY_SHARE of `free` bytes, or a UserError naming the group's size and
    what one member needs."""
    fits = int(MEMORY_SHARE * free // max(1, per_member))
    if fits < 1:
        raise UserError(f"a group of {len(members)} runs needs about {per_member / 2**20:.0f} MiB per run for a "
                        f"training step, more than the {MEMORY_SHARE * free / 2**20:.0f} MiB a group may use here "
                        "(lower data.batch_size)")
    return [members[i:i + fits] for i in range(0, len(members), fits)]


def choose_engine(model: torch.nn.Module, spec: dict, device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """(an `ENGINES` name, why): fused where the rewrite knows the model and it pays on this device; a compute-bound
    convolutional model loops channels-last on a CPU (resnet20 on 32x32: 1.28x one after another in the default
    layout, `ckptkd bench --workload fused`)."""
    from .fused import fusable

    if requested.startswith("looped"):
        return requested, "asked for"
    ok, why = fusable(model)
    if not ok:
        if requested == "fused":
            raise UserError(f"model '{spec['name']}' cannot be fused: {why}")
        return "looped", f"model '{spec['name']}' cannot be fused ({why}); its runs train one after another"
    if requested == "fused" or device.type != "cpu":
        return "fused", "asked for" if requested == "fused" else f"on {device.type}"
    flops = forward_costs(model, spec, device)[0]
    if flops > CPU_FUSE_MAX_FLOPS:
        convolutional = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        return ("looped-channels-last" if convolutional else "looped"), (
            f"model '{spec['name']}' takes {flops / 1e6:.1f} MFLOPs per image, compute-bound on a CPU (fusion pays "
            f"below {CPU_FUSE_MAX_FLOPS / 1e6:g}); its runs train one after another"
            + (", channels-last" if convolutional else ""))
    return "fused", f"{flops / 1e6:.3g} MFLOPs per image: overhead-bound on a CPU"


# -- engines ---------------------------------------------------------------------------------------------------------


class FusedEngine:
    """The members as one `FusedModel` and one optimizer over its stacked parameters (element-wise optimizers
    only: SGD and AdamW give every member exactly the update its own optimizer would)."""

    def __init__(self, models: list, optimizers: list, cfg: dict, device: torch.device):
        from .fused import fuse

        self.model = fuse(models, channels_last=device.type == "cpu").to(device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.names = dict(self.model.named_parameters())
        for i, (model, optimizer) in enumerate(zip(models, optimizers)):
            self.restore(i, model, optimizer, weights=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def train_step(self, batch, objective, lr: float, autocast_dtype=None):
        """One step of every member: returns (logits [N, B, C], losses [N], terms)."""
        logits = forward(self.model, batch.x, autocast_dtype)
        losses, terms = objective(logits, batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # the sum: each member's parameters get its own loss's gradient
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        return logits, losses, terms

    def export(self, i: int, model, optimizer) -> None:
        """Member i's weights and optimizer state into its ordinary model and optimizer."""
        model.load_state_dict(self.model.member(i))
        params = dict(model.named_parameters())
        optimizer.state.clear()
        for name, fused in self.names.items():
            state = self.optimizer.state.get(fused)
            if state:
                optimizer.state[params[name]] = {k: _member_slice(v, fused, i) for k, v in state.items()}
        optimizer.param_groups[0]["lr"] = self.optimizer.param_groups[0]["lr"]

    def restore(self, i: int, model, optimizer, *, weights: bool = True) -> None:
        """Member i's ordinary model and optimizer into the fused ones (where the member has optimizer state)."""
        if weights:
            self.model.load_member(i, model.state_dict())
        n = self.model.num_members
        for name, param in model.named_parameters():
            own = optimizer.state.get(param)
            if not own:
                continue
            fused = self.names[name]
            state = self.optimizer.state.setdefault(fused, {})
            for key, value in own.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    if key not in state:  # members without state yet start from zeros (the first step overwrites)
                        state[key] = torch.zeros((n, *value.shape), dtype=value.dtype, device=fused.device)
                    state[key][i].copy_(value)
                else:
                    state[key] = value.clone() if isinstance(value, torch.Tensor) else value  # e.g. Adam's step


def _member_slice(value, fused: torch.Tensor, i: int):
    if isinstance(value, torch.Tensor) and value.shape == fused.shape:
        return value[i].clone()
    return value.clone() if isinstance(value, torch.Tensor) else value


class LoopedEngine:
    """The members one after another: copies of their models and optimizers, each stepped in turn (forward, loss,
    backward, step), so memory holds one member's activations at a time, as training them apart would. In the
    default layout each member computes exactly as it would alone; `channels_last` runs the copies channels-last,
    faster for wide convolutions on a CPU (another rounding: a group's numbers are its own, as with fusion)."""

    def __init__(self, models: list, optimizers: list, cfg: dict, device: torch.device, channels_last: bool = False):
        self.models = [copy.deepcopy(m) for m in models]
        if channels_last:
            for m in self.models:
                m.to(memory_format=torch.channels_last)
        self.optimizers = [make_optimizer(cfg, m) for m in self.models]
        for i, (model, optimizer) in enumerate(zip(models, optimizers)):
            self.restore(i, model, optimizer)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x[i]) for i, m in enumerate(self.models)])

    def train(self, mode: bool = True) -> None:
        for m in self.models:
            m.train(mode)

    def train_step(self, batch, objective, lr: float, autocast_dtype=None):
        soft, plogp = objective.targets(batch)
        logits, losses, terms = [], [], []
        for i, (model, optimizer) in enumerate(zip(self.models, self.optimizers)):
            out = forward(model, batch.x[i], autocast_dtype)
            loss, term = objective.loss(out[None], batch.y[i:i + 1], soft[i:i + 1], plogp[i:i + 1], slice(i, i + 1))
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            logits.append(out.detach())
            losses.append(loss.detach())
            terms.append(term)
        return (torch.stack(logits), torch.cat(losses),
                {k: torch.cat([t[k].detach() for t in terms]) for k in ("ce", "kd")})

    def export(self, i: int, model, optimizer) -> None:
        model.load_state_dict(self.models[i].state_dict())
        # A copy: load_state_dict keeps the very tensors it is given, which the next steps update in place.
        optimizer.load_state_dict(copy.deepcopy(self.optimizers[i].state_dict()))

    def restore(self, i: int, model, optimizer) -> None:
        self.models[i].load_state_dict(model.state_dict())
        self.optimizers[i].load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not the member's own tensors


ENGINES = {"fused": FusedEngine, "looped": LoopedEngine,
           "looped-channels-last": functools.partial(LoopedEngine, channels_last=True)}


# -- the objective ---------------------------------------------------------------------------------------------------


class GroupObjective:
    """Each member's loss on its own batch: cross-entropy alone, or `kd_loss` under its teacher, for all N at once."""

    def __init__(self, members: list[Member], num_classes: int, device: torch.device):
        self.teachers = [m.teacher for m in members]
        self.num_classes = num_classes
        kds = [m.cfg["kd"] for m in members]
        self.kd_used = [t is not None and kd["alpha"] < 1 for t, kd in zip(self.teachers, kds)]
        self.kds = kds
        self.temperature = torch.tensor([kd["temperature"] for kd in kds], device=device)
        self.alpha = torch.tensor([kd["alpha"] if used else 1.0 for kd, used in zip(kds, self.kd_used)],
                                  device=device)
        # The names each member logs, as `engine.Objective` would: none without a teacher, ce (and kd) with one.
        self.terms = [[] if t is None else ["ce", "kd"] if used else ["ce"]
                      for t, used in zip(self.teachers, self.kd_used)]

    def view_bank(self, i: int) -> torch.Tensor | None:
        return self.teachers[i].view_bank if self.teachers[i] is not None else None

    def begin_epoch(self, plans: list[data_mod.EpochPlan], num_images: int) -> None:
        """Soft targets for the whole epoch from every cached teacher, one row per training image (each image shows
        one view per epoch), so a step's targets are one gather for all N; teachers run online are asked per step."""
        n, c = len(self.teachers), self.num_classes
        device = self.temperature.device
        self.soft = torch.zeros(n, num_images, c, device=device)
        self.plogp = torch.zeros(n, num_images, device=device)
        self.online = []
        for i, used in enumerate(self.kd_used):
            if not used:
                continue
            teacher, plan = self.teachers[i], plans[i]
            if teacher.cache is None or plan.view_ids is None:
                self.online.append(i)
                continue
            logits = teacher.cache[:, torch.arange(num_images, device=teacher.cache.device), plan.view_ids].float()
            self.soft[i], self.plogp[i] = soft_targets(logits, temperature=self.kds[i]["temperature"],
                                                       ensemble=self.kds[i]["ensemble"])

    def targets(self, batch: data_mod.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's soft targets for its batch: (P [N, B, C], plogp [N, B]); zeros for those without KD."""
        index = batch.index
        soft = self.soft.gather(1, index[..., None].expand(-1, -1, self.num_classes))
        plogp = self.plogp.gather(1, index)
        for i in self.online:
            own = data_mod.Batch(batch.x[i], batch.y[i], index[i], batch.views[i],
                                 None if batch.view_ids is None else batch.view_ids[i])
            soft[i], plogp[i] = soft_targets(self.teachers[i].logits(own), temperature=self.kds[i]["temperature"],
                                             ensemble=self.kds[i]["ensemble"])
        return soft, plogp

    def loss(self, logits, y, soft, plogp, members: slice = slice(None)):
        """The losses [n] and terms of the members `members` (logits [n, B, C])."""
        return kd_loss_members(logits, y, soft=soft, plogp=plogp, temperature=self.temperature[members],
                               alpha=self.alpha[members])

    def __call__(self, logits: torch.Tensor, batch: data_mod.Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every member's loss [N] on its own batch, with the terms {"ce": [N], "kd": [N]}."""
        return self.loss(logits, batch.y, *self.targets(batch))


# -- the loop ---------------------------------------------------------------------------------------------------------


def train_group_epoch(engine, objective: GroupObjective, batches, *, cfg: dict, steps_per_epoch: int, step: int,
                      on_step=None) -> tuple[torch.Tensor, float, int]:
    """One epoch of group steps. Returns per-member sums [N, 4] (loss, correct, ce, kd; each times the batch size,
    the last column the count), the lr of the last step and the step count after the epoch."""
    autocast_dtype = torch.bfloat16 if cfg["precision"] == "bf16" else None
    engine.train(True)
    sums, lr = None, cfg["optim"]["lr"]
    for batch in batches:
        lr = lr_at(cfg["schedule"], cfg["optim"]["lr"], step, steps_per_epoch)
        logits, losses, terms = engine.train_step(batch, objective, lr, autocast_dtype)
        step += 1
        with torch.no_grad():
            b = batch.y.shape[1]
            values = torch.stack([losses.detach() * b, (logits.argmax(-1) == batch.y).sum(1).to(losses),
                                  terms["ce"].detach() * b, terms["kd"].detach() * b,
                                  torch.full_like(losses, b)], dim=1).double()
        sums = values if sums is None else sums + values
        if on_step is not None:
            on_step(losses.sum(), lr)
    return sums, lr, step


@torch.inference_mode()
def evaluate_group(engine, data: data_mod.Data, split: str, batch_size: int, n: int) -> list[dict[str, float]]:
    """Every member on the same split (as `engine.evaluate`, one pass for all)."""
    engine.train(False)
    device = data.train_x.device
    loss_sum = torch.zeros(n, dtype=torch.float64, device=device)
    correct = torch.zeros(n, dtype=torch.int64, device=device)
    count = 0
    for x, y in data.eval_batches(split, batch_size):
        logits = engine(x.expand(n, *x.shape)).float()
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(n), reduction="none").view(n, -1).sum(1).double()
        correct += (logits.argmax(-1) == y).sum(1)
        count += len(y)
    return [{"loss": float(loss_sum[i]) / count, "acc": float(correct[i]) / count} for i in range(n)]


def fit_group(members: list[Member], *, resume: bool = False, quiet: bool = False, engine: str = "auto",
              on_epoch: Callable[[dict], None] | None = None,
              announce: Callable[[str], None] | None = None) -> list[Run | Exception]:
    """Train `members` together; returns each member's Run, or the error that stopped it alone (a non-finite
    loss: that member is marked failed and the others go on). An interrupt or any other error stops the whole group,
    every member's folder marked as `fit` marks it. The engine chosen, and why, is said in one line (to `announce`
    when given, else to the terminal unless `quiet`)."""
    check_group(members)
    if len(members) == 1 and engine == "auto":  # a group of one is an ordinary run: no `fused` in its manifest
        return [_fit_alone(members[0], resume=resume, quiet=quiet, on_epoch=on_epoch)]
    cfg = members[0].cfg
    if distributed.launched():
        raise UserError("fused groups do not run under torchrun; train them in one process (or use fuse: off)")
    device = pick_device(cfg["device"])
    folders = [RunWriter.open(m.out, m.cfg, resume=resume) for m in members]
    outcomes: list[Run | Exception | None] = [f.run if f.complete else None for f in folders]
    active = [i for i, f in enumerate(folders) if not f.complete]
    if not active:
        return outcomes
    members, folders = [members[i] for i in active], [folders[i] for i in active]
    data = data_mod.build(cfg["data"], device)
    spec = model_spec(cfg, data)
    prepared: dict[int, dict | None] = {}
    for m in members:  # members that share a teacher object prepare it once, so they must cache it alike
        if m.teacher is None:
            continue
        cache = cache_settings(m.cfg, data)
        if id(m.teacher) not in prepared:
            prepared[id(m.teacher)] = cache
            m.teacher.prepare(data, cache=cache, quiet=quiet)
        elif prepared[id(m.teacher)] != cache:
            raise ValueError(f"{m.out} shares a teacher object with another member but caches it otherwise "
                             f"({cache} against {prepared[id(m.teacher)]}): give it a teacher of its own")
    models, optimizers = [], []
    for m in members:
        torch.manual_seed(m.cfg["seed"])
        models.append(from_spec(spec).to(device))
        optimizers.append(make_optimizer(m.cfg, models[-1]))
    chosen, why = choose_engine(models[0], spec, device, engine)
    per_member = step_bytes(models[0], spec, cfg["data"]["batch_size"], device)
    chunks = split_for_memory(list(range(len(members))), per_member, available_bytes(device))
    say = announce or (lambda message: None if quiet else print(message, file=sys.stderr, flush=True))
    if len(chunks) > 1:
        say(f"a group of {len(members)} runs needs about {len(members) * per_member / 2**20:.0f} MiB, more than "
            f"{MEMORY_SHARE:.0%} of the memory free here: training it as {len(chunks)} groups of up to "
            f"{len(chunks[0])}")
    progress, logs = [], []  # by member: the chunks are consecutive runs of members, in order
    for chunk in chunks:
        for position, i in enumerate(chunk):
            manifest = new_manifest(members[i].cfg, members[i].kind, spec, data, device, members[i].teacher)
            manifest.fused = {"engine": chosen, "members": len(chunk), "index": position,
                              "group": [str(folders[j].path) for j in chunk]}
            progress.append(folders[i].begin(manifest, models[i], optimizers[i]))
            log = RunLog(members[i].cfg, folders[i].path, quiet=quiet, writes=True)
            log.started(progress[-1].history if folders[i].resumable else None)
            logs.append(log)
    for chunk in chunks:
        say(f"training {len(chunk)} runs as one group ({chosen}: {why})")
        state = _GroupState(*([x[i] for i in chunk] for x in (members, folders, models, optimizers, progress, logs)),
                            data, spec, chosen, device)
        try:
            state.run(on_epoch)
        except BaseException as error:
            # This group's unfinished runs and the later groups' (not started) are marked as `fit` marks a run.
            unfinished = [i for later in chunks[chunks.index(chunk):] for i in later
                          if i not in chunk or state.outcomes[chunk.index(i)] is None]
            full = None
            for i in unfinished:
                logs[i].close()
                try:
                    stopped(folders[i], progress[i], error)
                except UserError as disk_full:
                    full = disk_full
            if full is not None:
                raise full from error
            raise
        for position, i in enumerate(chunk):
            outcomes[active[i]] = state.outcomes[position]
    return outcomes


def _fit_alone(member: Member, *, resume: bool, quiet: bool, on_epoch) -> Run | Exception:
    try:
        return fit(member.cfg, member.out, resume=resume, kind=member.kind, teacher=member.teacher, quiet=quiet,
                   on_epoch=on_epoch)
    except health.Diverged as error:  # this member's outcome, as in a group; anything else is raised
        return error


class _GroupState:
    """The members of a running group and the engine that trains those still going."""

    def __init__(self, members, folders, models, optimizers, progress, logs, data, spec, chosen, device):
        self.members, self.folders, self.models, self.optimizers = members, folders, models, optimizers
        self.progress, self.logs, self.data, self.spec = progress, logs, data, spec
        self.chosen, self.device = chosen, device
        self.outcomes: list[Run | Exception | None] = [None] * len(members)
        self.going = list(range(len(members)))

    def build(self):
        idx = self.going
        self.engine = ENGINES[self.chosen]([self.models[i] for i in idx], [self.optimizers[i] for i in idx],
                                           self.members[idx[0]].cfg, self.device)
        self.objective = GroupObjective([self.members[i] for i in idx], self.data.num_classes, self.device)

    def run(self, on_epoch) -> None:
        cfg = self.members[0].cfg
        epochs, batch_size = cfg["schedule"]["epochs"], cfg["data"]["batch_size"]
        steps = self.data.steps_per_epoch(batch_size)
        saved_at, tested_at = checkpoint_epochs(cfg), test_epochs(cfg)
        self.build()
        while True:
            idx = self.going
            behind = min(self.progress[i].epoch for i in idx) if idx else epochs
            if behind >= epochs:
                break
            epoch = behind + 1
            trains = [self.progress[i].epoch < epoch for i in idx]  # members ahead (a kill between writes) hold
            started = time.perf_counter()
            plans = [self.data.epoch_plan(seed=self.members[i].cfg["seed"], epoch=epoch,
                                          view_bank=self.objective.view_bank(j)) for j, i in enumerate(idx)]
            self.objective.begin_epoch(plans, self.data.train_x.shape[0])
            first = idx[trains.index(True)]
            bar, on_step = self.logs[idx[0]].bar(self.data.group_batches(plans, batch_size), epoch, steps)
            sums, lr, step = train_group_epoch(self.engine, self.objective, bar, cfg=cfg, steps_per_epoch=steps,
                                               step=self.progress[first].step, on_step=on_step)
            val = evaluate_group(self.engine, self.data, "val", cfg["data"]["eval_batch_size"], len(idx))
            test = (evaluate_group(self.engine, self.data, "test", cfg["data"]["eval_batch_size"], len(idx))
                    if epoch in tested_at else None)
            elapsed = (time.perf_counter() - started) / sum(trains)  # the group's time, shared by its trained runs
            failed = []
            for j, i in enumerate(idx):
                if not trains[j]:
                    self.engine.restore(j, self.models[i], self.optimizers[i])
                    continue
                totals = sums[j].tolist()
                record = {"epoch": epoch, "step": step, "lr": lr, "train_loss": totals[0] / totals[4],
                          "train_acc": totals[1] / totals[4],
                          **{f"train_{t}": totals[2 + k] / totals[4] for k, t in enumerate(["ce", "kd"])
                             if t in self.objective.terms[j]}}
                try:
                    health.check_finite(record, last_good=self.progress[i].epoch)
                except health.Diverged as error:
                    failed.append(i)
                    self.folders[i].fail(self.progress[i], str(error))
                    self.logs[i].say(f"{self.folders[i].path}: {error}")
                    self.logs[i].close()
                    self.outcomes[i] = error
                    continue
                self.end_epoch(j, i, record, val[j], None if test is None else test[j], elapsed,
                               checkpoint=epoch in saved_at)
            if on_epoch is not None:
                on_epoch({"epoch": epoch})
            if failed:  # a member that diverged leaves the group; the others go on in a group without it
                for j, i in enumerate(idx):
                    if i not in failed:
                        self.engine.export(j, self.models[i], self.optimizers[i])
                self.going = [i for i in idx if i not in failed]
                if self.going:
                    self.build()
        for i in self.going:
            final = final_numbers(self.progress[i], cfg["eval"]["last_k"])
            self.outcomes[i] = self.folders[i].finish(self.progress[i], final)
            self.logs[i].finished(dataclasses.asdict(final))

    def end_epoch(self, j: int, i: int, record: dict, val: dict, test: dict | None, elapsed: float, *,
                  checkpoint: bool) -> None:
        progress = self.progress[i]
        if val["acc"] > progress.best_val_acc:
            progress.best_val_acc, progress.best_val_epoch = val["acc"], record["epoch"]
        record.update(val_loss=val["loss"], val_acc=val["acc"])
        if test is not None:
            record["test_acc"] = test["acc"]
        record["time_s"] = elapsed
        progress.elapsed_s += elapsed
        progress.step = record["step"]
        verdict = health.assess(progress.history + [record])
        self.engine.export(j, self.models[i], self.optimizers[i])
        entry = self.folders[i].end_epoch(record, self.models[i], self.optimizers[i], progress, checkpoint=checkpoint,
                                          health=verdict)
        self.logs[i].epoch(record, entry, verdict)
