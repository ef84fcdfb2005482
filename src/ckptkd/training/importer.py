"""Teachers trained elsewhere: one checkpoint, or a whole trajectory, becomes an ordinary ckptkd run.

    ckptkd import DIR_OR_GLOB_OR_FILE --model NAME [--format auto|...] [--epochs N] [--strip-prefix P] --out RUN

Layouts read (`--format auto` tells them apart by what each file keeps beside its weights):
  repdistiller  `ckpt_epoch_N.pth`: {"epoch", "model", "accuracy", "optimizer"} (its `_best`/`_last` copies skipped)
  mdistiller    extension-less `epoch_N` ({"epoch", "model": the distiller, names `module.student.*`, "best_acc"})
                or `student_N` ({"model"}); the student's weights are taken
  checkpointkd  the paper's released code: `<arch><i>_teacher<k>_ckpt.pth.tar`: {"epoch", "model_state", "optim_state",
                "best_valid_acc"}
  timm          `checkpoint-N.pth.tar` of timm's train.py ({"epoch": N from 0, "state_dict", "args": Namespace, ...})
  hf            a Hugging Face Trainer output folder: `checkpoint-STEP/` with model.safetensors (or
                pytorch_model.bin) and trainer_state.json (epoch, step, log history)
  lightning     `*.ckpt` of PyTorch Lightning ({"epoch" from 0, "global_step", "state_dict": names prefixed by the
                module's attribute, e.g. `model.`: pass --strip-prefix model.})
  state_dict    bare state dicts (.pth/.pt/.bin/.safetensors)
`module.` prefixes (DataParallel) are removed everywhere.
Epochs come from the files (their "epoch", 0-based in timm and Lightning) or their names, or from --epochs (the total,
so fractions like RUN@0.5 work). What the source recorded (accuracy, eval metrics) is kept in each checkpoint's
`source`; the run's own metrics are measured again on the configured data.

Only `torch.load(..., weights_only=True)` ever touches a pickle, with exactly two extra types allowed: timm's
`argparse.Namespace` and Lightning's `AttributeDict` (read as a plain dict; neither runs code), so a file that needs anything else is
refused by name before anything in it runs. The run folder is written whole under a temporary name and renamed into
place: it appears complete or not at all.
"""

from __future__ import annotations

import argparse
import glob as glob_mod
import math
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import config as config_mod
from .. import data as data_mod
from ..errors import UserError, note
from ..models import from_spec
from ..run import Final, Manifest, Run, write_run
from ..run.storage import read_json, sha256_file
from .loop import evaluate, top5
from .recipe import model_spec, pick_device

MAX_EPOCHS = config_mod.MAX_EPOCHS

FORMATS = ("auto", "repdistiller", "mdistiller", "checkpointkd", "timm", "hf", "lightning", "state_dict")
# Where training scripts keep the weights inside a saved dict: RepDistiller/mdistiller "model", timm/Lightning
# "state_dict", CheckpointKD "model_state".
_NESTED_KEYS = ("model", "state_dict", "model_state", "net", "model_state_dict", "weights")
_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt", ".bin", ".safetensors")
# What a source may record beside the weights, carried over as it is (numbers only).
_SOURCE_METRICS = ("accuracy", "acc", "best_acc", "best_valid_acc", "test_acc", "val_acc", "metric", "loss")
# Files that repeat another checkpoint under a fixed name (RepDistiller's resnet56_best.pth / _last.pth, timm's
# last.pth.tar / model_best.pth.tar, mdistiller's latest / best / student_best, Lightning's last.ckpt): skipped when
# per-epoch files sit beside them.
_ALIAS = re.compile(r"(?:^|[_\-.])(best|last|latest)(?:$|[_\-.])", re.IGNORECASE)
# mdistiller writes extension-less files: epoch_N (the whole distiller) and student_N (the model trained).
_MDISTILLER = re.compile(r"(epoch|student)_(\d+)")


