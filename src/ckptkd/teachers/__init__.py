"""Frozen teachers built from checkpoint references: one checkpoint, a snapshot ensemble, a full ensemble, any mix.

A teacher never trains: its models stay in eval mode (BatchNorm statistics untouched), take no gradients and run
under inference mode. Each model sees its inputs normalised the way it was trained, whatever the student's data
statistics are. The parts: `loading` (checkpoints into frozen models, checked against the data), `forward` (the
ensemble's forward pass, BatchNorm folding), `cache` (the bank of outputs a cached teacher answers from).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import Batch, Data
from ..errors import UserError
from ..run import Checkpoint, resolve_all
from . import cache as cache_mod
from .forward import EnsembleForward
from .loading import check_compatible, frozen_models, input_affines

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Accuracies already measured in this process, so that the students of a study that share a teacher (seeds, variants,
# pairs) do not each run it over the validation and test splits again.
_MEASURED: dict[tuple, tuple[list[float], list[float]]] = {}


class Teacher:
    """`channels_last` ("auto": when a model has convolutions) and `autocast` ("none", "bf16", "fp16") set how the
    frozen models compute; BatchNorm layers that follow a convolution are folded into it.

    `mode="train"` is a fidelity option for reproducing the authors' released code, which never puts its teachers in
    eval mode for most of training: on the student's batches the models then run in train mode (BatchNorm on batch
    statistics, updating the in-memory running statistics; dropout active), so nothing is folded and no output
    cache applies (outputs depend on the batch). Accuracy is still measured in eval mode."""

    def __init__(self, checkpoints: list[Checkpoint], *, quiet: bool = False, channels_last: bool | str = "auto",
                 autocast: str = "none", allow_incomplete: bool = False, mode: str = "eval"):
        if not checkpoints:
            raise UserError("no teacher checkpoints given")
        if autocast not in AUTOCAST_DTYPES:
            raise UserError(f"config: kd.autocast must be one of {', '.join(AUTOCAST_DTYPES)}, got {autocast!r}")
        if mode not in ("eval", "train"):
            raise UserError(f"config: kd.teacher_mode must be eval or train, got {mode!r}")
        self.mode = mode
        self.checkpoints = checkpoints
        self.allow_incomplete = allow_incomplete
        # Folding BatchNorm needs eval-mode statistics, which a train-mode teacher does not use.
        self.models = frozen_models(checkpoints, fold=mode == "eval")
        if channels_last == "auto":
            channels_last = any(isinstance(m, torch.nn.Conv2d) for model in self.models for m in model.modules())
        # Part of the cache key: outputs computed another way are not reused.
        self.numerics = {"channels_last": bool(channels_last), "autocast": autocast}
        if mode == "train":  # only then, so the keys of existing caches of eval-mode teachers stay as they were
            self.numerics["mode"] = mode
        self.quiet = quiet
        self.ensemble = self._ensemble_of(self.models)
        self.cache: torch.Tensor | None = None      # [M, N, V, C] float16 logits on the banked views
        self.view_bank: torch.Tensor | None = None  # [N, V, 3] views of the training images
        self.cache_info: dict | None = None
        self.val_acc: list[float] = []
        self.test_acc: list[float] = []
        self.ensemble_acc: dict[str, float] = {}
        self._affine: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(checkpoints)

    @classmethod
    def from_references(cls, references: list[str], *, quiet: bool = False, channels_last: bool | str = "auto",
                        autocast: str = "none", allow_incomplete: bool = False, mode: str = "eval",
                        base: str | Path | None = None) -> "Teacher":
        """`allow_incomplete`: accept runs that did not complete (interrupted, failed), which are refused otherwise;
        `base`: the folder relative references are taken from (default: the working directory)."""
        return cls(resolve_all(references, allow_incomplete=allow_incomplete, base=base), quiet=quiet,
                   channels_last=channels_last, autocast=autocast, allow_incomplete=allow_incomplete, mode=mode)

    def _ensemble_of(self, models: list[torch.nn.Module]) -> EnsembleForward:
        return EnsembleForward(models, channels_last=self.numerics["channels_last"],
                               autocast_dtype=AUTOCAST_DTYPES[self.numerics["autocast"]],
                               batched="auto" if self.mode == "eval" else False)

    def __len__(self) -> int:
        return len(self.models)

    def to(self, device: torch.device) -> "Teacher":
        self.ensemble.to(device)
        return self

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher is frozen whatever the caller asks: eval mode keeps its BatchNorm statistics untouched.
        for model in self.models:
            model.eval()
        return self

    @property
    def cacheable(self) -> bool:
        """Whether outputs can be cached: train-mode outputs depend on the batch they are computed in."""
        return self.mode == "eval"

    def prepare(self, data: Data, *, quiet: bool = False) -> "Teacher":
        """Everything a teacher needs before a student's first step but its cache (`attach_cache`): check it fits
        the data, move it to the data's device, match each model's input normalisation, measure its accuracy."""
        self.quiet = self.quiet or quiet
        check_compatible(self.checkpoints, data)
        self.to(data.device)
        self._affine = input_affines(self.checkpoints, data)
        self.measure(data)
        return self

    def _forward(self, x: torch.Tensor, ensemble: EnsembleForward | None = None,
                 indices: list[int] | None = None) -> torch.Tensor:
        """Logits [M, B, C] of the models `indices` (default: all), run by `ensemble` (default: all of them)."""
        ensemble = ensemble or self.ensemble
        indices = list(range(len(self.models))) if indices is None else indices
        affines = [self._affine[i] for i in indices]
        if all(a is None for a in affines):
            return ensemble(x)
        return ensemble([x if a is None else x * a[0] + a[1] for a in affines])

    def logits(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """Teacher logits [M, B, C] for a batch of normalised student inputs (a plain tensor, not an inference one).

        From the cache when one is attached and the batch says which banked view each image shows."""
        if self.cache is not None and isinstance(batch, Batch) and batch.view_ids is not None:
            index = batch.index.to(self.cache.device)
            return self.cache[:, index, batch.view_ids.to(self.cache.device)].float()
        if self.mode == "train" and isinstance(batch, Batch):  # a student's batch, as the released code runs it
            for model in self.models:
                model.train()
            try:
                return self._forward(batch.x)
            finally:
                for model in self.models:
                    model.eval()
        return self._forward(batch.x if isinstance(batch, Batch) else batch)

    def forward_of(self, indices: list[int]):
        """The forward of the models `indices` alone: normalised images -> their logits [len(indices), B, C]."""
        subset = self._ensemble_of([self.models[i] for i in indices])
        return lambda x: self._forward(x, subset, indices)

    def attach_cache(self, data: Data, *, views: int, cache_dir: str | Path | None = None,
                     batch_size: int | None = None) -> dict:
        """Answer from now on from a bank of `views` views of every training image and each model's logits on them
        (`cache.load_or_build`: read, or built once and saved)."""
        started = time.perf_counter()
        self.cache, self.view_bank, paths, built = cache_mod.load_or_build(self, data, views=views,
                                                                           cache_dir=cache_dir, batch_size=batch_size)
        views, images = int(self.view_bank.shape[1]), int(self.view_bank.shape[0])
        self.cache_info = {"views": views, "built": built, "reused": len(self.models) - built,
                           "seconds": round(time.perf_counter() - started, 3), "files": [str(p) for p in paths]}
        if not self.quiet:
            tqdm.write(f"teacher cache: {views} views x {images} images, built {built}, reused "
                       f"{len(self.models) - built} ({self.cache_info['seconds']} s)", file=sys.stderr)
        return self.cache_info

    @torch.inference_mode()
    def _accuracy(self, data: Data, split: str) -> list[float]:
        """Accuracy of each model, then of the ensemble (mean of softmax outputs), on one split."""
        correct = torch.zeros(len(self.models) + 1, dtype=torch.int64)
        count = 0
        for x, y in data.eval_batches(split, 512):
            logits = self._forward(x)
            correct[:-1] += (logits.argmax(-1) == y).sum(dim=1).cpu()
            correct[-1] += (logits.softmax(-1).mean(0).argmax(-1) == y).sum().cpu()
            count += len(y)
        return (correct.double() / count).tolist()

    def measure(self, data: Data) -> None:
        """Validation accuracy is logged so a wrong checkpoint shows at once; test accuracy is only recorded.

        A single checkpoint evaluated on the very split it was trained with already has both numbers in its manifest.
        """
        recorded = self._recorded_accuracy(data)
        key = (tuple(c.sha256 for c in self.checkpoints), data.fingerprint, tuple(data.mean.tolist()),
               tuple(data.std.tolist()), tuple(sorted(self.numerics.items())), data.device.type)
        if recorded is not None:
            val, test = recorded
        elif key in _MEASURED:
            val, test = _MEASURED[key]
        else:
            val, test = self._accuracy(data, "val"), self._accuracy(data, "test")
            _MEASURED[key] = (val, test)
        self.val_acc, self.test_acc = val[:-1], test[:-1]
        self.ensemble_acc = {"val_acc": val[-1], "test_acc": test[-1]}
        if not self.quiet:
            for ckpt, acc in zip(self.checkpoints, self.val_acc):
                tqdm.write(f"teacher {ckpt.reference}: val acc {acc:.4f}", file=sys.stderr)
            if len(self.models) > 1:
                tqdm.write(f"teacher ensemble of {len(self.models)}: val acc {val[-1]:.4f}", file=sys.stderr)

    def _recorded_accuracy(self, data: Data) -> tuple[list[float], list[float]] | None:
        if len(self.checkpoints) != 1 or self._affine[0] is not None:
            return None
        ckpt = self.checkpoints[0]
        metrics = ckpt.metrics
        if ckpt.manifest.data.get("fingerprint") != data.fingerprint or "test_acc" not in metrics:
            return None
        return [metrics["val_acc"]] * 2, [metrics["test_acc"]] * 2

    def summary(self) -> dict:
        summary = {"size": len(self.models), **self.ensemble_acc, **self.numerics}
        if self.cache_info is not None:
            summary["cache"] = {k: v for k, v in self.cache_info.items() if k != "files"}
        return summary

    def describe(self) -> list[dict]:
        described = []
        for i, ckpt in enumerate(self.checkpoints):
            described.append({"reference": ckpt.reference, "sha256": ckpt.sha256, "epoch": ckpt.epoch,
                              "fraction": ckpt.fraction, "model": ckpt.manifest.model["name"],
                              "seed": ckpt.manifest.seed, "status": ckpt.manifest.status,
                              "val_acc": self.val_acc[i] if i < len(self.val_acc) else None,
                              "test_acc": self.test_acc[i] if i < len(self.test_acc) else None})
        return described
