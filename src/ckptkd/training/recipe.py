"""What a resolved config asks training to build: the device, the model's spec, the optimizer, which epochs keep a
checkpoint or measure test accuracy, and whether a teacher answers from a cache."""

from __future__ import annotations

import torch

from .. import config as config_mod
from ..data import Data
from ..errors import UserError
from .schedules import checkpoint_epochs


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
    if num_classes != data.num_classes:  # more outputs than classes: no label, no teacher, no analysis reads them
        raise UserError(f"config: model.num_classes={num_classes} but {data.name} has {data.num_classes} classes "
                        "(leave it unset to take the data's)")
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


def autocast_dtype(cfg: dict) -> torch.dtype | None:
    """The dtype the training forward runs under autocast (None: float32 throughout). fp16 goes with a gradient
    scaler per run (`engines.LoopedEngine`)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["precision"])


def test_epochs(cfg: dict) -> set[int]:
    """Epochs whose test accuracy is measured: every checkpoint and the last `eval.last_k` (their mean is reported
    beside the last epoch's, as the honest counterpart of the paper's best-of-the-last-10), and the last
    `eval.best_of_last` where the paper's own metric is asked for."""
    epochs = cfg["schedule"]["epochs"]
    tail = max(cfg["eval"]["last_k"], cfg["eval"]["best_of_last"])
    return set(checkpoint_epochs(cfg)) | set(range(max(1, epochs - tail + 1), epochs + 1))


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


def step_batch(cfg: dict) -> int:
    """The images of one optimizer step: `data.batch_size` pieces of them, `optim.accumulate` pieces a step (the
    gradients summed, each piece's mean loss weighted by its share), so a step equals one of the k-times batch."""
    return cfg["data"]["batch_size"] * cfg["optim"]["accumulate"]