class _AttributeDict(dict):
    """Lightning's AttributeDict (a dict with attribute access), read back as the plain dict it is."""


# The only types beyond tensors and containers that a checkpoint may hold: timm keeps its argparse.Namespace in
# "args" (and RepDistiller in "opt"), Lightning its hyper-parameters in an AttributeDict. Neither runs code on load.
_ALLOWED = [argparse.Namespace, (_AttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
            (_AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict")]


@dataclass
class Found:
    """One checkpoint of the source: its weights and what the source said about it."""
    path: Path                    # the weights file
    format: str
    state: dict[str, torch.Tensor]
    epoch: int | None = None
    step: int | None = None
    total_epochs: int | None = None
    metrics: dict = field(default_factory=dict)


def _torch_load(path: Path):
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_ALLOWED):
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the refusal below says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|WeightsUnpickler error):\s*(.+)", str(e))
        what = found.group(1).strip().split(" was not")[0][:120] if found else "content beyond tensors and containers"
        raise UserError(f"import: {path} needs arbitrary unpickling, which ckptkd refuses ({what}); re-save it as a "
                        "plain state dict: torch.save(model.state_dict(), 'weights.pth')") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as e:
        said = str(e).splitlines()[0] if str(e) else ""
        why = said if re.search(r"[A-Za-z]{3}", said) else "not a file torch.save writes"  # KeyError('101'): text
        raise UserError(f"import: {path} is not a readable checkpoint ({why})") from None


def _format_of(obj) -> str:
    """Which trainer wrote a loaded checkpoint, told from what it keeps beside the weights."""
    if not isinstance(obj, dict):
        return "state_dict"
    if "pytorch-lightning_version" in obj:
        return "lightning"
    if isinstance(obj.get("args"), argparse.Namespace) or ("arch" in obj and "version" in obj):
        return "timm"
    if "model_state" in obj and "optim_state" in obj:
        return "checkpointkd"
    if isinstance(obj.get("model"), dict) and any(k.split(".")[:2] in (["module", "student"], ["student"])
                                                  for k in obj["model"]):
        return "mdistiller"
    if isinstance(obj.get("model"), dict):
        return "repdistiller"
    return "state_dict"


def _weights(obj, path: Path, strip_prefix: str | None) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict) and obj[key]:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"import: {path} does not hold model weights (a mapping of names to tensors)")
    for name, tensor in obj.items():
        kind = ("on the meta device (it has no values)" if tensor.is_meta
                else f"a {str(tensor.layout).removeprefix('torch.')} tensor" if tensor.layout != torch.strided
                else f"{str(tensor.dtype).removeprefix('torch.')} (complex)" if tensor.is_complex() else None)
        if kind:
            raise UserError(f"import: {path}: weight {name!r} is {kind}; expected plain real-valued tensors")
    # DataParallel / DistributedDataParallel prefix every name with "module.".
    obj = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    if strip_prefix is None and any(k.startswith("student.") for k in obj):
        strip_prefix = "student."  # an mdistiller distiller (student and teacher): the model it trained
    if strip_prefix:
        prefix = strip_prefix[len("module."):] if strip_prefix.startswith("module.") else strip_prefix
        if not any(k.startswith(prefix) for k in obj):
            raise UserError(f"import: {path}: no weight name starts with --strip-prefix {strip_prefix!r} (e.g. "
                            f"{next(iter(obj))!r})")
        obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    return obj


def _epoch_from_name(path: Path) -> int | None:
    m = re.search(r"(?:epoch|ep|checkpoint|ckpt)[-_=]?(\d+)", path.name, re.IGNORECASE) or re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else None


def _numbers(obj: dict, keys, where: Path) -> dict:
    """The finite numbers among `keys` (metrics a trainer recorded), as floats; one beyond a float's range, NaN or
    infinite is left out with a note."""
    numbers = {}
    for k in keys:
        value = obj.get(k)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            finite = math.isfinite(value) if isinstance(value, float) else abs(value) < 2 ** 1023
            if finite:
                numbers[k] = float(value)
            else:
                note(f"import: {where}: {k!r} is {'too large' if isinstance(value, int) else value}; left out")
    return numbers


