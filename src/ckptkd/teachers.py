"""Frozen teachers built from checkpoint references: one checkpoint, a snapshot ensemble, a full ensemble, any mix.

A teacher never trains: its models stay in eval mode (BatchNorm statistics untouched), take no gradients and run
under inference mode. Each model sees its inputs normalised the way it was trained, whatever the student's data
statistics are.

With a cache, a teacher answers from a bank of its own outputs: for every training image, V augmented views (all of
them when the augmentation has at most V outcomes) and each model's logits on them, stored as float16 safetensors
keyed by the model's sha256, the data fingerprint and the augmentation settings. Students then draw each image's view
from that bank, so the student trains on exactly the image the teacher saw (cf. Shen & Xing, ECCV 2022), and an
ensemble costs a table lookup instead of M forwards per batch.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .data import Batch, Data
from .data.augment import apply_views
from .ensemble import EnsembleForward, fold_batchnorm
from .errors import UserError
from .run import Checkpoint, resolve_all
from .storage import read_tensors, remove_stale_temporaries, save_tensors

# Bump when the bank or the stored logits change meaning, so old cache files are not reused.
CACHE_VERSION = 2


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
        self.models = [c.build_model("cpu") for c in checkpoints]  # sha256 verified while loading
        for model in self.models:
            model.eval()
            model.requires_grad_(False)
            if mode == "eval":
                fold_batchnorm(model)
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
                        autocast: str = "none", allow_incomplete: bool = False, mode: str = "eval") -> "Teacher":
        """`allow_incomplete`: accept runs that did not complete (interrupted, failed), which are refused otherwise."""
        return cls(resolve_all(references, allow_incomplete=allow_incomplete), quiet=quiet,
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

    def prepare(self, data: Data, *, cache: dict | None = None, quiet: bool = False) -> "Teacher":
        """Everything a teacher needs before a student's first step, in one call: check it fits the data, move it
        to the data's device, match each model's input normalisation, measure its accuracy, and attach the output
        cache (`cache`: {"views", "cache_dir"}; None runs the teacher online). Under torchrun rank 0 builds the
        cache files while the other ranks wait, then reads them."""
        self.quiet = self.quiet or quiet
        self.check_compatible(data)
        self.to(data.train_x.device)
        self.match_normalisation(data)
        self.measure(data)
        if cache is not None and self.mode == "train":
            cache = None  # train-mode outputs depend on the batch they are computed in: there is nothing to cache
        if cache is not None:
            if distributed.is_main():
                self.attach_cache(data, **cache)
            distributed.barrier()
            if not distributed.is_main():
                self.attach_cache(data, **cache)
        return self

    def check_compatible(self, data: Data) -> None:
        channels, height, width = data.image_shape
        for ckpt in self.checkpoints:
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

    def match_normalisation(self, data: Data) -> None:
        """Each model sees its inputs normalised with the statistics it was trained with, whatever the data's are."""
        for i, ckpt in enumerate(self.checkpoints):
            trained = ckpt.manifest.data
            mean_t = torch.tensor(trained["mean"], dtype=torch.float32)
            std_t = torch.tensor(trained["std"], dtype=torch.float32)
            if torch.allclose(mean_t, data.mean, atol=1e-6) and torch.allclose(std_t, data.std, atol=1e-6):
                continue
            # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t, folded into one scale and shift.
            scale = (data.std / std_t).view(1, -1, 1, 1).to(data.val_x.device)
            shift = ((data.mean - mean_t) / std_t).view(1, -1, 1, 1).to(data.val_x.device)
            self._affine[i] = (scale, shift)

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

    def attach_cache(self, data: Data, *, views: int, cache_dir: str | Path | None = None,
                     batch_size: int | None = None) -> dict:
        """Load (or build once and save) each model's logits on a bank of views of every training image."""
        started = time.perf_counter()
        if batch_size is None:
            # Large batches amortise per-layer overhead, which dominates on small images (a folded, channels-last
            # resnet20 on 8x8: 1.6x faster per image at 2048 than at 64); ~2M input values per batch keeps
            # activations to tens of MB.
            batch_size = max(256, min(4096, (1 << 21) // max(1, data.train_x[0].numel())))
        bank = data.view_bank(views)
        settings = {"version": CACHE_VERSION, "data": data.fingerprint, "pad": data.pad, "hflip": data.hflip,
                    "augment": data.augment, "views": int(bank.shape[1]), "images": int(bank.shape[0]),
                    "classes": data.num_classes, **self.numerics}
        settings_text = json.dumps(settings, sort_keys=True)
        paths, tables, missing = [], [None] * len(self.models), []
        folders = [Path(cache_dir) if cache_dir is not None else ckpt.run / "cache" for ckpt in self.checkpoints]
        for folder in dict.fromkeys(folders):  # once each
            remove_stale_temporaries(folder, shared=True)  # what a killed build left; others may be building now
        for i, (ckpt, folder) in enumerate(zip(self.checkpoints, folders)):
            key = hashlib.sha256((ckpt.sha256 + settings_text).encode()).hexdigest()[:32]
            path = folder / f"logits-{key}.safetensors"
            paths.append(path)
            tables[i] = _read_cache(path, settings, ckpt.sha256)
            if tables[i] is None:
                missing.append(i)
        if missing:
            built = self._build_cache(data, bank, missing, batch_size)
            for i, table in zip(missing, built):
                save_tensors(paths[i], {"logits": table}, metadata={**settings, "teacher_sha256":
                                                                    self.checkpoints[i].sha256,
                                                                    "teacher": self.checkpoints[i].reference})
                tables[i] = table
        device = data.train_x.device
        self.cache = torch.stack(tables).to(device)
        self.view_bank = bank
        self.cache_info = {"views": settings["views"], "built": len(missing), "reused": len(self.models) - len(missing),
                           "seconds": round(time.perf_counter() - started, 3), "files": [str(p) for p in paths]}
        if not self.quiet:
            tqdm.write(f"teacher cache: {settings['views']} views x {settings['images']} images, built "
                       f"{len(missing)}, reused {len(self.models) - len(missing)} ({self.cache_info['seconds']} s)",
                       file=sys.stderr)
        return self.cache_info

    def _build_cache(self, data: Data, bank: torch.Tensor, models: list[int], batch_size: int) -> list[torch.Tensor]:
        n, v = bank.shape[:2]
        tables = torch.empty(len(models), n, v, data.num_classes, dtype=torch.float16)
        subset = self._ensemble_of([self.models[i] for i in models])
        bar = tqdm(total=n * v, desc="teacher cache", unit="img", leave=False, disable=True if self.quiet else None,
                   file=sys.stderr)
        for view in range(v):
            for start in range(0, n, batch_size):
                end = min(n, start + batch_size)
                x = apply_views(data.train_x[start:end], bank[start:end, view], pad=data.pad)
                logits = self._forward(data.normalize(x), subset, models)
                tables[:, start:end, view] = logits.to("cpu", torch.float16)
                bar.update(end - start)
        bar.close()
        return list(tables)

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
               tuple(data.std.tolist()), tuple(sorted(self.numerics.items())), data.val_x.device.type)
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


def _read_cache(path: Path, settings: dict, teacher_sha256: str) -> torch.Tensor | None:
    """A cache file's table if it exists and was built for exactly this teacher and these settings, else None (it
    is then built). A damaged file is refused, naming it: a teacher's outputs are never read from one."""
    if not path.is_file():
        return None
    tensors, meta = read_tensors(path, what="teacher cache", remedy="delete it; it is built again on the next run")
    if meta.get("teacher_sha256") != teacher_sha256 or any(meta.get(k) != v for k, v in settings.items()):
        return None  # built for other settings (an older cache version): build it anew
    table = tensors.get("logits")
    if table is None:
        return None
    if table.dtype != torch.float16 or tuple(table.shape) != (settings["images"], settings["views"],
                                                              settings["classes"]):
        return None
    return table
