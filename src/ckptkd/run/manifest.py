"""The typed manifest of a run folder: what every command reads to know what a run holds.

`manifest.json` is the JSON form of `Manifest`; `Manifest.read` validates it and names the file at fault. Keys that
this version does not know are kept in `extra` and written back unchanged, so rewriting a manifest never loses them.
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

FORMAT = 1
KINDS = ("train", "distill", "import")
STATUSES = ("running", "complete", "failed", "interrupted")


@dataclass
class CheckpointEntry:
    """One saved checkpoint: where it is, its sha256, and the metrics measured when it was saved."""
    epoch: int
    step: int
    fraction: float
    lr: float
    path: str
    sha256: str
    metrics: dict[str, float]
    source: dict | None = None  # imported checkpoints: the file it came from and that file's sha256


@dataclass
class Final:
    """The numbers of a finished run. `test_acc_last_k` is the mean test accuracy of the last `last_k` epochs:
    the honest counterpart of the paper's "best of the last 10 epochs", which selects on the test set."""
    epoch: int
    train_acc: float
    val_acc: float
    test_acc: float
    best_val_acc: float
    best_val_epoch: int
    train_time_s: float
    test_acc_last_k: float | None = None
    last_k: int | None = None
    test_top5: float | None = None         # None with 5 classes or fewer, and in runs of ckptkd before 0.4
    test_top5_last_k: float | None = None
    # The paper's metric, asked for with eval.best_of_last = N: the best test accuracy of the last N epochs. It
    # selects on the test set, so it is reported beside the last-k mean, labelled, never instead of it.
    test_acc_best_of_last: float | None = None
    best_of_last: int | None = None


OPTIONAL_FINAL = ("test_acc_last_k", "last_k", "test_top5", "test_top5_last_k", "test_acc_best_of_last",
                  "best_of_last")


