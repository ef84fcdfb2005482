"""The parts of one training run that `train.fit` composes: device, model spec, optimizer, the objective, one
epoch of steps, evaluation, and which epochs keep a checkpoint.

Teachers and students share all of it: a student is a model trained under an objective with a teacher term.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import config as config_mod
from . import distributed
from .data import Batch, Data
from .errors import UserError
from .losses import kd_loss
from .run.state import Progress
from .schedules import checkpoint_epochs, lr_at


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config: device={name!r} but CUDA is not available here (use device: auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("config: device='mps' but MPS is not available here (use device: auto or cpu)")
    return torch.device(name)


def model_spec(cfg: dict, data: Data) -> dict:
    """The manifest's `model` entry: what `models.from_spec` rebuilds the network from."""
    m = cfg["model"]
    num_classes = m["num_classes"] or data.num_classes
    in_channels = m["in_channels"] or data.image_shape[0]
    if num_classes < data.num_classes:
        raise UserError(f"config: model.num_classes={num_classes} but {data.name} has {data.num_classes} classes")
    if in_channels != data.image_shape[0]:
        raise UserError(f"config: model.in_channels={in_channels} but {data.name} images have "
                        f"{data.image_shape[0]} channels")
    kwargs = {k: v for k, v in m.items() if k not in config_mod.MODEL_FIXED_KEYS}
    return {"name": m["name"], "num_classes": num_classes, "in_channels": in_channels,
            "image_size": list(data.image_shape[1:]), "kwargs": kwargs}


def make_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg["optim"]
    # Weight decay on BatchNorm scales and biases is what the paper's recipes do; keep one group for fidelity.
    if o["name"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"],
                               nesterov=o["nesterov"] and o["momentum"] > 0, weight_decay=o["weight_decay"])
    return torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])


def test_epochs(cfg: dict) -> set[int]:
    """Epochs whose test accuracy is measured: every checkpoint and the last `eval.last_k` (their mean is reported
    beside the last epoch's, as the honest counterpart of the paper's best-of-the-last-10)."""
    epochs = cfg["schedule"]["epochs"]
    return set(checkpoint_epochs(cfg)) | set(range(max(1, epochs - cfg["eval"]["last_k"] + 1), epochs + 1))


def cache_settings(cfg: dict, data: Data) -> dict | None:
    """How a teacher should cache its outputs, or None to run it online.

    `kd.cache: auto` caches when building the bank costs no more teacher forwards than one student run online
    (views <= epochs): every later student, seed or epoch then reuses it."""
    kd = cfg["kd"]
    if kd["cache"] == "auto":
        use = min(kd["views"], data.distinct_views()) <= cfg["schedule"]["epochs"]
    else:
        use = kd["cache"] == "on"
    return {"views": kd["views"], "cache_dir": kd["cache_dir"]} if use else None


class Objective:
    """What a training step minimises, with its named terms (cf. mdistiller's losses dict): cross-entropy alone,
    or `kd_loss` under a frozen teacher. Returns (loss, {term: value}); the terms are logged as train_<term>."""

    def __init__(self, kd: dict, teacher=None):
        self.kd, self.teacher = kd, teacher

    @property
    def view_bank(self) -> torch.Tensor | None:
        """The views a cached teacher answers for: batches must be drawn from them."""
        return self.teacher.view_bank if self.teacher is not None else None

    def __call__(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.teacher is None:
            return F.cross_entropy(logits, batch.y), {}
        alpha = self.kd["alpha"]
        targets = self.teacher.logits(batch) if alpha < 1 else None
        return kd_loss(logits, targets, batch.y, temperature=self.kd["temperature"], alpha=alpha,
                       ensemble=self.kd["ensemble"], return_terms=True)


def forward(net: torch.nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """A training forward: with `autocast_dtype` under autocast, its logits returned in float32 for the loss."""
    if autocast_dtype is None:
        return net(x)
    with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
        return net(x).float()


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, batch: Batch,
               autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One optimisation step (`forward`, the objective, backward, the optimizer's step)."""
    logits = forward(net, batch.x, autocast_dtype)
    loss, terms = objective(logits, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss, terms


def train_epoch(net, optimizer, objective: Objective, batches: Iterable[Batch], *, cfg: dict, steps_per_epoch: int,
                progress: Progress, on_step: Callable[[torch.Tensor, float], None] | None = None) -> dict:
    """One pass over `batches` at the schedule's per-step learning rate. Returns the epoch's record so far: the lr of
    its last step and the batch-weighted means of loss, accuracy and each named term, summed over every rank."""
    autocast_dtype = torch.bfloat16 if cfg["precision"] == "bf16" else None
    net.train()
    sums, names, lr = None, [], cfg["optim"]["lr"]
    for batch in batches:
        lr = lr_at(cfg["schedule"], cfg["optim"]["lr"], progress.step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, loss, terms = train_step(net, optimizer, objective, batch, autocast_dtype)
        progress.step += 1
        n = len(batch.y)
        with torch.no_grad():  # kept on the device: reading a value here would make a GPU wait every step
            values = torch.stack([loss.detach().double() * n, (logits.argmax(1) == batch.y).sum().double(),
                                  *(t.detach().double() * n for t in terms.values()), loss.new_tensor(n).double()])
        sums = values if sums is None else sums + values
        names = ["train_loss", "train_acc", *(f"train_{k}" for k in terms)]
        if on_step is not None:
            on_step(loss, lr)
    totals = distributed.all_sum(sums)
    return {"lr": lr, **dict(zip(names, (totals[:-1] / totals[-1]).tolist()))}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: Data, split: str, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.train_x.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.train_x.device)
    count = 0
    for x, y in data.eval_batches(split, batch_size):
        logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    model.train(was_training)
    return {"loss": float(loss_sum) / count, "acc": float(correct) / count}
