"""Run health: a run that diverges is flagged, never silently averaged into a table.

`assess(history)` is a pure function of the per-epoch records, so a resumed run reaches the same verdict, and the
training loop calls it once per epoch for every run, alone or in a group. It flags
  non_finite_loss      the training loss became NaN or infinite (the run stops there: `check_finite`)
  loss_rising          the training loss rose in each of RISING_EPOCHS consecutive epochs, by RISING_TOTAL of where
                       it started and by at least RISING_FLOOR nats (a near-zero loss wobbling is not a divergence)
  accuracy_collapse    training accuracy fell COLLAPSE_POINTS or more below its best so far
and `check_finite` stops a run whose loss is NaN or infinite before anything of that epoch is saved.
"""

from __future__ import annotations

import math

from ..errors import UserError

RISING_EPOCHS = 3       # consecutive epochs of rising loss ...
RISING_TOTAL = 0.10     # ... by at least this fraction of where the rise started
RISING_FLOOR = 0.02     # ... and by at least this many nats
COLLAPSE_POINTS = 0.20  # an absolute drop in training accuracy below the run's best so far


def assess(history: list[dict]) -> dict:
    """{"ok": bool, "flags": [{"flag", "epoch", "detail"}]}: each flag once, at the epoch it was first seen."""
    flags: dict[str, dict] = {}
    best_acc, best_epoch = -1.0, 0
    for i, record in enumerate(history):
        epoch = record["epoch"]
        if not math.isfinite(record["train_loss"]) and "non_finite_loss" not in flags:
            flags["non_finite_loss"] = {"flag": "non_finite_loss", "epoch": epoch, "detail": (
                f"the training loss became {record['train_loss']}; the run stopped there")}
            continue
        if i >= RISING_EPOCHS and "loss_rising" not in flags:
            window = [h["train_loss"] for h in history[i - RISING_EPOCHS:i + 1]]
            rising = all(b > a for a, b in zip(window, window[1:]))
            if rising and window[-1] >= window[0] * (1 + RISING_TOTAL) and window[-1] - window[0] >= RISING_FLOOR:
                flags["loss_rising"] = {"flag": "loss_rising", "epoch": epoch, "detail": (
                    f"training loss rose for {RISING_EPOCHS} epochs in a row, {window[0]:.4g} -> {window[-1]:.4g} "
                    f"(epochs {history[i - RISING_EPOCHS]['epoch']}-{epoch})")}
        acc = record["train_acc"]
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch
        elif best_acc - acc >= COLLAPSE_POINTS and "accuracy_collapse" not in flags:
            flags["accuracy_collapse"] = {"flag": "accuracy_collapse", "epoch": epoch, "detail": (
                f"training accuracy fell to {100 * acc:.1f}% from {100 * best_acc:.1f}% at epoch {best_epoch}")}
    return {"ok": not flags, "flags": sorted(flags.values(), key=lambda f: f["epoch"])}


def describe(health: dict) -> str:
    """One line for a log or a report; empty when the run is healthy."""
    return "; ".join(f"{f['flag']} at epoch {f['epoch']}: {f['detail']}" for f in health.get("flags", []))


class Diverged(UserError):
    """A run's training loss became NaN or infinite: the run is marked failed, the others of its group go on."""


def check_finite(record: dict, last_good: int) -> None:
    """Stop a run whose training loss is not finite: its weights are garbage from here on."""
    loss = record["train_loss"]
    if not math.isfinite(loss):
        kept = f"the last good state is epoch {last_good}" if last_good else "nothing was saved"
        raise Diverged(f"epoch {record['epoch']}: the training loss is {loss}; the run stops and is marked failed "
                        f"({kept}). Lower optim.lr or add schedule.warmup_epochs, then start a new run")