@dataclass
class Manifest:
    kind: str
    name: str
    model: dict                  # the spec `models.from_spec` builds from: name, classes, channels, image size, kwargs
    data: dict                   # `Data.describe()`: name, fingerprint, split sizes, statistics, class names
    seed: int | None
    epochs: int
    status: str = "running"
    steps_per_epoch: int = 0
    teachers: list[dict] = field(default_factory=list)
    teacher_ensemble: dict | None = None
    allow_incomplete: bool = False  # a teacher that had not completed was used on purpose
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    # optim.ema: the moving average of the weights, saved beside each checkpoint (checkpoints/ema-epoch-NNNN)
    ema_checkpoints: list[CheckpointEntry] = field(default_factory=list)
    final: Final | None = None
    health: dict = field(default_factory=lambda: {"ok": True, "flags": []})
    error: str | None = None
    source: dict | None = None
    device: str | None = None
    precision: str | None = None
    torch: str | None = None
    threads: int | None = None
    distributed: dict | None = None
    fused: dict | None = None    # trained in a group (`training.loop.fit`): engine, members, index, the group's folders
    slurm_jobs: list[str] = field(default_factory=list)  # the Slurm jobs that wrote the run, first to last
    ckptkd: dict = field(default_factory=lambda: provenance())
    format: int = FORMAT
    extra: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def checkpoint(self, epoch: int) -> CheckpointEntry:
        return next(c for c in self.checkpoints if c.epoch == epoch)

    def to_dict(self) -> dict:
        out = {"format": self.format}
        for f in dataclasses.fields(self):
            if f.name in ("format", "extra"):
                continue
            value = getattr(self, f.name)
            if f.name == "ema_checkpoints" and not value:
                continue  # a run without optim.ema has the manifest it always had
            if f.name in ("checkpoints", "ema_checkpoints"):
                value = [_drop_none(dataclasses.asdict(c), "source") for c in value]
            elif f.name == "final" and value is not None:
                value = dataclasses.asdict(value)
            elif (f.name == "fused" and value is None) or (f.name == "slurm_jobs" and not value):
                continue  # a run trained alone, outside Slurm, has the manifest it always had
            out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "Manifest":
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UserError(f"{where} is not a ckptkd manifest (format {FORMAT})")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key in ("kind", "name", "model", "data", "seed", "epochs", "checkpoints", "status"):
            if key not in raw:
                raise UserError(f"{where}: the manifest has no '{key}'")
        for key, (check, expected) in _FIELD_TYPES.items():
            if key in raw:
                _expect(check(raw[key]), where, key, raw[key], expected)
        _expect(raw["kind"] in KINDS, where, "kind", raw["kind"], f"one of {', '.join(KINDS)}")
        _expect(raw["status"] in STATUSES, where, "status", raw["status"], f"one of {', '.join(STATUSES)}")
        _expect(isinstance(raw["epochs"], int) and raw["epochs"] >= 1, where, "epochs", raw["epochs"],
                "an integer >= 1")
        _expect(isinstance(raw["model"], dict) and isinstance(raw["model"].get("name"), str), where, "model",
                raw["model"], "a mapping with a name")
        _expect(isinstance(raw["checkpoints"], list), where, "checkpoints", raw["checkpoints"], "a list")
        values = {k: raw[k] for k in known if k in raw}
        values["checkpoints"] = [_entry(c, where, i) for i, c in enumerate(raw["checkpoints"])]
        _expect(isinstance(raw.get("ema_checkpoints", []), list), where, "ema_checkpoints", raw.get("ema_checkpoints"),
                "a list")
        values["ema_checkpoints"] = [_entry(c, where, i) for i, c in enumerate(raw.get("ema_checkpoints", []))]
        if raw.get("final") is not None:
            try:
                values["final"] = Final(**raw["final"])
            except TypeError:
                raise UserError(f"{where}: 'final' is not a ckptkd final record") from None
            for key, value in raw["final"].items():
                _expect(_number(value) or (value is None and key in OPTIONAL_FINAL), where,
                        f"final.{key}", value, "a number")
        values.setdefault("ckptkd", {})  # written before versions were recorded
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional(check):
    return lambda v: v is None or check(v)


def _is(kind):
    """isinstance, except that true and false are not integers here."""
    return lambda v: isinstance(v, kind) and (kind is bool or not isinstance(v, bool))


# The type of every other field a reader uses (what it is, for the message naming the field).
_FIELD_TYPES = {
    "name": (_is(str), "text"),
    "data": (lambda v: isinstance(v, dict) and all(isinstance(v.get(k, ""), str) for k in ("name", "label")),
             "a mapping"),
    "seed": (_optional(_is(int)), "an integer or null"),
    "steps_per_epoch": (lambda v: _is(int)(v) and v >= 0, "an integer >= 0"),
    "teachers": (lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v), "a list of mappings"),
    "teacher_ensemble": (_optional(_is(dict)), "a mapping or null"),
    "allow_incomplete": (_is(bool), "true or false"),
    "health": (lambda v: isinstance(v, dict) and isinstance(v.get("ok", True), bool) and isinstance(
        v.get("flags", []), list) and all(isinstance(f, dict) and isinstance(f.get("flag"), str) and isinstance(
            f.get("epoch"), int) and isinstance(f.get("detail"), str) for f in v.get("flags", [])),
        "a mapping with ok and flags"),
    "error": (_optional(_is(str)), "text or null"),
    "source": (_optional(_is(dict)), "a mapping or null"),
    "device": (_optional(_is(str)), "text or null"),
    "precision": (_optional(_is(str)), "text or null"),
    "torch": (_optional(_is(str)), "text or null"),
    "threads": (_optional(_is(int)), "an integer or null"),
    "distributed": (_optional(_is(dict)), "a mapping or null"),
    "fused": (_optional(_is(dict)), "a mapping or null"),
    "slurm_jobs": (lambda v: isinstance(v, list) and all(isinstance(j, str) for j in v), "a list of job ids"),
    "ckptkd": (_is(dict), "a mapping"),
    "final": (_optional(_is(dict)), "a mapping or null"),
}