def _load_file(path: Path, fmt: str, strip_prefix: str | None) -> Found:
    if path.suffix == ".safetensors":
        from ..run.storage import load_tensors

        return Found(path, "state_dict" if fmt == "auto" else fmt, _weights(load_tensors(path), path, strip_prefix),
                     epoch=_epoch_from_name(path))
    obj = _torch_load(path)
    fmt = _format_of(obj) if fmt == "auto" else fmt
    found = Found(path, fmt, _weights(obj, path, strip_prefix))
    if not isinstance(obj, dict):
        return found
    epoch = obj.get("epoch")
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        # timm and Lightning record the index of the epoch just finished, from 0; the others (and ckptkd) count
        # finished epochs, from 1.
        found.epoch = epoch + 1 if fmt in ("timm", "lightning") else epoch
    step = obj.get("global_step")
    found.step = step if isinstance(step, int) else None
    found.metrics = _numbers(obj, _SOURCE_METRICS, path)
    if isinstance(obj.get("args"), argparse.Namespace):
        total = getattr(obj["args"], "epochs", None)
        found.total_epochs = total if isinstance(total, int) else None
    return found


def _load_hf(folder: Path, strip_prefix: str | None) -> Found:
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise UserError(f"import: {folder} has neither model.safetensors nor pytorch_model.bin")
    found = _load_file(weights, "hf", strip_prefix)
    found.epoch = None  # a step, not an epoch, is in the folder's name
    state_file = folder / "trainer_state.json"
    if state_file.is_file():
        state = read_json(state_file, "import: Trainer state")
        if not isinstance(state, dict):
            raise UserError(f"import: {state_file} is not a Trainer state (a JSON object)")
        epoch = state.get("epoch")
        if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
            if not (isinstance(epoch, int) or math.isfinite(epoch)) or not 0 <= epoch <= MAX_EPOCHS:
                raise UserError(f"import: {state_file}: 'epoch' is {epoch!r}; expected a number of epochs from 0 to "
                                f"{MAX_EPOCHS:,}")
            found.epoch = round(epoch)
        history = state.get("log_history", [])
        if not isinstance(history, list):
            raise UserError(f"import: {state_file}: 'log_history' is a {type(history).__name__}, not a list")
        found.step = state.get("global_step") if isinstance(state.get("global_step"), int) else None
        if isinstance(state.get("num_train_epochs"), int):
            found.total_epochs = state["num_train_epochs"]
        # The log history up to this checkpoint: its last evaluation is this checkpoint's.
        evals = [h for h in history if isinstance(h, dict) and any(str(k).startswith("eval_") for k in h)]
        if evals:
            found.metrics = _numbers(evals[-1], [k for k in evals[-1] if str(k).startswith("eval_")], state_file)
    if found.step is None:
        m = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        found.step = int(m.group(1)) if m else None
    return found


def discover(source: str | Path) -> list[Path]:
    """The checkpoint files (or HF checkpoint-STEP/ folders) a source names, sorted; files that only repeat another
    checkpoint under a fixed name (best, last, latest) are left out when per-epoch files sit beside them."""
    text = str(source)
    if any(c in text for c in "*?["):
        paths = sorted(Path(p) for p in glob_mod.glob(text))
    else:
        path = Path(text)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise UserError(f"import: {path} does not exist")
        hf = sorted(p for p in path.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name))
        files = sorted(p for p in path.iterdir() if p.is_file())
        mdistiller = {kind: [p for p in files if (m := _MDISTILLER.fullmatch(p.name)) and m.group(1) == kind]
                      for kind in ("epoch", "student")}
        paths = (hf or mdistiller["epoch"] or mdistiller["student"]
                 or [p for p in files if p.name.endswith(_SUFFIXES)])
    per_epoch = [p for p in paths if not _ALIAS.search(p.name.split(".")[0] if p.is_file() else p.name)]
    paths = per_epoch or paths
    if not paths:
        raise UserError(f"import: {source} holds no checkpoints (files ending in {', '.join(_SUFFIXES)}, "
                        "mdistiller's epoch_N, or checkpoint-STEP/ folders)")
    return paths


