"""`ckptkd analyze RUN`: read every checkpoint's soft labels, geometry and information, on the training inputs the
student will see and on the validation split, then select T* (`selection`).

Per checkpoint and split (the images un-augmented, the model in eval mode):
  accuracy, NLL, calibration (ECE), confidence, tempered and non-target entropies, the tempered probability of the
  true class p_target@tau, within-class variability collapse NC1 (Papyan et al. 2020), the class matrices; and over
  K split seeds (default 5; each a stratified 70/30 split of at most 2,000 images), I(X;F) and I(Y;F) from the
  probe/decoder estimators and from the kNN cross-check, p_target@tau, non-target entropy, NC1 and accuracy on the
  seed's held-out images, so each carries a mean and a standard error and checkpoints compare seed by seed.
T* maximises normalised I(X;F) + I(Y;F) on `split` (default: train, where over-confidence lives), with the tie
rule of `selection`; every other criterion on either split is in `criteria` and selectable (`ckptkd select --by`).
Results are cached per checkpoint by its sha256 and the settings, so a second run is instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import config as config_mod
from .. import data as data_mod
from ..errors import UserError
from ..run import ANALYSIS as ANALYSIS_FILE
from ..run import Run, data_change, provenance, resolve, runs_under
from ..run.storage import ensure_writable, read_sealed_json, remove_stale_temporaries, write_sealed_json
from . import criteria as selection
from . import info

FORMAT = 2
# Bump when a measurement changes, so cached per-checkpoint results are recomputed rather than mixed.
METHOD_VERSION = 4
# The estimators see at most this many images per split (a fixed class-stratified subset): beyond a few thousand
# their fixed costs dominate and the estimates barely move; the full-split measures use every image.
ESTIMATOR_SAMPLES = 2000
PROBE_EPOCHS = 50
SEEDS = 5
SPLITS = ("train", "val")
SEED_QUANTITIES = ("i_xf", "i_yf", "knn_i_xf", "knn_i_yf", "acc", "p_target_t", "nontarget_entropy_t", "nc1")


# The class matrices (mean soft labels per true class, the classes' correlation: C x C each, per checkpoint and
# split) are kept up to this many classes: they are read as a figure, and at ImageNet's 1,000 they would add 16 MB of
# JSON per checkpoint.
MATRIX_CLASSES = 200
# The whole split's NC1 sums a D x D matrix of the features; wider features (2 GiB at D = 16,384) are read on the
# estimator subset instead, with a note.
NC1_FEATURES = 8192
ECE_BINS = 15


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=1)


def nontarget_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of the prediction renormalised over the wrong classes: the "dark knowledge" the paper says fades."""
    masked = (logits / temperature).scatter(1, labels[:, None], float("-inf"))
    return entropy(masked.softmax(dim=1))


