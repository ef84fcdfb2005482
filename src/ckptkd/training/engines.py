"""How the N runs of a group compute a training step (a single run is a group of one).

  direct   a group of one: the run's own model and optimizer (under torchrun, its model wrapped in DDP)
  looped   the N models one after another, each stepped by the exact single-run loss (`Objective.member_loss`):
           for a model too large to gain from fusion (on a CPU, grouped convolutions of wide layers are slower than
           separate ones: `choose_engine`; such a convolutional model runs channels-last, which is faster there), or
           one the rewrite cannot fuse
  fused    one wide model (`fusion`: grouped convolutions, batched matmuls, BatchNorm over N x C channels) with one
           optimizer over its stacked parameters, stepped by the batched loss (`Objective.batched`): every op's
           fixed cost is paid once for N

Every engine answers `step(batch, lr)` with (logits [N, B, C], losses [N], terms {name: [N]}), `logits(x)` for
evaluation and `train(mode)`. The looped and fused engines work on their own copy of the members; `export`/`restore`
move a member's state between it and the ordinary (model, optimizer) pair its run folder saves and resumes from (for
the direct engine, whose model is the run's own, both are no-ops).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os

import torch

from ..errors import UserError, note
from . import distributed
from .objective import TERMS, Objective
from .recipe import make_optimizer


def forward(net: torch.nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """A training forward: with `autocast_dtype` under autocast, its logits returned in float32 for the loss."""
    if autocast_dtype is None:
        return net(x)
    with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
        return net(x).float()


# On a CPU, fusion pays when a model is overhead-bound: below this many forward FLOPs per image. Measured with
# benchmarks/fused_probe.py on 2 cores (N = 8): fused / one-after-another 1.4-2.3x for models of 0.1-2 MFLOPs
# (the Fashion and digits students, resnet8 on 8x8, lenet5), 0.7x for resnet8 on 32x32 (25 MFLOPs) and 0.4x for
# resnet20 on 32x32 (82 MFLOPs), where grouped convolutions of 16-64 channels are slower than separate ones.
CPU_FUSE_MAX_FLOPS = 10e6


class Compiled:
    """`torch.compile(module, backend=...)` for the training forward, falling back to the module itself, with one
    line, if compiling fails (no C++ compiler, an operation the backend cannot trace): a run is never lost to it.
    The parameters are the module's own, so the optimizer, checkpoints and evaluation see one set of weights."""

    def __init__(self, module: torch.nn.Module, backend: str):
        self.module, self.backend = module, backend
        self.compiled = torch.compile(module, backend=backend)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is self.module:
            return self.module(x)
        try:
            return self.compiled(x)
        except Exception as error:  # noqa: BLE001 - whatever the compiler raised, the eager module runs instead
            said = " ".join(str(error).split())[:160] or type(error).__name__
            note(f"compile: torch.compile (backend {self.backend}) failed ({said}); training continues without it")
            self.compiled = self.module
            return self.module(x)


def compiled(module: torch.nn.Module, cfg: dict):
    """The module as the training step calls it: compiled where `compile` asks for it (true: the default backend,
    inductor; or a backend's name), else itself."""
    setting = cfg["compile"]
    if setting is False:
        return module
    if setting == "cudagraphs" and next(module.parameters()).device.type != "cuda":
        # torch would skip the graphs anyway, printing a traceback-like warning for every graph it skips
        note("compile: the cudagraphs backend needs a CUDA device; on this device the model runs uncompiled")
        return module
    return Compiled(module, "inductor" if setting is True else setting)


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


def choose_engine(model: torch.nn.Module, spec: dict, device: torch.device, requested: str = "auto",
                  precision: str = "fp32") -> tuple[str, str]:
    """(an `ENGINES` name, why): fused where the rewrite knows the model and it pays on this device; a compute-bound
    convolutional model loops channels-last on a CPU (resnet20 on 32x32: 1.28x one after another in the default
    layout, `ckptkd bench --workload fused`). fp16 runs are never fused: each keeps its own loss scale, and one
    run's overflow must not skip the others' steps."""
    from .fusion import fusable

    if requested.startswith("looped"):
        return requested, "asked for"
    if precision == "fp16":
        if requested == "fused":
            raise UserError("precision fp16 runs cannot be fused (each keeps its own loss scale); use the looped "
                            "engine, or precision bf16")
        return "looped", "precision fp16: each run keeps its own loss scale, so its runs train one after another"
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


