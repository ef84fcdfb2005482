"""Where a run's progress goes besides its folder: a progress bar and log lines on stderr, TensorBoard event files.

metrics.jsonl (written by the run folder's owner) stays the source of truth; everything here is a view of it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

from . import health as health_mod
from .errors import UserError

# Reading the loss makes a GPU wait for the host, so the bar shows it every this many steps, not every step.
_BAR_EVERY = 16


def _tensorboard(setting, folder: Path):
    if setting is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if setting is True:
            raise UserError("config: log.tensorboard=true but the tensorboard package is not installed "
                            "(pip install 'ckptkd[track]')") from None
        return None
    return SummaryWriter(log_dir=str(folder / "tensorboard"))


class RunLog:
    """The terminal and tracker side of one run. `quiet` silences the terminal (a study worker, torchrun ranks > 0);
    `writes` is False on ranks that write nothing."""

    def __init__(self, cfg: dict, folder: Path, *, quiet: bool, writes: bool):
        self.folder, self.quiet = folder, quiet
        self.epochs = cfg["schedule"]["epochs"]
        # tqdm's disable=None hides the bar when output is not a terminal.
        self.bar_disabled = True if quiet else {"auto": None, True: False, False: True}[cfg["log"]["progress"]]
        self.tensorboard = _tensorboard(cfg["log"]["tensorboard"], folder) if writes else None
        self._flagged: set[str] = set()

    def say(self, message: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def started(self, resumed_from: int | None) -> None:
        if resumed_from:
            self.say(f"resuming {self.folder} after epoch {resumed_from} of {self.epochs}")

    def bar(self, batches: Iterable, epoch: int, steps: int):
        """The epoch's batches behind a progress bar, and the per-step callback that updates it."""
        from tqdm import tqdm

        bar = tqdm(batches, total=steps, desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=self.bar_disabled,
                   dynamic_ncols=True, file=sys.stderr)
        step = [0]

        def on_step(loss, lr):
            step[0] += 1
            if not bar.disable and step[0] % _BAR_EVERY == 1:
                bar.set_postfix(loss=f"{loss.detach().item():.3f}", lr=f"{lr:.3g}")

        return bar, on_step

    def epoch(self, record: dict, checkpoint: str | None, health: dict) -> None:
        """A line per saved checkpoint, and one when a health flag first appears; scalars to TensorBoard."""
        if checkpoint is not None:
            self.say(f"epoch {record['epoch']:>4}/{self.epochs}  loss {record['train_loss']:.4f}  "
                     f"train {record['train_acc']:.4f}  val {record['val_acc']:.4f}  test {record['test_acc']:.4f}"
                     f"  -> {self.folder / checkpoint}")
        for flag in health["flags"]:
            if flag["flag"] not in self._flagged:
                self._flagged.add(flag["flag"])
                self.say(f"warning: {self.folder}: {health_mod.describe({'flags': [flag]})}; this run may be "
                         "diverging (try a lower optim.lr or schedule.warmup_epochs)")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["epoch"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