def p_target(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The tempered probability of the true class: near 1 for an over-confident teacher even at high tau."""
    return (logits / temperature).softmax(dim=1).gather(1, labels[:, None]).squeeze(1)


class FeatureMoments:
    """Per-class sums and the scatter matrix of features, added batch by batch, from which NC1 follows."""

    def __init__(self, num_classes: int):
        self.num_classes, self.n, self.finite = num_classes, 0, True
        self.shift = self.class_sum = self.scatter = None
        self.class_count = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> FeatureMoments:
        f = features.double()
        if not bool(torch.isfinite(f).all()):
            self.finite = False
        if not self.finite or not len(f):
            return self
        if self.shift is None:  # sums about the first batch's mean: no cancellation when features sit far from 0
            self.shift = f.mean(0)
            self.class_sum = torch.zeros(self.num_classes, f.shape[1], dtype=torch.float64)
            self.scatter = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        centred = f - self.shift
        self.class_sum.index_add_(0, labels, centred)
        self.class_count += torch.bincount(labels, minlength=self.num_classes).double()
        self.scatter.addmm_(centred.T, centred)
        self.n += len(f)
        return self

    def nc1(self) -> float | None:
        """Within-class variability relative to between-class spread, tr(S_W S_B^+) / C (Papyan, Han & Donoho
        2020); it falls towards 0 as the features of each class collapse onto their mean. None with fewer than 2
        classes or non-finite features."""
        present = self.class_count > 0
        if not self.finite or self.scatter is None or int(present.sum()) < 2:
            return None
        count, means = self.class_count[present], self.class_sum[present] / self.class_count[present, None]
        between = means - means.mean(0)
        _, singular, vh = torch.linalg.svd(between, full_matrices=False)
        keep = singular > 1e-10 * max(float(singular[0]), 1e-300)
        if not bool(keep.any()):
            return None
        # S_W = (scatter - sum_c n_c mu_c mu_c^T) / N; S_B = V diag(s^2 / C) V^T, so
        # tr(S_W S_B^+) / C = sum_j v_j^T S_W v_j / s_j^2.
        within = self.scatter - means.T @ (means * count[:, None])
        v = vh[keep]
        spread = ((v @ within) * v).sum(1).clamp_min(0.0) / self.n
        return float((spread / singular[keep].square()).sum())


def nc1(features: torch.Tensor, labels: torch.Tensor) -> float | None:
    """NC1 of features held in memory (FeatureMoments.nc1)."""
    if not len(labels):
        return None
    return FeatureMoments(int(labels.max()) + 1).add(features, labels).nc1()


class WholeSplit:
    """The whole-split measures of one checkpoint, summed batch by batch: memory grows with the classes and the
    feature width, never with the number of images, so a 1.28 M-image split is read as a 100-image one is.
    Accuracy, NLL, calibration (ECE, 15 equal bins of confidence), confidence, tempered and non-target entropies,
    p_target@tau, NC1 and the class matrices."""

    MEANS = ("acc", "nll", "confidence", "entropy_t", "nontarget_entropy", "nontarget_entropy_t", "p_target_t")

    def __init__(self, num_classes: int, temperature: float, *, nc1_features: bool = True):
        self.num_classes, self.temperature, self.n = num_classes, temperature, 0
        self.sums = dict.fromkeys(self.MEANS, 0.0)
        self.edges = torch.linspace(0, 1, ECE_BINS + 1)
        self.bins = torch.zeros(3, ECE_BINS + 2, dtype=torch.float64)  # count, confidence, correct per bin
        self.matrices = num_classes <= MATRIX_CLASSES
        if self.matrices:
            self.soft_sum = torch.zeros(num_classes, num_classes, dtype=torch.float64)
            self.class_count = torch.zeros(num_classes, dtype=torch.float64)
            self.p_sum = torch.zeros(num_classes, dtype=torch.float64)
            self.pp_sum = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.features = FeatureMoments(num_classes) if nc1_features else None

    def add(self, logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None) -> WholeSplit:
        logits = logits.float()
        probs = logits.softmax(dim=1)
        tempered = (logits / self.temperature).softmax(dim=1)
        confidence, predicted = probs.max(dim=1)
        correct = (predicted == labels).double()
        per_image = {"acc": correct, "nll": F.cross_entropy(logits, labels, reduction="none"),
                     "confidence": confidence, "entropy_t": entropy(tempered),
                     "nontarget_entropy": nontarget_entropy(logits, labels, 1.0),
                     "nontarget_entropy_t": nontarget_entropy(logits, labels, self.temperature),
                     "p_target_t": p_target(logits, labels, self.temperature)}
        for key, values in per_image.items():
            self.sums[key] += values.double().sum().item()
        # bin b holds confidences in (edges[b-1], edges[b]]; bin 0 (a confidence of exactly 0) is never counted
        in_bin = torch.bucketize(confidence, self.edges)
        for row, values in enumerate((torch.ones_like(correct), confidence.double(), correct)):
            self.bins[row].index_add_(0, in_bin, values)
        if self.matrices:
            t = tempered.double()
            self.soft_sum.index_add_(0, labels, t)
            self.class_count += torch.bincount(labels, minlength=self.num_classes).double()
            self.p_sum += t.sum(0)
            self.pp_sum.addmm_(t.T, t)
        if self.features is not None and features is not None:
            self.features.add(features, labels)
        self.n += len(labels)
        return self

    def measures(self) -> dict:
        n = self.n or math.nan  # an empty split has no means (null in the record)
        values = {"n": self.n, **{key: total / n for key, total in self.sums.items()},
                  "ece": float((self.bins[1, 1:] - self.bins[2, 1:]).abs().sum()) / n,
                  "nc1": self.features.nc1() if self.features is not None else None}
        out = {k: _finite(v) if isinstance(v, float) else v for k, v in values.items()}
        soft_matrix = correlation = None
        if self.matrices:
            soft_matrix = self.soft_sum / self.class_count.clamp_min(1.0)[:, None]
            mean = self.p_sum / n
            cov = self.pp_sum / n - torch.outer(mean, mean)
            std = cov.diagonal().clamp_min(0.0).sqrt()
            # a class no image is given any probability has no correlation (0, as corrcoef's NaN was read)
            correlation = (cov / torch.outer(std, std)).nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp(-1.0, 1.0)
            soft_matrix, correlation = ([[round(v, 6) for v in row] for row in m.tolist()]
                                        for m in (soft_matrix, correlation))
        return {**out, "soft_matrix": soft_matrix, "class_correlation": correlation}


@torch.inference_mode()
def read_split(model: torch.nn.Module, data: data_mod.Data, split: str, subset: torch.Tensor, *,
               temperature: float) -> tuple[WholeSplit, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One pass over a split: its whole-split measures, and the logits, features and labels of the `subset` (sorted
    positions) the estimators read. Only the subset is held, whatever the split's size."""
    model.eval()
    labels_all = getattr(data, f"{split}_y")
    wanted = torch.zeros(len(labels_all), dtype=torch.bool)
    wanted[subset] = True
    whole, kept, offset = None, [], 0
    for x, y in data.eval_batches(split, 512):
        f = model.forward_features(x)
        logits, features, y = model.classifier(f).float().cpu(), f.float().cpu(), y.cpu()
        if whole is None:
            whole = WholeSplit(data.num_classes, temperature, nc1_features=features.shape[1] <= NC1_FEATURES)
        whole.add(logits, y, features)
        rows = wanted[offset:offset + len(y)]
        kept.append((logits[rows], features[rows], y[rows]))
        offset += len(y)
    if whole is None:
        whole = WholeSplit(data.num_classes, temperature)
    parts = [torch.cat(column) for column in zip(*kept)] if kept else [torch.zeros(0)] * 3
    return whole, tuple(parts)


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


def _finite(value):
    """JSON has no NaN: a non-finite measurement is recorded as null (lists and mappings element by element)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def seed_measures(logits, labels, features, plan: info.SplitPlan, *, temperature: float, probe_epochs: int,
                  probe_decay=info.estimators.SEARCH) -> dict:
    """One split seed: the estimators fit on the plan's fit part and are scored on its held-out part, where the
    direct measures are read too (`probe_decay`: as `shared_probe_decay` chose it for every seed)."""
    held = plan.held
    direct = {"acc": (logits[held].argmax(1) == labels[held]).double().mean().item(),
              "p_target_t": p_target(logits[held], labels[held], temperature).double().mean().item(),
              "nontarget_entropy_t": nontarget_entropy(logits[held], labels[held], temperature).double().mean().item(),
              "nc1": nc1(features[held], labels[held])}
    out = {k: _finite(v) for k, v in direct.items()}
    try:
        f = info.estimators.as_matrix(features, "features")
    except UserError as e:  # non-finite features (a diverged checkpoint): every estimate of it failed
        return {**out, **{k: None for k in ("i_xf", "i_yf", "knn_i_xf", "knn_i_yf")},
                "status": {k: "failed" for k in ("i_xf", "i_yf")}, "note": str(e)}
    whitened = info.whiten_features(f, plan.fit)
    mi = info.estimate_with(f, plan, probe_epochs=probe_epochs, whitened=whitened, probe_decay=probe_decay)
    fit = plan.fit
    knn = info.knn_with(whitened.z[fit], plan.u[fit], plan.codes[fit], seed=plan.seed)
    out.update(i_xf=mi["i_xf"], i_yf=mi["i_yf"], knn_i_xf=knn["i_xf"], knn_i_yf=knn["i_yf"],
               raw={"i_xf": mi["i_xf_raw"], "i_yf": mi["i_yf_raw"]},
               status={"i_xf": mi["i_xf_status"], "i_yf": mi["i_yf_status"]}, features=mi["features"])
    return out


def shared_probe_decay(features, plans: list, probe_epochs: int):
    """The I(Y;F) probe's L2 strength for every split seed of one checkpoint and split, chosen once (the search is
    most of the estimators' cost) on the images that every seed fits on, so that no seed's held-out images take
    part in choosing it. With one seed, its own fit part; with no images common to all, each seed searches."""
    if not plans:
        return info.estimators.SEARCH
    common = plans[0].fit
    for plan in plans[1:]:
        common = common[torch.isin(common, plan.fit)]
    if len(torch.unique(plans[0].codes[common])) < len(torch.unique(plans[0].codes)) or len(common) < 20:
        return info.estimators.SEARCH  # too few common images to choose on: each seed chooses on its own
    try:
        f = info.estimators.as_matrix(features, "features")
    except UserError:
        return info.estimators.SEARCH  # non-finite features: every estimate fails anyway
    whitened = info.whiten_features(f, common)
    return info.choose_probe_decay(whitened.z, plans[0].codes, common, plans[0].seed, probe_epochs)


def summarise(seeds: list[dict]) -> dict:
    """Per quantity: mean and standard error over the seeds with a value (corrected for their overlapping splits),
    and how many failed or were clipped."""
    out = {}
    for quantity in SEED_QUANTITIES:
        values = [s[quantity] for s in seeds if s.get(quantity) is not None]
        mean, se = selection.seed_mean_se(values) if values else (None, None)
        out[quantity] = {
            "mean": mean, "se": se,
            "n": len(values), "failed": len(seeds) - len(values),
            "clipped": sum(s.get("status", {}).get(quantity) == "clipped" for s in seeds)}
    return out


@contextlib.contextmanager
def one_thread():
    """Run the estimators on one intra-op thread. Their probes are small (at most 2,000 rows), so a second thread
    costs more in wake-ups than it saves (the demo teacher's 110 estimates: 13.2 s on 2 threads, 9.5 s on one), and
    on one thread the estimates do not depend on how many cores the machine has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure_checkpoint(model, data: data_mod.Data, plans: dict, subsets: dict, *, temperature: float,
                       probe_epochs: int) -> dict:
    record = {}
    for split in SPLITS:
        whole, (logits, features, labels) = read_split(model, data, split, subsets[split], temperature=temperature)
        entry = whole.measures()
        notes = []
        if whole.features is None:
            entry["nc1"] = _finite(nc1(features, labels))
            notes.append(f"{split}: NC1 read on the {len(labels):,} estimator images (features of width "
                         f"{features.shape[1]:,} > {NC1_FEATURES:,})")
        elif not whole.features.finite:
            notes.append("features contain NaN or infinite values: every estimate of this checkpoint failed")
        with one_thread():
            decay = shared_probe_decay(features, plans[split], probe_epochs)
            seeds = [seed_measures(logits, labels, features, plan, temperature=temperature,
                                   probe_epochs=probe_epochs, probe_decay=decay) for plan in plans[split]]
        if not plans[split]:
            notes.append(f"{split}: too few images for the estimators ({len(labels)}); only the whole-split "
                         f"measures were taken")
        failed = sum(any(v == "failed" for v in s.get("status", {}).values()) for s in seeds)
        if failed and not notes:
            notes.append(f"{split}: {failed} of {len(seeds)} split seeds gave a failed estimate "
                         f"({_why_failed(seeds, plans[split])})")
        record[split] = {**entry, "seeds": seeds, "estimates": summarise(seeds), "notes": notes}
    return _finite(record)


def _why_failed(seeds: list[dict], plans: list) -> str:
    """What made the estimates fail, for the note: which estimate, how far outside its valid range, on how many
    held-out images (too few is the usual cause)."""
    limits = {"i_yf": f"below -{info.estimators.FAIL_I_YF} H(Y)",
              "i_xf": f"below -{info.estimators.FAIL_I_XF} nats per component"}
    parts = []
    for term, label in (("i_yf", "I(Y;F)"), ("i_xf", "I(X;F)")):
        bad = [s.get("raw", {}).get(term) for s in seeds if s.get("status", {}).get(term) == "failed"]
        if bad:
            finite = [v for v in bad if v is not None]
            value = f"raw down to {min(finite):.3g} nats, {limits[term]}" if finite else "not finite"
            parts.append(f"{label} {value} in {len(bad)}")
    held = min((len(plan.held) for plan in plans), default=0)
    return "; ".join(parts) + f"; {held} held-out images per seed, a larger split makes the estimators steadier"


def _plans(data: data_mod.Data, split: str, *, seed: int, seeds: int) -> tuple[torch.Tensor, list, str | None]:
    """The estimator subset of a split and its K split plans (X components included); empty when too small."""
    labels = getattr(data, f"{split}_y").cpu()
    sub = estimator_subset(labels, ESTIMATOR_SAMPLES, seed)
    inputs = data.inputs(split, sub).cpu()
    try:
        plans = [info.plan_split(inputs, labels[sub], seed=1000 * seed + k) for k in range(seeds)]
    except UserError as e:
        return sub, [], f"{split}: the estimators were skipped ({e})"
    if min(torch.bincount(labels[sub][plans[0].fit]).tolist()) < 2:
        return sub, [], f"{split}: the estimators were skipped (a class has fewer than 2 fit images)"
    return sub, plans, None


def _check_writable(folder: Run) -> None:
    """Refuse before any work when the analysis cannot be saved (a teacher in someone else's read-only folder), or
    `--out` names a place that belongs to something else: inside a run folder, a study, a folder of runs, or a folder
    holding another run's analysis (which would be overwritten)."""
    home = folder.analysis_home
    elsewhere = home.resolve() != folder.path.resolve()
    if elsewhere:
        if str(home) in ("", "."):
            raise UserError("analyze: --out names no folder; give the folder the analysis goes in")
        if home.exists() and not home.is_dir():
            raise UserError(f"analyze: --out {home} is a file, not a folder")
        owner = next((p for p in (home, *home.resolve().parents) if (p / "manifest.json").is_file()), None)
        if owner is not None:
            where = "is a run folder" if owner == home else f"is inside the run folder {owner}"
            raise UserError(f"analyze: --out {home} {where}; name a folder of its own for the analysis (or leave "
                            "--out out to analyse a run into its own folder)")
        if (home / "results.sqlite").exists() or (home.is_dir() and runs_under(home)):
            raise UserError(f"analyze: --out {home} holds a study or run folders; name a folder of its own")
        if (home / ANALYSIS_FILE).is_file():
            try:
                Run(folder.path, analysis_dir=home).analysis("analyze --out")
            except UserError as e:
                raise UserError(f"analyze: --out {home} holds another analysis ({e}); name a new folder, or remove "
                                f"{home / ANALYSIS_FILE} first") from None
    try:
        ensure_writable(folder.analysis_cache_dir)
    except OSError as e:
        hint = "" if elsewhere else "; write the analysis elsewhere with --out DIR"
        raise UserError(f"analyze: cannot write to {folder.analysis_cache_dir} ({e.strerror or e}){hint}") from e


def analyze(run: str | Path, *, temperature: float | None = None, seed: int = 0, seeds: int = SEEDS,
            split: str = "train", plots: bool = True, quiet: bool = False, allow_incomplete: bool = False,
            out: str | Path | None = None) -> dict:
    """Analyse every checkpoint of `run`; writes RUN/analysis.json (and RUN/plots/, RUN/analysis-cache/), or the same
    into `out` for a run that should stay untouched, and returns the analysis."""
    if split not in SPLITS:
        raise UserError(f"analyze: --split must be train or val, got {split!r}")
    if not 1 <= seeds <= 100:
        raise UserError(f"analyze: --seeds must be between 1 and 100, got {seeds}")
    if not 0 <= seed <= config_mod.MAX_SEED:
        raise UserError(f"analyze: --seed must be between 0 and {config_mod.MAX_SEED:,}, got {seed}")
    if temperature is not None and not (0 < temperature <= config_mod.FLOAT32_MAX):
        raise UserError(f"analyze: --temperature must be a positive number, got {temperature}")
    folder = Run(run, analysis_dir=out)
    run = folder.path
    checkpoints = resolve(f"{run}@all", allow_incomplete=allow_incomplete)
    manifest = folder.manifest
    cfg = folder.config()
    _check_writable(folder)
    for leftovers in (folder.analysis_home, folder.analysis_cache_dir, folder.plots_dir):  # of a killed analysis
        remove_stale_temporaries(leftovers, shared=True)
    tau = temperature if temperature is not None else cfg["kd"]["temperature"]
    say = (lambda _m: None) if quiet else (lambda m: print(f"analyze: {m}", file=sys.stderr))
    started = time.perf_counter()
    data = data_mod.build(cfg["data"], "cpu")
    changed = data_change(manifest.data, data.describe())
    if changed:  # the measures would describe other images, or misread the classes
        raise UserError(f"analyze: {run} was trained on {changed}; analyse it on the data it was trained on")
    settings = {"method": METHOD_VERSION, "temperature": tau, "seed": seed, "seeds": seeds, "data": data.fingerprint,
                "estimator_samples": ESTIMATOR_SAMPLES, "probe_epochs": PROBE_EPOCHS,
                "x_components": info.estimators.X_COMPONENTS}
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]

    subsets, plans, notes = {}, {}, []
    for name in SPLITS:
        subsets[name], plans[name], note = _plans(data, name, seed=seed, seeds=seeds)
        if note:
            notes.append(note)
            say(note)
    from tqdm import tqdm

    records, computed = [], 0
    for ckpt in tqdm(checkpoints, desc="analyze", leave=False, disable=True if quiet else None, file=sys.stderr):
        cache_file = folder.analysis_cache_dir / f"{ckpt.sha256[:24]}-{settings_key}.json"
        record = (read_sealed_json(cache_file, "analysis cache", remedy="delete it; it is computed again",
                                   required=lambda _r: False) if cache_file.is_file() else None)
        if record is None:
            record = measure_checkpoint(ckpt.build_model("cpu"), data, plans, subsets, temperature=tau,
                                        probe_epochs=PROBE_EPOCHS)
            write_sealed_json(cache_file, record)
            computed += 1
        for name in SPLITS:
            for note in record[name]["notes"]:
                say(f"epoch {ckpt.epoch}: {note}")
        records.append({"epoch": ckpt.epoch, "fraction": ckpt.fraction, "sha256": ckpt.sha256,
                        "val_acc": ckpt.metrics.get("val_acc"), **record})

    criteria = {f"{c.name}@{s}": selection.evaluate(records, c, s) for c in selection.CRITERIA.values()
                for s in SPLITS}
    key = selection.criterion_key("info", split, split)
    chosen = criteria[key]
    if chosen["t_star"] is None:  # no valid information estimate anywhere: fall back to validation accuracy
        key = "val@val" if criteria["val@val"]["t_star"] is not None else "recorded-val"
        notes.append(f"{selection.criterion_key('info', split, split)} could not be computed on any checkpoint; T* "
                     f"falls back to {key}")
        say(notes[-1])
        if key == "recorded-val":  # the splits are too small for any seeded measure: the manifest's accuracy
            best = max(records, key=lambda r: (r["val_acc"] if r["val_acc"] is not None else -1.0, r["epoch"]))
            criteria[key] = {"criterion": "recorded-val", "split": "val", "t_star": best["epoch"],
                             "ties": [best["epoch"]], "best": best["epoch"], "flat": False, "skipped": [],
                             "terms": {"val_acc": "raw"},
                             "scores": [{"epoch": r["epoch"], "score": r["val_acc"], "se": None, "diff": None,
                                         "diff_se": None, "tied": r is best} for r in records]}
        chosen = criteria[key]
    if chosen["flat"]:
        skipped = sorted(s["epoch"] for s in chosen.get("skipped") or [])
        notes.append(f"{key} is flat across these checkpoints (its range does not exceed its noise): every "
                     "checkpoint ties and T* is the one with the best validation accuracy" if not skipped else
                     f"{key} is flat across the checkpoints it could score (its range does not exceed its noise): "
                     f"they tie and T* is the one of them with the best validation accuracy; epoch"
                     f"{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))} could not be scored")
    if len(records) < 3:
        notes.append(f"only {len(records)} checkpoint(s): normalising across so few says little")
    best = chosen["t_star"]
    analysis = {
        "format": FORMAT, "ckptkd": provenance(), "run": str(run), "split": split, "seed": seed, "seeds": seeds,
        "temperature": tau,
        "splits": {name: {"n": len(getattr(data, f"{name}_y")), "estimator_samples": len(subsets[name]),
                          "estimators": bool(plans[name])} for name in SPLITS},
        "class_names": data.class_names,
        "checkpoints": records,
        "criteria": criteria,
        # T* (the tie-aware pick) and T*_info (the criterion's pure argmax, the paper's rule), both named.
        "selected": {"epoch": best, "fraction": next(r["fraction"] for r in records if r["epoch"] == best),
                     "reference": f"{run}@epoch={best}", "criterion": key, "ties": chosen["ties"],
                     "argmax": chosen.get("best"),
                     "description": (selection.CRITERIA[key.split("@")[0]].doc + f", on the {key.split('@')[1]} "
                                     "split; ties: not significantly worse than its argmax, broken by validation "
                                     "accuracy")
                     if key in criteria and "@" in key else "the validation accuracy recorded at each checkpoint"},
        "ranking": [{"epoch": e} for e in selection.ranking(chosen)],
        "agreement": _agreement(records, criteria, split),
        "notes": notes,
        "timing_s": {"measure": round(time.perf_counter() - started, 3), "computed": computed,
                     "cached": len(records) - computed},
    }
    if not plots:
        folder.write_analysis(analysis)
        return analysis
    from .plots import plot_analysis

    plot_started = time.perf_counter()
    with folder.new_plots() as building:  # published with analysis.json, or removed
        made = plot_analysis(folder, analysis, manifest, out=building)
        analysis["plots"] = {k: str(folder.plots_dir / Path(v).name) for k, v in made.items()}
        analysis["timing_s"]["plots"] = round(time.perf_counter() - plot_started, 3)
        folder.write_analysis(analysis, plots=building)
    return analysis


def estimate(record: dict, split: str, quantity: str) -> dict:
    return record[split]["estimates"][quantity]


def _agreement(records: list[dict], criteria: dict, split: str) -> dict:
    """Spearman rank agreement of the probe/decoder and kNN estimators across checkpoints (means over seeds)."""
    def rho(a, b):
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        value = info.spearman([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) >= 2 else math.nan
        return None if value != value else round(value, 6)

    means = lambda q: [estimate(r, split, q)["mean"] for r in records]
    scores = lambda key: {row["epoch"]: row["score"] for row in criteria[key]["scores"]}
    probe, knn = scores(f"info@{split}"), scores(f"knn-info@{split}")
    epochs = [r["epoch"] for r in records]
    return {"split": split, "spearman_i_xf": rho(means("i_xf"), means("knn_i_xf")),
            "spearman_i_yf": rho(means("i_yf"), means("knn_i_yf")),
            "spearman_score": rho([probe.get(e) for e in epochs], [knn.get(e) for e in epochs])}


def select(run: str | Path, *, k: int = 1, by: str = "info", split: str | None = None,
           allow_incomplete: bool = False, student: str | Path | dict | None = None,
           overrides: dict | list | None = None, proxy_epochs: int | None = None,
           analysis: str | Path | None = None) -> dict:
    """The best K checkpoints (K > 1: a snapshot ensemble) by a criterion of `selection.CRITERIA` on a split.

    Returns {"run", "criterion", "t_star" (the tie-aware pick), "t_star_info" (the criterion's pure argmax), "ties",
    "references", "checkpoints": [{"epoch", "score", "se", "tied"}],
    "flat", "skipped"}. `by="val"` without an analysis reads the validation accuracy recorded in the manifest;
    `by="proxy"` distills short proxies of `student` (with `overrides`) from every checkpoint (`selection.proxy`).
    `analysis`: the folder `analyze --out` wrote the run's analysis to (the proxies are kept there too)."""
    if analysis is not None:
        home = Path(analysis)
        if (home / "manifest.json").is_file() or (home.exists() and not home.is_dir()):
            raise UserError(f"select: --analysis {home} is {'a run folder' if home.is_dir() else 'a file'}; name "
                            "the folder `ckptkd analyze RUN --out DIR` wrote")
    folder = Run(run, analysis_dir=analysis)
    checkpoints = resolve(f"{folder.path}@all", allow_incomplete=allow_incomplete)
    by_epoch = {c.epoch: c for c in checkpoints}
    if by == "proxy":
        if student is None:
            raise UserError("select --by proxy needs the student: --student CONFIG")
        from .proxy import proxy_select

        result = proxy_select(folder.path, student, overrides=overrides, epochs=proxy_epochs,
                              allow_incomplete=allow_incomplete, analysis=analysis)
        epochs = [result["t_star"]] + sorted((r["epoch"] for r in result["scores"] if r["epoch"] != result["t_star"]),
                                             key=lambda e: -next(r["score"] for r in result["scores"]
                                                                 if r["epoch"] == e))
    elif by == "val" and split in (None, "val") and not folder.has_analysis():
        ordered = sorted(checkpoints, key=lambda c: (c.metrics["val_acc"], c.epoch), reverse=True)
        result = {"criterion": "val (recorded)", "t_star": ordered[0].epoch, "best": ordered[0].epoch,
                  "ties": [ordered[0].epoch],
                  "scores": [{"epoch": c.epoch, "score": c.metrics["val_acc"], "se": None, "tied": c is ordered[0]}
                             for c in sorted(checkpoints, key=lambda c: c.epoch)], "flat": False, "skipped": []}
        epochs = [c.epoch for c in ordered]
    else:
        analysis = folder.analysis(f"select --by {by}")
        if analysis.get("format") != FORMAT:
            raise UserError(f"select: {folder.analysis_path} was written by an older ckptkd; rerun "
                            f"`{folder.analyze_command()}`")
        key = selection.criterion_key(by, split, analysis["split"])
        result = {**analysis["criteria"][key], "criterion": key}
        if result["t_star"] is None:
            raise UserError(f"select: {key} could not be computed for any checkpoint of {folder.path} "
                            f"({'; '.join(s['why'] for s in result['skipped'][:1])})")
        epochs = selection.ranking(result)
    if not 1 <= k <= len(epochs):
        raise UserError(f"select: --k must be between 1 and {len(epochs)} (the run's checkpoints)")
    unknown = [e for e in epochs[:k] if e not in by_epoch]
    if unknown:
        raise UserError(f"select: {folder.analysis_path} names epoch {unknown[0]}, which the run has no "
                        f"checkpoint of; rerun `{folder.analyze_command()}`")
    return {"run": str(folder.path), "criterion": result["criterion"], "t_star": result["t_star"],
            "t_star_info": result.get("best"), "ties": result["ties"],
            "references": [by_epoch[e].reference for e in epochs[:k]],
            "checkpoints": [{k_: row.get(k_) for k_ in ("epoch", "score", "se", "tied")} for row in result["scores"]],
            "flat": result["flat"], "skipped": result["skipped"],
            **({"cost_s": result["cost_s"], "proxy_epochs": result["epochs"]} if by == "proxy" else {})}
