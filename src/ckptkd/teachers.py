"""Frozen teachers built from checkpoint references: one checkpoint, a snapshot ensemble, a full ensemble, any mix.

A teacher never trains: its models stay in eval mode (BatchNorm statistics untouched), take no gradients and run
under inference mode. Each model sees its inputs normalised the way it was trained, whatever the student's data
statistics are.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from .checkpoints import Checkpoint, resolve_all
from .data import Batch, Data
from .errors import UserError


class Teacher:
    def __init__(self, checkpoints: list[Checkpoint], *, quiet: bool = False):
        if not checkpoints:
            raise UserError("no teacher checkpoints given")
        self.checkpoints = checkpoints
        self.models = [c.build_model("cpu") for c in checkpoints]  # sha256 verified while loading
        for model in self.models:
            model.eval()
            model.requires_grad_(False)
        self.quiet = quiet
        self.val_acc: list[float] = []
        self.ensemble_val_acc: float | None = None
        self._affine: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(checkpoints)

    @classmethod
    def from_references(cls, references: list[str], *, quiet: bool = False) -> "Teacher":
        return cls(resolve_all(references), quiet=quiet)

    def __len__(self) -> int:
        return len(self.models)

    def to(self, device: torch.device) -> "Teacher":
        self.models = [m.to(device) for m in self.models]
        return self

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher is frozen whatever the caller asks: eval mode keeps its BatchNorm statistics untouched.
        for model in self.models:
            model.eval()
        return self

    def check_compatible(self, data: Data) -> None:
        channels, height, width = data.image_shape
        for ckpt in self.checkpoints:
            spec = ckpt.manifest["model"]
            if spec["num_classes"] != data.num_classes:
                raise UserError(f"teacher {ckpt.reference} predicts {spec['num_classes']} classes but "
                                f"{data.name} has {data.num_classes}")
            if spec["in_channels"] != channels:
                raise UserError(f"teacher {ckpt.reference} takes {spec['in_channels']}-channel images but "
                                f"{data.name} has {channels}")
            if spec.get("image_size") and list(spec["image_size"]) != [height, width]:
                raise UserError(f"teacher {ckpt.reference} was trained on {spec['image_size'][0]}x"
                                f"{spec['image_size'][1]} images but {data.name} has {height}x{width}")

    def prepare(self, data: Data) -> None:
        """Match each model's input normalisation to the data, then measure and log validation accuracy."""
        for i, ckpt in enumerate(self.checkpoints):
            trained = ckpt.manifest["data"]
            mean_t = torch.tensor(trained["mean"], dtype=torch.float32)
            std_t = torch.tensor(trained["std"], dtype=torch.float32)
            if torch.allclose(mean_t, data.mean, atol=1e-6) and torch.allclose(std_t, data.std, atol=1e-6):
                continue
            # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t, folded into one scale and shift.
            scale = (data.std / std_t).view(1, -1, 1, 1).to(data.val_x.device)
            shift = ((data.mean - mean_t) / std_t).view(1, -1, 1, 1).to(data.val_x.device)
            self._affine[i] = (scale, shift)
        self.measure(data)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for model, affine in zip(self.models, self._affine):
            inputs = x if affine is None else x * affine[0] + affine[1]
            outputs.append(model(inputs).float())
        return torch.stack(outputs)

    def logits(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """Teacher logits [M, B, C] for a batch of normalised student inputs (a plain tensor, not an inference one)."""
        x = batch.x if isinstance(batch, Batch) else batch
        return self._forward(x).clone()

    @torch.inference_mode()
    def measure(self, data: Data) -> None:
        correct = torch.zeros(len(self.models) + 1, dtype=torch.int64)
        count = 0
        for x, y in data.eval_batches("val", 512):
            logits = self._forward(x)
            correct[:-1] += (logits.argmax(-1) == y).sum(dim=1).cpu()
            correct[-1] += (logits.softmax(-1).mean(0).argmax(-1) == y).sum().cpu()
            count += len(y)
        accs = (correct.double() / count).tolist()
        self.val_acc, self.ensemble_val_acc = accs[:-1], accs[-1]
        if not self.quiet:
            for ckpt, acc in zip(self.checkpoints, self.val_acc):
                tqdm.write(f"teacher {ckpt.reference}: val acc {acc:.4f}", file=sys.stderr)
            if len(self.models) > 1:
                tqdm.write(f"teacher ensemble of {len(self.models)}: val acc {self.ensemble_val_acc:.4f}",
                           file=sys.stderr)

    def describe(self) -> list[dict]:
        described = []
        for i, ckpt in enumerate(self.checkpoints):
            described.append({"reference": ckpt.reference, "sha256": ckpt.sha256, "epoch": ckpt.epoch,
                              "fraction": ckpt.fraction, "model": ckpt.manifest["model"]["name"],
                              "seed": ckpt.manifest.get("seed"),
                              "val_acc": self.val_acc[i] if i < len(self.val_acc) else None})
        return described
