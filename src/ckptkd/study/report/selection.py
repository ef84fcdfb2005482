"""The selection benchmark: every saved checkpoint of each trajectory taught a student (the `epoch<N>` variants),
so the best teacher in hindsight is known, and each checkpoint selector can be scored by what its pick loses.

Honest by construction: the best epoch in hindsight is never chosen on the students that score it. For each
student seed s, the best epoch is the one whose students of the *other* seeds have the highest mean accuracy
(cross-fitting, leave one seed out; the later epoch on a tie), and the regret of a selector at (trajectory, seed s)
is the accuracy of its pick's student of seed s minus that of the best epoch's student of seed s (0: as good as the
best in hindsight; negative: lost). Gain: minus T^full's student of the same seed. Both in points. The students of a
trajectory share their teacher, so each trajectory's mean is one unit: mean ± SE over trajectories. A selector's
cost is what it takes per trajectory beyond the students themselves: the analysis' wall time for the criteria of
`ckptkd analyze`, the proxy students' for the proxy, nothing for the fixed rules and best validation accuracy
(recorded when each checkpoint was saved).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ... import stats
from ...config import epoch_at_fraction
from .. import variants as variants_mod
from .rows import PairRows

# (label, key): the analysis' criteria by their key in `picks` (":argmax" for a criterion's pure argmax), the proxy
# selector, and three fixed rules (best-val, T0.5, Tfull)
SELECTORS = (("T* (info, train; tie-aware)", "info@train"), ("T*_info (info, train; argmax)", "info@train:argmax"),
             ("info, val", "info@val"), ("kNN info, train", "knn-info@train"), ("p_target, train", "p_target@train"),
             ("non-target entropy, train", "nontarget_entropy@train"), ("NC1, train", "nc1@train"),
             ("proxy (short distillation, val)", "proxy"), ("best val accuracy", "best-val"), ("T^0.5", "T0.5"),
             ("T^full", "Tfull"))
ANALYSIS_KEYS = {key for _label, key in SELECTORS if "@" in key}

Curve = dict[int, dict[int, dict[int, float]]]  # trajectory -> teacher epoch -> seed -> student accuracy


@dataclass
class Selector:
    """One selector's picks (trajectory -> epoch, None where it picked none), its regrets and gains in points by
    trajectory (one per seed whose pick and cross-fitted best both taught a student), and its cost per trajectory in
    seconds (None where it has none to measure: the fixed rules cost nothing)."""
    label: str
    key: str
    picks: dict[int, int | None]
    regrets: dict[int, list[float]] = field(default_factory=dict)
    gains: dict[int, list[float]] = field(default_factory=dict)
    costs: list[float] = field(default_factory=list)

    @staticmethod
    def _by_trajectory(values: dict[int, list[float]]) -> tuple[float, float | None] | None:
        """(mean, SE) over the trajectories' means: the trajectory is the independent unit."""
        means = [statistics.mean(v) for v in values.values() if v]
        return stats.mean_se(means) if means else None

    @property
    def regret(self) -> tuple[float, float | None] | None:
        return self._by_trajectory(self.regrets)

    @property
    def gain(self) -> tuple[float, float | None] | None:
        return self._by_trajectory(self.gains)

    @property
    def trajectories(self) -> int:
        return sum(1 for v in self.regrets.values() if v)

    @property
    def cost_s(self) -> float | None:
        return statistics.mean(self.costs) if self.costs else None


@dataclass
class SelectionBenchmark:
    """`curve` the students' accuracies; `best` trajectory -> seed -> the cross-fitted best epoch for that seed."""
    curve: Curve
    selectors: list[Selector]
    best: dict[int, dict[int, int]] = field(default_factory=dict)

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
    """key -> the epoch each selector picks on one trajectory, from the analysis' and the proxy's database rows."""
    metrics = (pair.analyses.get(trajectory) or {}).get("metrics") or {}
    picks = metrics.get("picks") or {}
    proxy = pair.proxies.get(trajectory)
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
        elif key == "proxy":
            complete = proxy is not None and proxy["status"] == "complete"
            out[key] = (proxy["metrics"] or {}).get("t_star") if complete else None
        elif key.endswith(":argmax"):
            out[key] = (picks.get(key.split(":")[0]) or {}).get("t_star_info")
        else:
            out[key] = (picks.get(key) or {}).get("t_star")
    return out


def _cost(pair: PairRows, trajectory: int, key: str, seconds) -> float | None:
    row = pair.proxies.get(trajectory) if key == "proxy" else (
        pair.analyses.get(trajectory) if key in ANALYSIS_KEYS else None)
    return None if row is None else seconds(row)


def cross_fitted_best(by_epoch: dict[int, dict[int, float]], seed: int) -> int | None:
    """The epoch whose students of every seed but `seed` have the highest mean accuracy (the later on a tie); None
    when no other seed taught a student."""
    means = {e: statistics.mean(a for s, a in accs.items() if s != seed) for e, accs in by_epoch.items()
             if any(s != seed for s in accs)}
    return max(means, key=lambda e: (means[e], e)) if means else None


def selection_benchmark(pair: PairRows, seconds=lambda row: None) -> SelectionBenchmark | None:
    """None for a pair without `epoch<N>` students. `seconds(row)`: a row's wall time (the cost of a selector)."""
    curve = _curve(pair)
    if not curve:
        return None
    selectors = {key: Selector(label, key, {}) for label, key in SELECTORS}
    best_by_seed: dict[int, dict[int, int]] = {}
    for t, by_epoch in sorted(curve.items()):
        epochs = sorted(by_epoch)
        last = max(epochs)
        seeds = sorted({s for accs in by_epoch.values() for s in accs})
        best_by_seed[t] = {s: b for s in seeds if (b := cross_fitted_best(by_epoch, s)) is not None}
        for key, pick in _picks(pair, t, epochs).items():
            selector = selectors[key]
            selector.picks[t] = pick
            cost = _cost(pair, t, key, seconds)
            if cost is not None:
                selector.costs.append(cost)
            if pick not in by_epoch:
                continue
            for s, acc in by_epoch[pick].items():
                best = best_by_seed[t].get(s)
                if best is not None and s in by_epoch[best]:
                    selector.regrets.setdefault(t, []).append(100 * (acc - by_epoch[best][s]))
                if s in by_epoch[last]:
                    selector.gains.setdefault(t, []).append(100 * (acc - by_epoch[last][s]))
    return SelectionBenchmark(curve, list(selectors.values()), best_by_seed)
