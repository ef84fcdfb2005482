"""Checkpoint references: `RUN`, `RUN@0.5`, `RUN@epoch=30`, `RUN@0.3,0.5,0.7`, `RUN@best-val`, `RUN@best-info`, ...

Every command resolves references through `resolve`, so the grammar and its error messages live in one place.
A run that has not completed is refused unless the caller allows it (`--allow-incomplete`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..errors import UserError
from ..config import epoch_at_fraction
from .folder import Run
from .manifest import Manifest
from .paths import split_reference


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint of one run, as a reference names it."""
    run: Path
    epoch: int
    fraction: float
    path: Path
    sha256: str
    reference: str
    manifest: Manifest

    @property
    def metrics(self) -> dict:
        return self.manifest.checkpoint(self.epoch).metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        from .storage import load_tensors

        return load_tensors(self.path, expected_sha256=self.sha256,
                            remedy=f"restore it from a copy of {self.run}, or train the run again "
                                   "(`ckptkd verify` lists every damaged file)")

    def build_model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        from ..models import from_spec

        model = from_spec(self.manifest.model)
        try:
            model.load_state_dict(self.state_dict())
        except RuntimeError as e:
            raise UserError(f"{self.reference}: weights do not fit model {self.manifest.model['name']!r}: "
                            f"{str(e).splitlines()[0]}") from None
        return model.to(device)


SELECTORS = "use last, all, epoch=N, a fraction like 0.5, a list like 0.3,0.5,0.7, best-val, best-info or top-info:K"


def available(manifest: Manifest) -> str:
    epochs = [c.epoch for c in manifest.checkpoints]
    total = manifest.epochs
    return "saved epochs: " + ", ".join(f"{e} ({e / total:.2g})" for e in epochs) if epochs else "no checkpoints saved"


def check_usable(run: Run, manifest: Manifest, text: str, allow_incomplete: bool) -> None:
    """Refuse a run that did not complete (interrupted, diverged, still running) unless the caller allows it."""
    if manifest.complete or allow_incomplete:
        return
    done = max((c.epoch for c in manifest.checkpoints), default=0)
    why = f": {manifest.error}" if manifest.error else ""
    raise UserError(f"{text}: run {run.path} is {manifest.status} (last checkpoint at epoch {done} of "
                    f"{manifest.epochs}{why}); finish it with --resume, or pass --allow-incomplete to use it anyway")


def resolve(text: str, *, allow_incomplete: bool = False, base: str | Path | None = None) -> list[Checkpoint]:
    """One reference -> the checkpoints it names (several for `@0.3,0.5,0.7` or `@top-info:K`). A relative run path
    is taken relative to `base` when given (a study's student names its teachers relative to its own folder), else
    to the working directory."""
    path, spec = split_reference(text)
    if base is not None and not path.is_absolute():
        path = Path(os.path.normpath(Path(base) / path))  # lexically: `base` need not exist yet
    run = Run(path)
    if not path.exists() and "@" in text and (Path(base or ".") / text.rsplit("@", 1)[0]).is_dir():  # bad selector
        raise UserError(f"{text}: unknown selector {text.rsplit('@', 1)[1]!r} ({SELECTORS})")
    manifest = run.manifest
    check_usable(run, manifest, text, allow_incomplete)
    by_epoch = {c.epoch: c for c in manifest.checkpoints}
    total = manifest.epochs

    def pick(epoch: int) -> Checkpoint:
        if epoch not in by_epoch:
            raise UserError(f"{text}: no checkpoint at epoch {epoch} ({available(manifest)})")
        entry = by_epoch[epoch]
        return Checkpoint(run=path, epoch=epoch, fraction=entry.fraction, path=path / entry.path,
                          sha256=entry.sha256, reference=f"{path}@epoch={epoch}", manifest=manifest)

    if not by_epoch:
        raise UserError(f"{text}: run {path} has no checkpoints yet (status {manifest.status})")
    if spec == "last":
        return [pick(max(by_epoch))]
    if spec == "all":
        return [pick(e) for e in sorted(by_epoch)]
    if spec == "best-val":
        best = max(by_epoch.values(), key=lambda c: (c.metrics.get("val_acc", -1.0), c.epoch))
        return [pick(best.epoch)]
    if m := re.fullmatch(r"epoch=(\d+)", spec):
        return [pick(int(m.group(1)))]
    if spec == "best-info":
        return [pick(run.ranking(text)[0])]
    if m := re.fullmatch(r"top-info:(\d+)", spec):
        k = int(m.group(1))
        ranking = run.ranking(text)
        if not 1 <= k <= len(ranking):
            raise UserError(f"{text}: K must be between 1 and {len(ranking)} (the analysed checkpoints)")
        return [pick(epoch) for epoch in ranking[:k]]
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
    raise UserError(f"{text}: unknown selector {spec!r} ({SELECTORS})")


def resolve_all(references: Iterable[str], *, allow_incomplete: bool = False,
                base: str | Path | None = None) -> list[Checkpoint]:
    """Every checkpoint the references name, in order. A checkpoint named twice (`RUN@0.5,0.5`, or `RUN@0.5` beside
    `RUN@epoch=30`) is refused: it would silently count twice in the ensemble's average."""
    picked: list[Checkpoint] = []
    named_by: dict[tuple[Path, int], str] = {}
    for ref in references:
        for checkpoint in resolve(ref, allow_incomplete=allow_incomplete, base=base):
            key = (checkpoint.run.resolve(), checkpoint.epoch)
            if key in named_by:
                also = "" if named_by[key] == ref else f" (also named by {named_by[key]})"
                raise UserError(f"{ref}: names checkpoint {checkpoint.reference} twice{also}; an ensemble takes "
                                "each checkpoint once")
            named_by[key] = ref
            picked.append(checkpoint)
    return picked
