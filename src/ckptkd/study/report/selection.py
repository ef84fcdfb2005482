"""The selection benchmark: every saved checkpoint of each trajectory taught a student (the `epoch<N>` variants),
so the best teacher in hindsight is known, and each checkpoint selector can be scored by what its pick loses.

Regret: the accuracy of the student of a selector's pick minus that of the best epoch's student with the same seed
(0 is perfect, negative is lost); gain: minus T^full's student. Both in points, one value per (trajectory, seed).
The best epoch of a trajectory is the one whose students have the highest mean accuracy over seeds (the later
epoch on a tie).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ... import stats
from ...config import epoch_at_fraction
from .. import variants as variants_mod
from .rows import PairRows

# (label, key): the analysis' criteria by their key in `picks`, and three fixed rules (best-val, T0.5, Tfull)
SELECTORS = (("T* (info, train)", "info@train"), ("info, val", "info@val"), ("kNN info, train", "knn-info@train"),
             ("p_target, train", "p_target@train"), ("non-target entropy, train", "nontarget_entropy@train"),
             ("NC1, train", "nc1@train"), ("best val accuracy", "best-val"), ("T^0.5", "T0.5"), ("T^full", "Tfull"))

Curve = dict[int, dict[int, dict[int, float]]]  # trajectory -> teacher epoch -> seed -> student accuracy


@dataclass
class Selector:
    """One selector's picks (trajectory -> epoch, None where it picked none) and its regrets and gains in points,
    over the (trajectory, seed) whose pick taught a student."""
    label: str
    key: str
    picks: dict[int, int | None]
    regrets: list[float]
    gains: list[float]

    @property
    def regret(self) -> tuple[float, float | None] | None:
        """(mean, SE) of the regrets in points; None without any."""
        return stats.mean_se(self.regrets) if self.regrets else None

    @property
    def gain(self) -> tuple[float, float | None] | None:
        return stats.mean_se(self.gains) if self.gains else None


@dataclass
class SelectionBenchmark:
    curve: Curve
    selectors: list[Selector]

    @property
    def trajectories(self) -> list[int]:
        return sorted(self.curve)


def _curve(pair: PairRows) -> Curve:
    out: Curve = {}
    for variant in pair.variants:
        parsed = variants_mod.parse(variant)
        if parsed.base != "epoch":
            continue
        for (t, s), acc in pair.accuracy(variant).items():
            out.setdefault(t, {}).setdefault(parsed.epoch, {})[s] = acc
    return out


def _picks(pair: PairRows, trajectory: int, epochs: list[int]) -> dict[str, int | None]:
    """key -> the epoch each selector picks on one trajectory, from the analysis' database row."""
    metrics = (pair.analyses.get(trajectory) or {}).get("metrics") or {}
    picks = metrics.get("picks") or {}
    out = {}
    for _label, key in SELECTORS:
        if key == "best-val":
            rows = metrics.get("trajectory") or []
            best = max(rows, key=lambda r: (r.get("val_acc") or -1, r["epoch"]), default=None)
            out[key] = best["epoch"] if best else None
        elif key == "T0.5":
            out[key] = epoch_at_fraction(0.5, pair.teacher_epochs) if pair.teacher_epochs else None
        elif key == "Tfull":
            out[key] = max(epochs) if epochs else None
        else:
            out[key] = (picks.get(key) or {}).get("t_star")
    return out


def selection_benchmark(pair: PairRows) -> SelectionBenchmark | None:
    """None for a pair without `epoch<N>` students."""
    curve = _curve(pair)
    if not curve:
        return None
    selectors = {key: Selector(label, key, {}, [], []) for label, key in SELECTORS}
    for t, by_epoch in sorted(curve.items()):
        epochs = sorted(by_epoch)
        best = max(epochs, key=lambda e: (statistics.mean(by_epoch[e].values()), e))
        last = max(epochs)
        for key, pick in _picks(pair, t, epochs).items():
            selector = selectors[key]
            selector.picks[t] = pick
            if pick not in by_epoch:
                continue
            for s, acc in by_epoch[pick].items():
                if s in by_epoch[best]:
                    selector.regrets.append(100 * (acc - by_epoch[best][s]))
                if s in by_epoch[last]:
                    selector.gains.append(100 * (acc - by_epoch[last][s]))
    return SelectionBenchmark(curve, list(selectors.values()))
