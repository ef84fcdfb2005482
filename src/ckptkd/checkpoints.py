"""Run directories, their manifest, and checkpoint references (`RUN@0.5`, `RUN@epoch=30`, `RUN@best-info`, ...).

Every command resolves references through `resolve`, so the grammar and its error messages live in one place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from . import models
from .errors import UserError
from .storage import load_tensors, read_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def epoch_at_fraction(fraction: float, epochs: int) -> int:
    """The epoch a fraction of training names: rounded half up, never below 1."""
    return max(1, min(epochs, math.floor(fraction * epochs + 0.5)))


def checkpoint_path(epoch: int) -> str:
    return f"checkpoints/epoch-{epoch:04d}.safetensors"


def load_manifest(run: str | Path) -> dict:
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    path = run / MANIFEST
    if not path.is_file():
        raise UserError(f"{run} is not a ckptkd run (no {MANIFEST})")
    manifest = read_json(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "checkpoints" not in manifest:
        raise UserError(f"{path} is not a ckptkd manifest (format {MANIFEST_FORMAT})")
    return manifest


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint of one run, as a reference names it."""
    run: Path
    epoch: int
    fraction: float
    path: Path
    sha256: str
    reference: str
    manifest: dict

    @property
    def metrics(self) -> dict:
        return next(c["metrics"] for c in self.manifest["checkpoints"] if c["epoch"] == self.epoch)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.path, expected_sha256=self.sha256)

    def build_model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        model = build_model(self.manifest["model"])
        state = self.state_dict()
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{self.reference}: weights do not fit model {self.manifest['model']['name']!r}: "
                            f"{str(e).splitlines()[0]}") from None
        return model.to(device)


def build_model(spec: dict) -> torch.nn.Module:
    """A fresh model from a manifest's `model` entry (name, classes, channels, image size, constructor kwargs)."""
    return models.create(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                         image_size=tuple(spec["image_size"]) if spec.get("image_size") else None,
                         **spec.get("kwargs", {}))


def split_reference(text: str) -> tuple[Path, str]:
    # A path may itself contain '@'; the selector is whatever follows the last one, if it looks like a selector.
    if "@" in text:
        run, spec = text.rsplit("@", 1)
        if run and re.fullmatch(r"[\w.,=:\-]+", spec):
            return Path(run), spec
    return Path(text), "last"


def _available(manifest: dict) -> str:
    epochs = [c["epoch"] for c in manifest["checkpoints"]]
    total = manifest["epochs"]
    return "saved epochs: " + ", ".join(f"{e} ({e / total:.2g})" for e in epochs) if epochs else "no checkpoints saved"


def _analysis_ranking(run: Path, text: str) -> list[dict]:
    path = run / "analysis.json"
    if not path.is_file():
        raise UserError(f"{text}: {run} has not been analysed; run `ckptkd analyze {run}` first")
    analysis = read_json(path, "analysis")
    ranking = analysis.get("ranking")
    if not ranking:
        raise UserError(f"{text}: {path} has no ranking; rerun `ckptkd analyze {run}`")
    return ranking


def resolve(text: str) -> list[Checkpoint]:
    """One reference -> the checkpoints it names (several for `@0.3,0.5,0.7` or `@top-info:K`)."""
    run, spec = split_reference(text)
    manifest = load_manifest(run)
    by_epoch = {c["epoch"]: c for c in manifest["checkpoints"]}
    total = manifest["epochs"]

    def pick(epoch: int) -> Checkpoint:
        if epoch not in by_epoch:
            raise UserError(f"{text}: no checkpoint at epoch {epoch} ({_available(manifest)})")
        entry = by_epoch[epoch]
        return Checkpoint(run=run, epoch=epoch, fraction=entry["fraction"], path=run / entry["path"],
                          sha256=entry["sha256"], reference=f"{run}@epoch={epoch}", manifest=manifest)

    if not by_epoch:
        raise UserError(f"{text}: run {run} has no checkpoints yet (status {manifest.get('status')})")
    if spec == "last":
        return [pick(max(by_epoch))]
    if spec == "all":
        return [pick(e) for e in sorted(by_epoch)]
    if spec == "best-val":
        best = max(by_epoch.values(), key=lambda c: (c["metrics"].get("val_acc", -1.0), c["epoch"]))
        return [pick(best["epoch"])]
    if m := re.fullmatch(r"epoch=(\d+)", spec):
        return [pick(int(m.group(1)))]
    if spec == "best-info":
        return [pick(_analysis_ranking(run, text)[0]["epoch"])]
    if m := re.fullmatch(r"top-info:(\d+)", spec):
        k = int(m.group(1))
        ranking = _analysis_ranking(run, text)
        if not 1 <= k <= len(ranking):
            raise UserError(f"{text}: K must be between 1 and {len(ranking)} (the analysed checkpoints)")
        return [pick(r["epoch"]) for r in ranking[:k]]
    if re.fullmatch(r"[0-9.]+(,[0-9.]+)*", spec):
        picked = []
        for part in spec.split(","):
            try:
                fraction = float(part)
            except ValueError:
                fraction = -1.0
            if not 0.0 < fraction <= 1.0:
                raise UserError(f"{text}: {part!r} is not a fraction of training in (0, 1]")
            picked.append(pick(epoch_at_fraction(fraction, total)))
        return picked
    raise UserError(f"{text}: unknown selector {spec!r} (use last, all, epoch=N, a fraction like 0.5, a list like "
                    f"0.3,0.5,0.7, best-val, best-info or top-info:K)")


def resolve_all(references: Iterable[str]) -> list[Checkpoint]:
    picked: list[Checkpoint] = []
    for ref in references:
        picked.extend(resolve(ref))
    return picked


def describe(checkpoints: list[Checkpoint]) -> list[dict[str, Any]]:
    return [{"reference": c.reference, "epoch": c.epoch, "fraction": c.fraction, "sha256": c.sha256,
             "model": c.manifest["model"]["name"], "seed": c.manifest.get("seed")} for c in checkpoints]