def _stack_terms(terms: list[dict[str, torch.Tensor]], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-member term dicts -> {name: [N]}, 0 where a member has no such term (it does not log it)."""
    return {k: torch.stack([t[k].detach() if k in t else like.new_zeros(()) for t in terms]) for k in TERMS}


class LoopedEngine:
    """The members one after another, each forward, loss, backward and optimizer step exactly as a single run's, so
    memory holds one member's activations at a time, as training them apart would. `own`: the engine steps the
    members' own models and optimizers (a group of one, which is never held: see `loop`), else copies of them.
    `channels_last` runs the copies channels-last, faster for wide convolutions on a CPU (another rounding: a group's
    numbers are its own, as with fusion)."""

    def __init__(self, models: list, optimizers: list, cfg: dict, objective: Objective, device: torch.device, *,
                 channels_last: bool = False, own: bool = False, loss_scales: list[dict | None] | None = None):
        self.objective, self.own = objective, own
        # fp16: a gradient scaler per run (its scale grows while steps are finite and halves on an overflow, whose
        # step is skipped), carried across a resume in the run's Progress.loss_scale
        self.scalers = [torch.amp.GradScaler(device.type) if cfg["precision"] == "fp16" else None for _ in models]
        for scaler, state in zip(self.scalers, loss_scales or []):
            if scaler is not None and state:
                scaler.load_state_dict(state)
        if own:
            self.models, self.optimizers = list(models), list(optimizers)
        else:
            self.models = [copy.deepcopy(m) for m in models]
            if channels_last:
                for m in self.models:
                    m.to(memory_format=torch.channels_last)
            self.optimizers = [make_optimizer(cfg, m) for m in self.models]
            for i, (model, optimizer) in enumerate(zip(models, optimizers)):
                self.restore(i, model, optimizer)
        # What the step calls: under torchrun (a group of one only) the model wrapped in DDP.
        self.nets = [distributed.wrap(m, device) for m in self.models] if own else self.models
        self.nets = [compiled(net, cfg) for net in self.nets]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.models])

    def trained_modules(self) -> list[torch.nn.Module]:
        return self.models

    def train(self, mode: bool = True) -> None:
        for m in self.models:
            m.train(mode)

    def step(self, batch, lr: float, autocast_dtype=None, accumulate: int = 1):
        logits, losses, terms = [], [], []
        for i, (net, optimizer) in enumerate(zip(self.nets, self.optimizers)):
            own = batch.member(i)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            outs, parts = [], []
            pieces = own.chunks(accumulate)
            for k, piece in enumerate(pieces):
                share = piece.y.shape[0] / own.y.shape[0]  # each piece's mean loss, weighted: the batch's mean
                # Under DDP the gradients are averaged across ranks once, on the step's last piece.
                with (net.no_sync() if k < len(pieces) - 1 and hasattr(net, "no_sync") else contextlib.nullcontext()):
                    out = forward(net, piece.x, autocast_dtype)
                    loss, term = self.objective.member_loss(i, out, piece)
                    scaled = loss * share
                    (scaled if self.scalers[i] is None else self.scalers[i].scale(scaled)).backward()
                outs.append(out.detach())
                parts.append((share, loss.detach(), term))
            if self.scalers[i] is None:
                optimizer.step()
            else:  # unscales the gradients, and skips the step if any is not finite
                self.scalers[i].step(optimizer)
                self.scalers[i].update()
            logits.append(torch.cat(outs))
            losses.append(sum(share * loss for share, loss, _ in parts))
            terms.append({t: sum(share * term[t].detach() for share, _, term in parts) for t in parts[0][2]})
        losses = torch.stack(losses)
        return torch.stack(logits), losses, _stack_terms(terms, losses[0])

    def loss_scale(self, i: int) -> dict | None:
        """Run i's gradient scaler as its resume state keeps it (None unless fp16)."""
        return None if self.scalers[i] is None else self.scalers[i].state_dict()

    def export(self, i: int, model, optimizer) -> None:
        if self.own:
            return
        model.load_state_dict(self.models[i].state_dict())
        # A copy: load_state_dict keeps the very tensors it is given, which the next steps update in place.
        optimizer.load_state_dict(copy.deepcopy(self.optimizers[i].state_dict()))

    def restore(self, i: int, model, optimizer) -> None:
        if self.own:
            return
        self.models[i].load_state_dict(model.state_dict())
        self.optimizers[i].load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not the member's own tensors


class FusedEngine:
    """The members as one `FusedModel` and one optimizer over its stacked parameters (element-wise optimizers
    only: SGD and AdamW give every member exactly the update its own optimizer would)."""

    def __init__(self, models: list, optimizers: list, cfg: dict, objective: Objective, device: torch.device,
                 loss_scales: list | None = None):
        from .fusion import fuse

        if cfg["precision"] == "fp16":  # `choose_engine` never picks this engine for fp16
            raise ValueError("the fused engine has no per-run loss scale for fp16")

        self.objective = objective
        self.model = fuse(models, channels_last=device.type == "cpu").to(device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.train_forward = compiled(self.model, cfg)
        self.names = dict(self.model.named_parameters())
        for i, (model, optimizer) in enumerate(zip(models, optimizers)):
            self.restore(i, model, optimizer, weights=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(self.model.num_members, *x.shape))

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def step(self, batch, lr: float, autocast_dtype=None, accumulate: int = 1):
        self.optimizer.zero_grad(set_to_none=True)
        outs, losses, terms = [], 0, {}
        for piece in batch.chunks(accumulate, dim=1):
            share = piece.y.shape[1] / batch.y.shape[1]  # each piece's mean losses, weighted: the batch's means
            logits = forward(self.train_forward, piece.x, autocast_dtype)
            piece_losses, piece_terms = self.objective.batched(logits, piece)
            (piece_losses.sum() * share).backward()  # the sum: each member's parameters get its own loss's gradient
            outs.append(logits.detach())
            losses = losses + share * piece_losses.detach()
            terms = {k: terms.get(k, 0) + share * v.detach() for k, v in piece_terms.items()}
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        return torch.cat(outs, dim=1), losses, terms

    def loss_scale(self, i: int) -> None:
        return None  # fp32 or bf16 only

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


ENGINES = {"direct": functools.partial(LoopedEngine, own=True), "looped": LoopedEngine,
           "looped-channels-last": functools.partial(LoopedEngine, channels_last=True), "fused": FusedEngine}
