"""`ckptkd analyze RUN`: read each checkpoint's dark knowledge on the validation split and select T*.

Per checkpoint: accuracy, NLL, calibration, confidence, tempered and non-target entropies, the class matrices, and
I(X;F), I(Y;F) from two independent estimators. T* maximises min-max-normalised I(X;F) + I(Y;F) across the run's
checkpoints (the paper's Algorithm 1). Results are cached per checkpoint by its sha256, so a second run is instant.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import config as config_mod
from . import data as data_mod
from . import info
from .errors import UserError
from .run import Run, resolve
from .storage import atomic_write_json, read_json

FORMAT = 1
# Bump when a measurement changes, so cached per-checkpoint results are recomputed rather than mixed.
METHOD_VERSION = 2
# The estimators see at most this many validation images (a fixed class-stratified subset): beyond a few thousand
# their fixed costs dominate and the estimates barely move, while accuracy and calibration use the whole split.
ESTIMATOR_SAMPLES = 2000
PROBE_EPOCHS = 50


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.double().mean().item() * abs(confidence[in_bin].double().mean().item()
                                                       - correct[in_bin].mean().item())
    return ece


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=1)


def nontarget_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of the prediction renormalised over the wrong classes: the "dark knowledge" the paper says fades."""
    masked = (logits / temperature).scatter(1, labels[:, None], float("-inf"))
    return entropy(masked.softmax(dim=1))


