"""The run folder and its one owner.

```
RUN/
  config.yaml                          the resolved config
  manifest.json                        the typed index (`Manifest`), rewritten atomically after every epoch
  checkpoints/epoch-0030.safetensors   weights (state_dict incl. BatchNorm buffers)
  state/last.safetensors               what --resume needs (`state.Progress` + tensors); no pickle
  metrics.jsonl                        one JSON object per epoch
  .lock                                the process writing the run, while it does (`lock`)
  analysis.json, analysis-cache/, plots/   written by `ckptkd analyze` (or into its --out folder: the
                                       analysis home of a run the user cannot or will not write to)
  proxy/                               the proxy students of `ckptkd select --by proxy` (also in the analysis home)
  cache/                               teacher-output caches of this run's checkpoints
```

`Run` reads a folder; `RunWriter` is how a training run writes one; `write_run` writes a whole run at once (imports,
benchmarks). Nothing else touches these paths.

The create/resume policy: without --resume an existing, non-empty folder is refused. With --resume, a folder that
holds the resume state continues from it; a folder with no resume state is fresh, whatever else a kill left in it
(a config, an empty metrics file, a manifest temporary), so a kill at any moment, start-up included, resumes.
After every epoch the writer saves, in this order, the checkpoint (if one is due), the resume state, metrics.jsonl
and the manifest; the state is the source of truth and the other two are rewritten from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from .. import config as config_mod
from ..errors import UserError
from ..processes import slurm_job
from .analysis_file import analysis_problem
from .lock import LOCK, RunLock
from .manifest import CheckpointEntry, Final, Manifest, data_change
from .paths import same_checkpoints
from .state import Progress, load_ema, load_state, save_state
from .storage import (atomic_write_text, read_sealed_json, remove_stale_temporaries, save_tensors, shared_permissions,
                      temporary_name, write_sealed_json)

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
STATE = "state/last.safetensors"
METRICS = "metrics.jsonl"
ANALYSIS = "analysis.json"
# Everything a run (or a kill of one) may leave in its folder; anything else belongs to somebody else.
_OWNED = {CONFIG, MANIFEST, METRICS, ANALYSIS, "checkpoints", "state", "tensorboard", "analysis-cache", "plots",
          "cache", "proxy", LOCK}


def sealed_since_0_3(written: dict) -> bool:
    """Manifests and analyses written by ckptkd 0.3 and later (their `ckptkd.version`) always carry a checksum;
    older ones never did."""
    ckptkd = written.get("ckptkd")
    version = ckptkd.get("version", "0") if isinstance(ckptkd, dict) else "0"
    try:
        return tuple(int(part) for part in str(version).split(".")[:2]) >= (0, 3)
    except ValueError:
        return True  # not a version any ckptkd wrote: damaged


def checkpoint_path(epoch: int, ema: bool = False) -> str:
    return f"checkpoints/{'ema-' if ema else ''}epoch-{epoch:04d}.safetensors"


class Run:
    """A run folder, read side: its manifest, config, analysis and checkpoint references.

    `analysis_dir` is where its analysis lives (analysis.json, analysis-cache/, plots/, proxy/): the run folder
    itself unless the analysis was written elsewhere (`ckptkd analyze RUN --out DIR`), e.g. for a teacher in a
    shared, read-only folder."""

    def __init__(self, path: str | Path, analysis_dir: str | Path | None = None):
        self.path = Path(path)
        self.analysis_home = Path(analysis_dir) if analysis_dir is not None else self.path

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def manifest(self) -> Manifest:
        if not self.path.is_dir():
            # `analyze RUN@epoch=2`: the command takes a run folder, not a checkpoint reference
            folder = self.path.parent / self.path.name.split("@")[0]
            hint = (f" (this command takes a run folder; did you mean {folder}?)"
                    if "@" in self.path.name and folder.is_dir() else "")
            raise UserError(f"run folder not found: {self.path}{hint}")
        path = self.path / MANIFEST
        if not path.is_file():
            raise UserError(f"{self.path} is not a ckptkd run (no {MANIFEST})")
        raw = read_sealed_json(path, "manifest", required=sealed_since_0_3, remedy=(
            "restore it from a copy of the run, or train the run again (`ckptkd verify` lists every damaged file)"))
        return Manifest.from_dict(raw, str(path))

    @property
    def final(self) -> Final | None:
        return self.manifest.final

    def ref(self, selector: str = "last") -> str:
        return f"{self.path}@{selector}"

    def config(self) -> dict:
        return config_mod.resolve(self.path / CONFIG)

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    @property
    def plots_dir(self) -> Path:
        return self.analysis_home / "plots"

    @property
    def analysis_cache_dir(self) -> Path:
        return self.analysis_home / "analysis-cache"

    @property
    def proxy_dir(self) -> Path:
        return self.analysis_home / "proxy"

    @property
    def analysis_path(self) -> Path:
        return self.analysis_home / ANALYSIS

    def analyze_command(self) -> str:
        elsewhere = f" --out {self.analysis_home}" if self.analysis_home != self.path else ""
        return f"ckptkd analyze {self.path}{elsewhere}"

    def has_analysis(self) -> bool:
        return self.analysis_path.is_file()

    def analysis(self, what: str | None = None) -> dict:
        path = self.analysis_path
        if not path.is_file():
            elsewhere = f" in {self.analysis_home}" if self.analysis_home != self.path else ""
            raise UserError(f"{what or self.path}: {self.path} has not been analysed{elsewhere}; run "
                            f"`{self.analyze_command()}` first")
        analysis = read_sealed_json(path, "analysis", remedy=f"rerun `{self.analyze_command()}`",
                                    required=sealed_since_0_3)
        problem = analysis_problem(analysis)
        if problem:
            raise UserError(f"{path} is not a ckptkd analysis ({problem}); rerun `{self.analyze_command()}`")
        if self.analysis_home != self.path:
            # An analysis kept apart from its run could be of another run (or of this one before it was retrained).
            saved = {c.epoch: c.sha256 for c in self.manifest.checkpoints}
            other = next((c["epoch"] for c in analysis["checkpoints"]
                          if c.get("sha256") is not None and saved.get(c["epoch"]) not in (None, c["sha256"])), None)
            if other is not None:
                raise UserError(f"{path} is the analysis of another run: its epoch {other} is not the checkpoint "
                                f"{self.path} holds; analyse {self.path} into a folder of its own (`ckptkd analyze "
                                f"{self.path} --out NEW_DIR`)")
        return analysis

    def write_analysis(self, analysis: dict, plots: Path | None = None) -> Path:
        """Write analysis.json; with `plots` (a folder from `new_plots` holding its figures), publish the figures in
        the same step: the old RUN/plots/ moves aside, the new one into place, analysis.json is written, the old
        figures are removed. Plotting takes seconds and happens before any of this, so a kill leaves the previous
        analysis and its own plots (and a hidden folder the next analyze removes), not new plots beside it."""
        if plots is None:
            write_sealed_json(self.analysis_path, analysis)
            return self.analysis_path
        aside = self.analysis_home / (temporary_name(self.plots_dir) + "old.tmp")
        if self.plots_dir.exists():
            os.rename(self.plots_dir, aside)
        os.rename(plots, self.plots_dir)
        write_sealed_json(self.analysis_path, analysis)
        shutil.rmtree(aside, ignore_errors=True)
        return self.analysis_path

    @contextlib.contextmanager
    def new_plots(self):
        """A hidden folder beside RUN/plots/ to draw a new analysis' figures into (see `write_analysis`); removed
        if they are never published."""
        building = Path(tempfile.mkdtemp(prefix=temporary_name(self.plots_dir), suffix=".tmp", dir=self.analysis_home))
        try:
            shared_permissions(building, directory=True)
            yield building
        finally:
            shutil.rmtree(building, ignore_errors=True)  # gone already once published

    def ranking(self, what: str) -> list[int]:
        """Epochs best first by the information criterion, T* first (what `ckptkd analyze` selected)."""
        ranking = self.analysis(what)["ranking"]  # its entries checked by `analysis_problem`
        if not ranking:
            raise UserError(f"{what}: {self.analysis_path} has no ranking; rerun `{self.analyze_command()}`")
        return [r["epoch"] for r in ranking]


def runs_under(path: Path) -> list[Path]:
    """The run folders below `path` (e.g. the students `distill --fuse` wrote), sorted; none nested in another."""
    found = sorted(p.parent for p in path.rglob(MANIFEST)
                   if not any(q.name.startswith(".") for q in p.relative_to(path).parents))  # hidden below `path`
    return [run for run in found if not any(other in run.parents for other in found)]


def _owned_only(path: Path) -> bool:
    return all(p.name in _OWNED or (p.name.startswith(".") and p.name.endswith(".tmp")) for p in path.iterdir())


def _same_config(path: Path, cfg: dict) -> None:
    # Options added since the run started are left out at their neutral value (`config.NEUTRAL`), as in a task's
    # identity: a run started before `optim.accumulate` existed resumes.
    saved = config_mod.flatten(config_mod.identity(config_mod.read_yaml(path / CONFIG)))
    wanted = config_mod.flatten(config_mod.identity(cfg))
    changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if "kd.teachers" in changed and _same_teachers(saved["kd.teachers"], wanted["kd.teachers"], path):
        changed.remove("kd.teachers")
    if changed:
        raise UserError(f"--resume: the config differs from the one {path} was started with "
                        f"(changed: {', '.join(changed[:5])})")


def _same_teachers(saved, wanted, path: Path) -> bool:
    """Whether two teacher lists name the same checkpoints, however their paths are spelled: relative to the run
    folder (0.4) or to the working directory (0.3, or a run started from the command line)."""
    if not isinstance(saved, list) or not isinstance(wanted, list) or len(saved) != len(wanted):
        return False
    return all(isinstance(a, str) and isinstance(b, str) and same_checkpoints(a, b, (path, Path.cwd()))
               for a, b in zip(saved, wanted))


class RunWriter:
    """A training run's folder, write side. Under torchrun every rank opens one; only `writes=True` (rank 0) writes."""

    def __init__(self, run: Run, cfg: dict, *, writes: bool, resumable: bool, complete: bool):
        self.run, self.cfg, self.writes = run, cfg, writes
        self.resumable, self.complete = resumable, complete
        self.manifest: Manifest | None = None
        self.lock: RunLock | None = None

    @property
    def path(self) -> Path:
        return self.run.path

    @classmethod
    def open(cls, out: str | Path, cfg: dict, *, resume: bool, writes: bool = True) -> "RunWriter":
        """Apply the create/resume policy to `out` (see the module docstring). A writer first takes the folder's
        lock (`lock`: one writer per run folder), which it gives back with `close`; nothing else is written yet."""
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file, not a folder")
        lock = RunLock(path) if writes else None
        if lock is not None:
            lock.acquire()
        try:
            writer = cls._open(Run(path), cfg, resume=resume, writes=writes)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        writer.lock = lock
        return writer

    def close(self) -> None:
        """Give the folder's lock back (a folder this writer created and wrote nothing into is removed)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @classmethod
    def _open(cls, run: Run, cfg: dict, *, resume: bool, writes: bool) -> "RunWriter":
        path = run.path
        empty = not path.exists() or not any(p.name != LOCK for p in path.iterdir())
        if not resume:
            if not empty:
                raise UserError(f"run folder {path} already exists; use --resume to continue it or choose another "
                                "--out")
            return cls(run, cfg, writes=writes, resumable=False, complete=False)
        if empty:
            return cls(run, cfg, writes=writes, resumable=False, complete=False)
        has_state = (path / STATE).is_file()
        complete = (path / MANIFEST).is_file() and run.manifest.complete
        if has_state or complete:
            if (path / CONFIG).is_file():
                _same_config(path, cfg)
            return cls(run, cfg, writes=writes, resumable=has_state, complete=complete)
        if not _owned_only(path):
            raise UserError(f"--resume: {path} holds no ckptkd run state ({STATE}) and files that are not a run's; "
                            "it cannot be continued (choose another --out)")
        return cls(run, cfg, writes=writes, resumable=False, complete=False)  # a kill before the first state

    def restore(self, model, optimizer) -> Progress:
        """The resume state restored into model and optimizer (with the RNG states), or a fresh start's progress."""
        return load_state(self.path / STATE, model, optimizer) if self.resumable else Progress()

    def restore_ema(self) -> dict | None:
        """The averaged weights (optim.ema) the resume state holds; None for a fresh start."""
        return load_ema(self.path / STATE) if self.resumable else None

    def begin(self, manifest: Manifest, progress: Progress) -> None:
        """Write the run's first views: its config (a fresh run) and `manifest`, with the checkpoints so far. A resume
        onto other data (images added, removed or rewritten under the same data.root) is refused: its checkpoints so
        far were trained on the data its manifest names."""
        if self.resumable and progress.epoch > 0:
            self._same_data(manifest.data)
        self.manifest = manifest
        manifest.checkpoints = [CheckpointEntry(**c) for c in progress.checkpoints]
        manifest.ema_checkpoints = [CheckpointEntry(**c) for c in progress.ema_checkpoints]
        manifest.slurm_jobs = self._slurm_jobs()
        if self.writes:
            # What writes killed half-way left here; only this run's writer writes these folders (not cache/).
            for folder in (self.path, self.path / "checkpoints", self.path / "state"):
                remove_stale_temporaries(folder)
            if not self.resumable:
                self.path.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.path / CONFIG, config_mod.dump(self.cfg))
            self._write_views(progress)

    def _same_data(self, data: dict) -> None:
        try:
            saved = self.run.manifest.data
        except UserError:
            return  # the state, not a damaged manifest, is what a resume trusts
        changed = data_change(saved, data)
        if changed:
            raise UserError(f"--resume: {self.path} was trained on {changed}; resume it on the data it began with, or "
                            "train anew in another --out")

    def _slurm_jobs(self) -> list[str]:
        """The Slurm jobs that wrote this run: those of the manifest it resumes, and this process's own."""
        earlier = []
        if self.resumable and (self.path / MANIFEST).is_file():
            try:
                earlier = self.run.manifest.slurm_jobs
            except UserError:
                earlier = []  # the state, not a damaged manifest, is what a resume trusts
        job = slurm_job()
        return earlier + [job] if job and job not in earlier else earlier

    def end_epoch(self, record: dict, model, optimizer, progress: Progress, *, checkpoint: bool,
                  health: dict, ema: dict | None = None) -> CheckpointEntry | None:
        """Record a finished epoch: its checkpoint if one is due (and, with `ema`, the averaged weights' beside it),
        then the resume state, then the views. `progress` takes the epoch only once its state is on disk: a save that
        fails (a full disk, a signal) leaves `progress`, the state, the manifest and the files in agreement on the
        epoch before, and removes the checkpoints it had written (no state or manifest lists them)."""
        entry, written = None, []
        epoch = record["epoch"]
        saved = dataclasses.replace(progress)  # what the state will say; fields are replaced below, never mutated
        try:
            if checkpoint:
                entry = self._checkpoint(record, model.state_dict(), progress, written, ema=False)
                saved.checkpoints = [c for c in progress.checkpoints if c["epoch"] != epoch] + [
                    dataclasses.asdict(entry)]
                if ema is not None:
                    averaged = self._checkpoint(record, ema, progress, written, ema=True)
                    saved.ema_checkpoints = [c for c in progress.ema_checkpoints if c["epoch"] != epoch] + [
                        dataclasses.asdict(averaged)]
            saved.history = [h for h in progress.history if h["epoch"] < epoch] + [record]
            saved.epoch = epoch
            # Without optim.ema the call is the one it always was.
            save_state(self.path / STATE, model, optimizer, saved, **({} if ema is None else {"ema": ema}))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        for f in dataclasses.fields(progress):
            setattr(progress, f.name, getattr(saved, f.name))
        self.manifest.checkpoints = [CheckpointEntry(**c) for c in progress.checkpoints]
        self.manifest.ema_checkpoints = [CheckpointEntry(**c) for c in progress.ema_checkpoints]
        self.manifest.health = health
        self._write_views(progress)
        return entry

    def _checkpoint(self, record: dict, weights: dict, progress: Progress, written: list[Path], *,
                    ema: bool) -> CheckpointEntry:
        """Save one checkpoint of the epoch `record` closes (`ema`: the averaged weights, with their own metrics)."""
        epoch, path = record["epoch"], checkpoint_path(record["epoch"], ema)
        written.append(self.path / path)
        sha = save_tensors(self.path / path, weights, metadata={"epoch": epoch, "model": self.manifest.model["name"]})
        prefix = "ema_" if ema else ""
        metrics = {k: record[prefix + k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc",
                                                    "val_top5", "test_top5") if prefix + k in record}
        return CheckpointEntry(epoch=epoch, step=progress.step, fraction=round(epoch / self.manifest.epochs, 6),
                               lr=record["lr"], path=path, sha256=sha, metrics=metrics)

    def fail(self, progress: Progress, error: str, *, health: dict | None = None) -> None:
        """Mark the run failed with `error` (and its `health` verdict, where the failure changes it)."""
        self.manifest.status, self.manifest.error = "failed", error
        if health is not None:
            self.manifest.health = health
        self._write_views(progress)

    def interrupt(self, progress: Progress, why: str) -> None:
        """Mark the run interrupted: stopped on request (Ctrl-C, SIGTERM, a time limit), its last saved state kept
        for `--resume`."""
        self.manifest.status, self.manifest.error = "interrupted", why
        self._write_views(progress)

    def finish(self, progress: Progress, final: Final) -> Run:
        self.manifest.status, self.manifest.final, self.manifest.error = "complete", final, None
        self._write_views(progress)
        return self.run

    def _write_views(self, progress: Progress) -> None:
        atomic_write_text(self.path / METRICS, "".join(json.dumps(h) + "\n" for h in progress.history))
        write_sealed_json(self.path / MANIFEST, self.manifest.to_dict())