def _check_fits(found: Found, expected: dict[str, torch.Tensor], model: str, spec: dict) -> None:
    missing = sorted(set(expected) - set(found.state))
    unexpected = sorted(set(found.state) - set(expected))
    if missing or unexpected:
        heads = {k.split(".", 1)[0] for k in found.state}
        head = next(iter(heads)) + "." if len(heads) == 1 and all("." in k for k in found.state) else None
        hint = ""
        if head and {k[len(head):] for k in found.state} == set(expected):
            hint = f"; every name starts with {head!r} (a wrapper's attribute): pass --strip-prefix {head}"
        raise UserError(f"import: {found.path} does not fit model {model!r} ({len(missing)} missing, e.g. "
                        f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}){hint}")
    for k, tensor in found.state.items():
        if expected[k].is_floating_point() and not tensor.is_floating_point():
            raise UserError(f"import: {found.path}: weight {k!r} is {str(tensor.dtype).removeprefix('torch.')} "
                            f"where model {model!r} has {str(expected[k].dtype).removeprefix('torch.')}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"import: {found.path}: weight {k!r} holds NaN or infinite values (a diverged run?)")
    wrong = [k for k in expected if expected[k].shape != found.state[k].shape]
    if wrong:
        shown = "; ".join(f"{k} {tuple(found.state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3])
        raise UserError(f"import: {found.path} does not fit {model!r} with num_classes={spec['num_classes']}, "
                        f"in_channels={spec['in_channels']}: {len(wrong)} shapes differ ({shown})")


def import_trajectory(source: str | Path, *, model: str, out: str | Path, fmt: str = "auto", epochs: int | None = None,
                      strip_prefix: str | None = None, overrides: list | dict | None = None,
                      config: str | Path | None = None, quiet: bool = False) -> Run:
    """Turn a checkpoint file, a folder of per-epoch checkpoints or a glob into one run of `model` on the configured
    data (default: digits), every checkpoint evaluated on train, val and test. `epochs`: the trajectory's total."""
    if fmt not in FORMATS:
        raise UserError(f"import: --format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run = Path(out)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise UserError(f"run folder {run} already exists; choose another --out")
    items = list(overrides.items()) if isinstance(overrides, dict) else [config_mod.parse_override(o)
                                                                          for o in overrides or []]
    cfg = config_mod.resolve(config, dict([("model.name", model), ("name", run.name or "imported")] + items))
    paths = discover(source)
    if fmt == "hf" and not all(p.is_dir() for p in paths):
        raise UserError(f"import: --format hf needs checkpoint-STEP/ folders, got {paths[0]}")
    found = [_load_hf(p, strip_prefix) if p.is_dir() else _load_file(p, fmt, strip_prefix) for p in paths]
    formats = sorted({f.format for f in found})
    if len(formats) > 1:
        first = {f.format: f.path for f in found}
        raise UserError(f"import: {source} mixes checkpoint layouts ({', '.join(f'{k}: {v}' for k, v in first.items())})"
                        "; import one trainer's files at a time")
    fmt = formats[0]

    if fmt == "hf" and any(f.epoch is None for f in found):  # no trainer_state.json: the order of the steps
        for i, f in enumerate(sorted(found, key=lambda f: f.step or 0), start=1):
            f.epoch = i
    if len(found) > 1 and any(f.epoch is None for f in found):
        for f in found:  # no epoch inside: from the file name
            f.epoch = f.epoch if f.epoch is not None else _epoch_from_name(f.path)
        if any(f.epoch is None for f in found):
            unknown = next(f.path for f in found if f.epoch is None)
            raise UserError(f"import: cannot tell the epoch of {unknown} (not in the file nor its name)")
    if len(found) == 1 and found[0].epoch is None:
        found[0].epoch = epochs or 1
    seen: dict[int, Path] = {}
    for f in found:
        if f.epoch < 1:
            raise UserError(f"import: {f.path} says epoch {f.epoch}; epochs count from 1")
        if f.epoch in seen:
            raise UserError(f"import: {seen[f.epoch]} and {f.path} are both epoch {f.epoch}")
        seen[f.epoch] = f.path
    found.sort(key=lambda f: f.epoch)
    total = epochs or max([f.total_epochs for f in found if f.total_epochs] + [found[-1].epoch])
    if found[-1].epoch > MAX_EPOCHS or total > MAX_EPOCHS:  # what `train` accepts, so `analyze` can read it
        big = found[-1] if found[-1].epoch > MAX_EPOCHS else None
        raise UserError(f"import: {big.path if big else source} says {big.epoch if big else total} epochs; at most "
                        f"{MAX_EPOCHS:,} (schedule.epochs)")
    if total < found[-1].epoch:
        raise UserError(f"import: --epochs {total} is less than the last checkpoint's epoch {found[-1].epoch}")
    cfg["schedule"]["epochs"] = total
    cfg["checkpoints"].update(fractions=[], every=None, epochs=[f.epoch for f in found])

    device = pick_device(cfg["device"])
    data = data_mod.build(cfg["data"], device)
    spec = model_spec(cfg, data)
    net = from_spec(spec)
    expected = net.state_dict()
    batch = cfg["data"]["eval_batch_size"]
    checkpoints, history = [], []
    for f in found:  # all of them before any is evaluated: a misfit is reported at once
        _check_fits(f, expected, model, spec)
    for f in found:
        net.load_state_dict(f.state)
        net.to(device).eval()
        train_m, val_m, test_m = (evaluate(lambda x: net(x)[None], data, split, batch)[0]
                                  for split in ("train", "val", "test"))
        metrics = {"train_loss": train_m["loss"], "train_acc": train_m["acc"], "val_loss": val_m["loss"],
                   "val_acc": val_m["acc"], "test_acc": test_m["acc"], **top5("val", val_m), **top5("test", test_m)}
        origin = {"file": str(f.path), "sha256": sha256_file(f.path), "format": fmt, **({"step": f.step} if f.step
                                                                                       is not None else {}),
                  **({"metrics": f.metrics} if f.metrics else {})}
        checkpoints.append(({"epoch": f.epoch, "step": f.step or 0, "fraction": round(f.epoch / total, 6), "lr": 0.0,
                             "metrics": metrics, "source": origin},
                            {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}))
        history.append({"epoch": f.epoch, **metrics})
        if not quiet:
            print(f"import: epoch {f.epoch}/{total} from {f.path}: val {100 * metrics['val_acc']:.2f}%",
                  file=sys.stderr)
    last = history[-1]
    best = max(history, key=lambda h: (h["val_acc"], h["epoch"]))
    manifest = Manifest(kind="import", status="complete", name=cfg["name"], model=spec, data=data.describe(),
                        seed=None, epochs=total, source={"path": str(source), "format": fmt, "files": len(found)},
                        device=str(device), torch=torch.__version__,
                        final=Final(epoch=last["epoch"], train_acc=last["train_acc"], val_acc=last["val_acc"],
                                    test_acc=last["test_acc"], best_val_acc=best["val_acc"],
                                    best_val_epoch=best["epoch"], train_time_s=0.0,
                                    test_top5=last.get("test_top5")))
    return write_run(run, cfg, manifest, checkpoints, history=history)


def import_state_dict(file: str | Path, *, model: str, out: str | Path, overrides: list | dict | None = None,
                      config: str | Path | None = None, quiet: bool = False) -> Run:
    """One file as a one-checkpoint run (the former `ckptkd import FILE`): `import_trajectory` of that file."""
    return import_trajectory(file, model=model, out=out, overrides=overrides, config=config, quiet=quiet)