def _entry(raw: Any, where: str, i: int) -> CheckpointEntry:
    try:
        entry = CheckpointEntry(**raw)
    except TypeError:
        raise UserError(f"{where}: checkpoints[{i}] is not a checkpoint entry (epoch, step, fraction, lr, path, "
                        f"sha256, metrics)") from None
    _expect(isinstance(entry.epoch, int) and entry.epoch >= 1, where, f"checkpoints[{i}].epoch", entry.epoch,
            "an integer >= 1")
    _expect(isinstance(entry.sha256, str) and len(entry.sha256) == 64, where, f"checkpoints[{i}].sha256",
            entry.sha256, "a sha256 hex digest")
    _expect(isinstance(entry.path, str) and not Path(entry.path).is_absolute() and ".." not in Path(entry.path).parts,
            where, f"checkpoints[{i}].path", entry.path, "a path inside the run folder")
    _expect(isinstance(entry.step, int) and not isinstance(entry.step, bool), where, f"checkpoints[{i}].step",
            entry.step, "an integer")
    for key in ("fraction", "lr"):
        _expect(_number(getattr(entry, key)), where, f"checkpoints[{i}].{key}", getattr(entry, key), "a number")
    _expect(isinstance(entry.metrics, dict) and all(v is None or _number(v) for v in entry.metrics.values()), where,
            f"checkpoints[{i}].metrics", entry.metrics, "a mapping of numbers")
    _expect(entry.source is None or isinstance(entry.source, dict), where, f"checkpoints[{i}].source", entry.source,
            "a mapping or null")
    return entry


def _expect(ok: bool, where: str, key: str, value: Any, expected: str) -> None:
    if not ok:
        shown = repr(value)
        raise UserError(f"{where}: {key} must be {expected}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")


def _drop_none(d: dict, key: str) -> dict:
    if d.get(key) is None:
        d.pop(key, None)
    return d


def data_change(saved: dict, now: dict) -> str | None:
    """How the data a run was trained on (its manifest's `data`) differs from what its config gives now: None when
    the fingerprints agree or either is unknown (a manifest from before fingerprints), else a phrase naming both
    fingerprints and what changed (split sizes, class names), for a one-line refusal."""
    before, after = saved.get("fingerprint"), now.get("fingerprint")
    names_before, names_now = saved.get("class_names"), now.get("class_names")
    renamed = bool(names_before and names_now and names_before != names_now)  # names are not in the fingerprint
    if not renamed and (not before or not after or before == after):
        return None
    changes = [f"{k} {saved.get(k)} → {now.get(k)}" for k in ("train", "val", "test") if saved.get(k) != now.get(k)]
    if renamed:
        k = next((i for i, (a, b) in enumerate(zip(names_before, names_now)) if a != b), min(len(names_before),
                                                                                                len(names_now)))
        changes.append(f"{len(names_before)} classes → {len(names_now)}" if len(names_before) != len(names_now)
                       else f"class {k} {names_before[k]!r} → {names_now[k]!r}")
    return f"data {before} but its data config gives {after} now ({', '.join(changes) or 'the images changed'})"


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """The ckptkd version and, when the package runs from a git checkout, its commit (and whether it was modified)."""
    from .. import __version__

    found = {"version": __version__}
    package = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if top.returncode == 0:
            root, commit = top.stdout.split()
            # Only this project's own checkout: an installed copy inside someone else's repository has no commit.
            if (Path(root) / "src" / "ckptkd").resolve() == package:
                dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                       capture_output=True, text=True, timeout=5)
                found["commit"] = commit
                found["dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"version": __version__}  # no git here (or it failed half-way): the version alone
    return found