def class_matrices(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[list, list]:
    """(mean soft probabilities per true class [row = true class], correlation between classes' soft outputs)."""
    mean = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for cls in range(num_classes):
        members = probs[labels == cls]
        if len(members):
            mean[cls] = members.double().mean(dim=0)
    corr = torch.corrcoef(probs.double().T).nan_to_num(0.0)
    return [[round(v, 6) for v in row] for row in mean.tolist()], [[round(v, 6) for v in row] for row in corr.tolist()]


@torch.inference_mode()
def _outputs(model: torch.nn.Module, data: data_mod.Data, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    model.eval()
    logits, features, inputs, labels = [], [], [], []
    for x, y in data.eval_batches(split, 512):
        f = model.forward_features(x)
        logits.append(model.classifier(f).float().cpu())
        features.append(f.float().cpu())
        inputs.append(x.float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(features), torch.cat(inputs), torch.cat(labels)


def estimator_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of at most `size` samples, the same share of every class, fixed by the seed."""
    if len(labels) <= size:
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed + 77)
    chosen = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        take = max(1, round(size * len(members) / len(labels)))
        chosen.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.cat(chosen).sort().values


def measure_checkpoint(model, data: data_mod.Data, *, temperature: float, seed: int, split: str = "val") -> dict:
    logits, features, inputs, labels = _outputs(model, data, split)
    probs = logits.softmax(dim=1)
    tempered = (logits / temperature).softmax(dim=1)
    sub = estimator_subset(labels, ESTIMATOR_SAMPLES, seed)
    mi = info.estimate_mi(features[sub], inputs[sub], labels[sub], seed=seed, probe_epochs=PROBE_EPOCHS)
    knn = info.knn_mi(features[sub], inputs[sub], labels[sub], seed=seed)
    soft_matrix, correlation = class_matrices(tempered, labels, data.num_classes)
    record = {
        "val_acc": (probs.argmax(1) == labels).double().mean().item(),
        "val_nll": F.cross_entropy(logits, labels).item(),
        "ece": expected_calibration_error(probs, labels),
        "confidence": probs.max(dim=1).values.double().mean().item(),
        "entropy_t": entropy(tempered).double().mean().item(),
        "nontarget_entropy": nontarget_entropy(logits, labels, 1.0).double().mean().item(),
        "nontarget_entropy_t": nontarget_entropy(logits, labels, temperature).double().mean().item(),
        "i_xf": mi["i_xf"], "i_yf": mi["i_yf"],
        "knn_i_xf": knn["i_xf"], "knn_i_yf": knn["i_yf"],
        "estimator": {k: v for k, v in mi.items() if k not in ("i_xf", "i_yf")},
        "soft_matrix": soft_matrix, "class_correlation": correlation,
    }
    return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in record.items()}


def min_max(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low <= 1e-12:
        return [0.0 for _ in values]
    return [(v - low) / (high - low) for v in values]


def rank(records: list[dict], by: str) -> list[dict]:
    """Checkpoints best first: by the information score, or by validation accuracy (ties: the later checkpoint)."""
    key = "score" if by == "info" else "val_acc"
    ordered = sorted(records, key=lambda r: (r[key], r["epoch"]), reverse=True)
    return [{"epoch": r["epoch"], "fraction": r["fraction"], key: r[key]} for r in ordered]


def analyze(run: str | Path, *, temperature: float | None = None, seed: int = 0, plots: bool = True,
            quiet: bool = False, allow_incomplete: bool = False) -> dict:
    """Analyse every checkpoint of `run`; writes RUN/analysis.json (and RUN/plots/) and returns the analysis."""
    folder = Run(run)
    run = folder.path
    checkpoints = resolve(f"{run}@all", allow_incomplete=allow_incomplete)
    manifest = folder.manifest
    cfg = folder.config()
    tau = temperature if temperature is not None else cfg["kd"]["temperature"]
    started = time.perf_counter()
    data = data_mod.build(cfg["data"], "cpu")
    settings = {"method": METHOD_VERSION, "temperature": tau, "seed": seed, "split": "val",
                "data": data.fingerprint, "estimator_samples": ESTIMATOR_SAMPLES, "probe_epochs": PROBE_EPOCHS}
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]

    records = []
    computed = 0
    for ckpt in tqdm(checkpoints, desc="analyze", leave=False, disable=None if not quiet else True, file=sys.stderr):
        cache_file = folder.analysis_cache_dir / f"{ckpt.sha256[:24]}-{settings_key}.json"
        if cache_file.is_file():
            record = read_json(cache_file, "analysis cache")
        else:
            record = measure_checkpoint(ckpt.build_model("cpu"), data, temperature=tau, seed=seed)
            atomic_write_json(cache_file, record)
            computed += 1
        records.append({"epoch": ckpt.epoch, "fraction": ckpt.fraction, "sha256": ckpt.sha256, **record})

    for name, values in (("i_xf_norm", min_max([r["i_xf"] for r in records])),
                         ("i_yf_norm", min_max([r["i_yf"] for r in records])),
                         ("knn_i_xf_norm", min_max([r["knn_i_xf"] for r in records])),
                         ("knn_i_yf_norm", min_max([r["knn_i_yf"] for r in records]))):
        for r, v in zip(records, values):
            r[name] = round(v, 8)
    for r in records:
        r["score"] = round(r["i_xf_norm"] + r["i_yf_norm"], 8)
        r["knn_score"] = round(r["knn_i_xf_norm"] + r["knn_i_yf_norm"], 8)

    ranking = rank(records, "info")
    best = ranking[0]["epoch"]
    agreement = {
        "spearman_i_xf": info.spearman([r["i_xf"] for r in records], [r["knn_i_xf"] for r in records]),
        "spearman_i_yf": info.spearman([r["i_yf"] for r in records], [r["knn_i_yf"] for r in records]),
        "spearman_score": info.spearman([r["score"] for r in records], [r["knn_score"] for r in records]),
    }
    analysis = {
        "format": FORMAT, "run": str(run), "split": "val", "n_val": int(data.val_x.shape[0]),
        "estimator_samples": min(ESTIMATOR_SAMPLES, int(data.val_x.shape[0])),
        "temperature": tau, "seed": seed, "class_names": data.class_names,
        "checkpoints": records,
        "ranking": ranking,
        "ranking_by_val": rank(records, "val"),
        "selected": {"epoch": best, "fraction": next(r["fraction"] for r in records if r["epoch"] == best),
                     "reference": f"{run}@epoch={best}",
                     "criterion": "max min-max-normalised I(X;F) + I(Y;F) over the run's checkpoints "
                                  "(probe/decoder estimator, validation split)"},
        "agreement": {k: (None if v != v else round(v, 6)) for k, v in agreement.items()},
        "timing_s": {"measure": round(time.perf_counter() - started, 3), "computed": computed,
                     "cached": len(records) - computed},
    }
    if plots:
        from .plots import plot_analysis

        plot_started = time.perf_counter()
        analysis["plots"] = plot_analysis(run, analysis, manifest)
        analysis["timing_s"]["plots"] = round(time.perf_counter() - plot_started, 3)
    folder.write_analysis(analysis)
    return analysis


def select(run: str | Path, *, k: int = 1, by: str = "info", allow_incomplete: bool = False) -> list[str]:
    """References to the best K checkpoints (K > 1: a snapshot ensemble), by information criterion or val accuracy."""
    run = Path(run)
    if by not in ("info", "val"):
        raise UserError(f"select: --by must be info or val, got {by!r}")
    if by == "info":
        return [c.reference for c in resolve(f"{run}@top-info:{k}", allow_incomplete=allow_incomplete)]
    checkpoints = resolve(f"{run}@all", allow_incomplete=allow_incomplete)
    ordered = sorted(checkpoints, key=lambda c: (c.metrics["val_acc"], c.epoch), reverse=True)
    if not 1 <= k <= len(ordered):
        raise UserError(f"select: --k must be between 1 and {len(ordered)} (the run's checkpoints)")
    return [c.reference for c in ordered[:k]]
