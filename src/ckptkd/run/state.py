"""The resume state: one safetensors file holding weights, optimizer buffers, RNG states and the run's progress.

No pickle: tensors are tensors, everything else is one JSON string in the file's metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .storage import read_tensors, save_tensors


@dataclass
class Progress:
    """Where a run stands after its last finished epoch; everything a resumed run needs beside the tensors."""
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)       # one record per epoch, as metrics.jsonl holds them
    checkpoints: list[dict] = field(default_factory=list)   # the manifest's checkpoint entries so far
    elapsed_s: float = 0.0
    best_val_acc: float = -1.0
    best_val_epoch: int = 0
    loss_scale: dict | None = None  # precision fp16: the run's gradient scaler (scale, growth tracker)
    ema_checkpoints: list[dict] = field(default_factory=list)  # optim.ema: the manifest's EMA checkpoint entries

    @classmethod
    def from_dict(cls, raw: dict) -> "Progress":
        return cls(**{k: raw[k] for k in asdict(cls()) if k in raw})


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
               ema: dict[str, torch.Tensor] | None = None) -> None:
    """The resume state in one file (so that its parts always agree): weights, optimizer, RNG states, progress and,
    with optim.ema, the averaged weights."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    # A shallow dict: it is only serialised, and asdict's deep copy of the history cost more than the write.
    shallow = {f.name: getattr(progress, f.name) for f in fields(progress)}
    save_tensors(path, tensors, metadata={"progress": shallow, "optimizer": opt_meta})


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Progress:
    tensors, meta = read_tensors(path, what="resume state", remedy=(
        f"it cannot be resumed: restart the run in a new --out (or delete {path.parent} to restart it in place)"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    _restore_optimizer(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return Progress.from_dict(meta["progress"])


def load_ema(path: Path) -> dict[str, torch.Tensor] | None:
    """The averaged weights a resume state holds (optim.ema), or None where it holds none."""
    tensors, _ = read_tensors(path, what="resume state")
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    return ema or None
