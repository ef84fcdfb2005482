"""Where a run's progress goes besides its folder: a progress bar and log lines on stderr, and the experiment trackers
of `log.report_to` (tensorboard, mlflow, wandb; `log.tensorboard: true` is the same as listing tensorboard).

metrics.jsonl (written by the run folder's owner) stays the source of truth; everything here is a view of it. Each
tracker gets the resolved config as hyper-parameters, every epoch's numbers, each checkpoint's sha256 and the final
numbers. A tracker package is imported only when asked for. Trackers keep no state in the run folder: a resumed run
finds its MLflow run again by the tag `ckptkd.folder` and its wandb run by an id derived from the folder's path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Iterable

from . import health as health_mod
from ..config import flatten
from ..errors import UserError

# Reading the loss makes a GPU wait for the host, so the bar shows it every this many steps, not every step.
_BAR_EVERY = 16


def _flat(cfg: dict) -> dict:
    """The config as hyper-parameters: dotted keys, lists and nulls as JSON text."""
    return {key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            for key, value in flatten(cfg).items()}


def _scalars(record: dict) -> dict:
    return {k: float(v) for k, v in record.items() if k not in ("epoch", "step") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, cfg: dict, folder: Path, history: list[dict] | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        if not history:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat(cfg).items()))

    def epoch(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["epoch"])

    def checkpoint(self, epoch: int, path: str, sha256: str) -> None:
        self.writer.add_text("checkpoints", f"{path} sha256 {sha256}", epoch)

    def finished(self, final: dict) -> None:
        for key, value in _scalars(final).items():
            self.writer.add_scalar(f"final/{key}", value, final.get("epoch", 0))

    def close(self, completed: bool) -> None:
        self.writer.close()


class _MLflow:
    """The tracking URI and experiment come from MLflow's own settings (MLFLOW_TRACKING_URI, e.g.
    sqlite:///mlflow.db, and MLFLOW_EXPERIMENT_NAME); without them, MLflow's default store and the experiment
    "ckptkd"."""

    def __init__(self, cfg: dict, folder: Path, history: list[dict] | None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ckptkd")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        where = str(folder.resolve())
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`ckptkd.folder` = '{where}'",
                                        max_results=1) if history else []
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            # A kill between the run folder's epoch and ours loses that epoch here: send what MLflow lacks.
            logged = {m.step for m in self.client.get_metric_history(self.run_id, "val_acc")}
            for record in history:
                if record["epoch"] not in logged:
                    self.epoch(record)
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=cfg["name"],
                                                 tags={"ckptkd.folder": where}).info.run_id
            for key, value in _flat(cfg).items():
                self.client.log_param(self.run_id, key, str(value)[:6000])

    def epoch(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.client.log_metric(self.run_id, key, value, step=record["epoch"])

    def checkpoint(self, epoch: int, path: str, sha256: str) -> None:
        self.client.set_tag(self.run_id, f"checkpoint.{Path(path).stem}.sha256", sha256)

    def finished(self, final: dict) -> None:
        for key, value in _scalars(final).items():
            self.client.log_metric(self.run_id, f"final.{key}", value)

    def close(self, completed: bool) -> None:
        # An interrupted or failed run is KILLED in MLflow; `--resume` finds it again and sets it RUNNING.
        self.client.set_terminated(self.run_id, status="FINISHED" if completed else "KILLED")


class _Wandb:
    """Project and mode come from wandb's own settings (WANDB_PROJECT, WANDB_MODE=offline, ...)."""

    def __init__(self, cfg: dict, folder: Path, history: list[dict] | None):
        import wandb

        run_id = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ckptkd"), name=cfg["name"], id=run_id,
                              resume="allow", config=_flat(cfg), dir=str(folder), reinit="create_new")

    def epoch(self, record: dict) -> None:
        self.run.log({**_scalars(record), "epoch": record["epoch"]})

    def checkpoint(self, epoch: int, path: str, sha256: str) -> None:
        self.run.summary[f"checkpoint.{Path(path).stem}.sha256"] = sha256

    def finished(self, final: dict) -> None:
        for key, value in _scalars(final).items():
            self.run.summary[f"final.{key}"] = value

    def close(self, completed: bool) -> None:
        self.run.finish(exit_code=0 if completed else 1)


_TRACKER_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


def _trackers(cfg: dict, folder: Path, history: list[dict] | None) -> list:
    """The trackers of `cfg`, started; `history`: the epochs a resumed run already has (None for a new run)."""
    names = list(cfg["log"]["report_to"])
    setting = cfg["log"]["tensorboard"]
    if "tensorboard" not in names and setting is not False and (
            setting is True or importlib.util.find_spec("tensorboard") is not None):
        names.append("tensorboard")  # log.tensorboard: auto writes event files whenever tensorboard is installed
    # Every name was checked when the config was validated (`check_trackers`), and auto only adds one found above.
    trackers = []
    for name in dict.fromkeys(names):
        try:
            trackers.append(_TRACKER_CLASSES[name](cfg, folder, history))
        except Exception as e:  # a tracker's own configuration problem (its store, its login): one line, exit 2
            reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise UserError(f"log.report_to: {name} could not start ({reason})") from None
    return trackers


class RunLog:
    """The terminal and tracker side of one run. `quiet` silences the terminal (a study worker, torchrun ranks > 0);
    `writes` is False on ranks that write nothing."""

    def __init__(self, cfg: dict, folder: Path, *, quiet: bool, writes: bool):
        self.folder, self.quiet = folder, quiet
        self.epochs = cfg["schedule"]["epochs"]
        # tqdm's disable=None hides the bar when output is not a terminal.
        self.bar_disabled = True if quiet else {"auto": None, True: False, False: True}[cfg["log"]["progress"]]
        self.cfg, self.writes = cfg, writes
        self.trackers: list = []
        self._flagged: set[str] = set()

    def say(self, message: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def started(self, history: list[dict] | None) -> None:
        """`history`: the epochs a resumed run already has; None (or empty) for a run that starts now."""
        if history:
            self.say(f"resuming {self.folder} after epoch {history[-1]['epoch']} of {self.epochs}")
        if self.writes:
            self.trackers = _trackers(self.cfg, self.folder, history or None)

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

    def epoch(self, record: dict, checkpoint, health: dict) -> None:
        """A line per saved checkpoint (`checkpoint`: its manifest entry), and one when a health flag first appears;
        the numbers to every tracker."""
        if checkpoint is not None:
            self.say(f"epoch {record['epoch']:>4}/{self.epochs}  loss {record['train_loss']:.4f}  "
                     f"train {record['train_acc']:.4f}  val {record['val_acc']:.4f}  test {record['test_acc']:.4f}"
                     f"  -> {self.folder / checkpoint.path}")
        for flag in health["flags"]:
            if flag["flag"] not in self._flagged:
                self._flagged.add(flag["flag"])
                self.say(f"warning: {self.folder}: {health_mod.describe({'flags': [flag]})}; this run may be "
                         "diverging (try a lower optim.lr or schedule.warmup_epochs)")
        for tracker in self.trackers:
            tracker.epoch(record)
            if checkpoint is not None:
                tracker.checkpoint(record["epoch"], checkpoint.path, checkpoint.sha256)

    def finished(self, final: dict) -> None:
        """The run completed: the trackers get its final numbers and are closed as finished."""
        for tracker in self.trackers:
            tracker.finished(final)
        self.close(completed=True)

    def close(self, completed: bool = False) -> None:
        """Close the trackers, once (`fit` calls this after `finished` too); not completed: interrupted or failed."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(completed)
