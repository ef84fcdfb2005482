"""Learning-rate schedules as pure functions of the global step.

Because the rate is computed from the step alone, resuming needs no scheduler state, and the lr recorded with a
checkpoint is exactly the one its last step used.
"""

from __future__ import annotations

import math

from ..config import epoch_at_fraction


def milestone_epochs(milestones: list, epochs: int) -> list[int]:
    return sorted(m if isinstance(m, int) else epoch_at_fraction(m, epochs) for m in milestones)


def cycle_ends(epochs: int, cycles: int) -> list[int]:
    """The epochs at which each snapshot cycle ends (the last one is the final epoch)."""
    return sorted({max(1, round(epochs * c / cycles)) for c in range(1, cycles + 1)})


def lr_at(sched: dict, base_lr: float, step: int, steps_per_epoch: int) -> float:
    """The rate for 0-based optimisation step `step`."""
    epochs = sched["epochs"]
    total = epochs * steps_per_epoch
    warmup = sched["warmup_epochs"] * steps_per_epoch
    if step < warmup:
        return base_lr * (step + 1) / warmup
    epoch = step // steps_per_epoch  # 0-based epoch being trained
    name, low = sched["name"], sched["min_lr"]
    if name == "constant":
        return base_lr
    if name == "step":
        return base_lr * sched["gamma"] ** (epoch // sched["step_size"])
    if name == "multistep":
        passed = sum(epoch >= m for m in milestone_epochs(sched["milestones"], epochs))
        return base_lr * sched["gamma"] ** passed
    if name == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return low + (base_lr - low) * 0.5 * (1.0 + math.cos(math.pi * t))
    if name == "snapshot":
        # Huang et al. 2017: a cosine from base_lr towards ~0 within each cycle, restarting at each cycle's start.
        ends = cycle_ends(epochs, sched["cycles"])
        start = 0
        for end in ends:
            if epoch < end:
                break
            start = end
        t = (step - start * steps_per_epoch) / ((end - start) * steps_per_epoch)
        return low + (base_lr - low) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {name!r}")


def checkpoint_epochs(cfg: dict) -> list[int]:
    epochs = cfg["schedule"]["epochs"]
    chosen = {epoch_at_fraction(f, epochs) for f in cfg["checkpoints"]["fractions"]}
    chosen.update(cfg["checkpoints"]["epochs"])
    every = cfg["checkpoints"]["every"]
    if every:
        chosen.update(range(every, epochs + 1, every))
    if cfg["schedule"]["name"] == "snapshot":
        chosen.update(cycle_ends(epochs, cfg["schedule"]["cycles"]))
    chosen.add(epochs)  # the last weights are always kept: `RUN@last` must exist
    return sorted(chosen)
