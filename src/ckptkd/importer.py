"""Teachers trained elsewhere: a PyTorch state dict (.pth) becomes a one-checkpoint ckptkd run.

Only `torch.load(..., weights_only=True)` ever touches the file, so a pickle that would run code is refused before
anything in it runs.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from . import config as config_mod
from . import data as data_mod
from .engine import evaluate, model_spec, pick_device
from .errors import UserError
from .models import from_spec
from .run import Final, Manifest, Run, write_run
from .storage import sha256_file

# Where common training scripts keep the weights inside a saved dict (RepDistiller: "model", others: "state_dict").
_NESTED_KEYS = ("model", "state_dict", "net", "model_state_dict", "weights")
# Final-layer names used by other code bases for what our models call `classifier`.
_CLASSIFIER_ALIASES = ("fc.", "linear.", "head.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"import: file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the refusal below says enough
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        what = found.group(1).strip()[:120] if found else "content beyond tensors and plain containers"
        raise UserError(f"import: {path} needs arbitrary unpickling, which ckptkd refuses ({what}); "
                        "re-save it as a plain state dict: torch.save(model.state_dict(), 'weights.pth')") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"import: cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"import: {path} does not hold a state dict (a mapping of names to tensors)")
    # DataParallel / DistributedDataParallel prefix every name with "module.".
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _fit_names(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    if set(state) == expected:
        return state
    for alias in _CLASSIFIER_ALIASES:
        renamed = {("classifier." + k[len(alias):] if k.startswith(alias) else k): v for k, v in state.items()}
        if set(renamed) == expected:
            return renamed
    return state


def import_state_dict(file: str | Path, *, model: str, out: str | Path, overrides: list | dict | None = None,
                      config: str | Path | None = None, quiet: bool = False) -> Run:
    """Wrap `file` as a run of `model` on the configured data (defaults: digits), evaluated on train, val and test."""
    file, run = Path(file), Path(out)
    if run.exists() and any(run.iterdir()):
        raise UserError(f"run folder {run} already exists; choose another --out")
    items = list(overrides.items()) if isinstance(overrides, dict) else [config_mod.parse_override(o)
                                                                          for o in overrides or []]
    cfg = config_mod.resolve(config, dict([("model.name", model), ("name", run.name or "imported")] + items))
    cfg["schedule"]["epochs"] = 1
    state = read_state_dict(file)

    device = pick_device(cfg["device"])
    data = data_mod.build(cfg["data"], device)
    spec = model_spec(cfg, data)
    net = from_spec(spec)
    expected = net.state_dict()
    state = _fit_names(state, set(expected))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"import: {file} does not fit model {model!r} ({len(missing)} missing, e.g. "
                        f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"import: {file}: {k} has shape {tuple(state[k].shape)} but {model!r} with "
                        f"num_classes={spec['num_classes']}, in_channels={spec['in_channels']} needs "
                        f"{tuple(expected[k].shape)}")
    net.load_state_dict(state)
    net.to(device)

    batch = cfg["data"]["eval_batch_size"]
    train_m, val_m, test_m = (evaluate(net, data, split, batch) for split in ("train", "val", "test"))
    metrics = {"train_loss": train_m["loss"], "train_acc": train_m["acc"], "val_loss": val_m["loss"],
               "val_acc": val_m["acc"], "test_acc": test_m["acc"]}
    source = {"file": str(file), "sha256": sha256_file(file)}
    manifest = Manifest(kind="import", status="complete", name=cfg["name"], model=spec, data=data.describe(),
                        seed=None, epochs=1, source=source, device=str(device), torch=torch.__version__,
                        final=Final(epoch=1, train_acc=metrics["train_acc"], val_acc=metrics["val_acc"],
                                    test_acc=metrics["test_acc"], best_val_acc=metrics["val_acc"], best_val_epoch=1,
                                    train_time_s=0.0))
    entry = {"epoch": 1, "step": 0, "fraction": 1.0, "lr": 0.0, "metrics": metrics, "source": source}
    return write_run(run, cfg, manifest, [(entry, net.state_dict())], history=[{"epoch": 1, **metrics}])