def write_run(out: str | Path, cfg: dict, manifest: Manifest, checkpoints: list[tuple[dict, dict]],
              history: list[dict] | None = None) -> Run:
    """Write a whole run at once: `checkpoints` is a list of (entry fields but path and sha256, state_dict).

    The folder is built under a hidden temporary name beside `out` and renamed into place, so it appears complete
    or not at all (an import that fails half-way leaves nothing behind).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"run folder {out} already exists; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, shared=True)  # a folder an earlier import was building when it was killed
    building = Path(tempfile.mkdtemp(prefix=temporary_name(out), suffix=".tmp", dir=out.parent))
    try:
        shared_permissions(building, directory=True)
        atomic_write_text(building / CONFIG, config_mod.dump(cfg))
        entries = []
        for fields, state in checkpoints:
            path = checkpoint_path(fields["epoch"])
            sha = save_tensors(building / path, state, metadata={"epoch": fields["epoch"],
                                                                 "model": manifest.model["name"]})
            entries.append(CheckpointEntry(**fields, path=path, sha256=sha))
        manifest.checkpoints = entries
        atomic_write_text(building / METRICS, "".join(json.dumps(h) + "\n" for h in history or []))
        write_sealed_json(building / MANIFEST, manifest.to_dict())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return Run(out)
