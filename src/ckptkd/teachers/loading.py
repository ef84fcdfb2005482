"""Loading a teacher: checkpoints made into frozen models, checked against the student's data, each fed its inputs
normalised as it was trained."""

from __future__ import annotations

import torch

from ..data import Data
from ..errors import UserError, note
from ..run import Checkpoint
from .forward import fold_batchnorm


def frozen_models(checkpoints: list[Checkpoint], *, fold: bool) -> list[torch.nn.Module]:
    """Each checkpoint as a model in eval mode without gradients (sha256 verified while loading); with `fold`,
    BatchNorm layers that follow a convolution folded into it (which needs eval mode: a model in train mode keeps
    them)."""
    models = []
    for checkpoint in checkpoints:
        model = checkpoint.build_model("cpu")
        model.eval()
        model.requires_grad_(False)
        if fold:
            fold_batchnorm(model)
        models.append(model)
    return models


def check_compatible(checkpoints: list[Checkpoint], data: Data) -> None:
    """Refuse, naming the reference, a teacher that predicts other classes or takes other images than `data`'s."""
    channels, height, width = data.image_shape
    for ckpt in checkpoints:
        spec = ckpt.manifest.model
        if spec["num_classes"] != data.num_classes:
            raise UserError(f"teacher {ckpt.reference} predicts {spec['num_classes']} classes but "
                            f"{data.name} has {data.num_classes}")
        if spec["in_channels"] != channels:
            raise UserError(f"teacher {ckpt.reference} takes {spec['in_channels']}-channel images but "
                            f"{data.name} has {channels}")
        if spec.get("image_size") and list(spec["image_size"]) != [height, width]:
            raise UserError(f"teacher {ckpt.reference} was trained on {spec['image_size'][0]}x"
                            f"{spec['image_size'][1]} images but {data.name} has {height}x{width}")
        _check_class_names(ckpt, data)


def _check_class_names(ckpt: Checkpoint, data: Data) -> None:
    """A teacher's output k is read as the data's class k. A class both name at different positions would get another
    class's soft labels: refused. Other names (another data set of as many classes, or names a source made up) may be
    intended: a note."""
    trained = [str(name) for name in ckpt.manifest.data.get("class_names") or []]
    names = [str(name) for name in data.class_names]
    if not trained or trained == names:
        return
    position = {name: k for k, name in enumerate(names)}
    moved = next((k for k, name in enumerate(trained) if name in position and position[name] != k), None)
    if moved is not None:
        raise UserError(f"teacher {ckpt.reference} orders its classes otherwise than {data.name}: its output {moved} "
                        f"is {trained[moved]!r}, which is the data's class {position[trained[moved]]} (its class "
                        f"{moved} is {names[moved]!r}), so its soft labels would go to the wrong classes; give the "
                        "data its classes in the teacher's order")
    k = next(i for i, (a, b) in enumerate(zip(trained, names)) if a != b)
    note(f"teacher {ckpt.reference} was trained on other class names than {data.name}'s (class {k}: "
         f"{trained[k]!r} there, {names[k]!r} here); its output k is read as class k")


def input_affines(checkpoints: list[Checkpoint], data: Data) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per checkpoint, the (scale, shift) that turns the student's normalised inputs into the ones it was trained
    on, or None where both were normalised alike:
    x_teacher = (x_student * std_s + mean_s - mean_t) / std_t, folded into one scale and shift."""
    affines = []
    for ckpt in checkpoints:
        trained = ckpt.manifest.data
        mean_t = torch.tensor(trained["mean"], dtype=torch.float32)
        std_t = torch.tensor(trained["std"], dtype=torch.float32)
        if torch.allclose(mean_t, data.mean, atol=1e-6) and torch.allclose(std_t, data.std, atol=1e-6):
            affines.append(None)
            continue
        scale = (data.std / std_t).view(1, -1, 1, 1).to(data.device)
        shift = ((data.mean - mean_t) / std_t).view(1, -1, 1, 1).to(data.device)
        affines.append((scale, shift))
    return affines
