"""Teacher selection that knows its uncertainty: criteria over a run's checkpoints, tie sets, and T*.

Every criterion is computed from per-seed values (K split seeds, see `analysis`), so each checkpoint's score has a
mean and a standard error, and checkpoints are compared seed by seed (the same images on both sides).

* A criterion's terms are min-max normalised across checkpoints (the paper's Algorithm 1) only when the term's range
  across checkpoints exceeds twice its noise (the median standard error); a flat term gets weight 0 instead of the
  same weight as an informative one. If every term is flat, the criterion cannot tell the checkpoints apart.
* T*_info (`best`): the checkpoint with the highest mean score, the paper's pure argmax — noisy where checkpoints
  differ by less than the estimators' split noise.
* The tie set: every checkpoint not significantly worse than T*_info, seed by seed: its paired difference to the
  best is within t(0.975, K - 1) standard errors of that difference (checkpoints whose score is undefined on every
  seed are skipped, and named). The K split seeds resample one set of images, so their estimates are correlated:
  every SE here is Nadeau & Bengio's corrected resampled SE (`stats.resampled_mean_se`), not the plain one.
* T* (`t_star`, the tie-aware pick) is the tie set's checkpoint with the highest validation accuracy as recorded when
  it was saved (the criterion cannot tell them apart, so the better teacher by held-out accuracy is taken), the later
  one on equal accuracy. It is what `select`, `RUN@best-info` and a study's `Tstar` variant use.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..errors import UserError
from ..stats import resampled_mean_se, t_quantile
from .info.estimators import HOLDOUT


@dataclass(frozen=True)
class Criterion:
    name: str
    terms: tuple[tuple[str, int], ...]   # (per-seed quantity, direction: +1 higher is better, -1 lower is better)
    normalise: bool
    split: str | None                    # its default split; None: the analysis split (`analysis.split`)
    doc: str


CRITERIA = {c.name: c for c in (
    Criterion("info", (("i_xf", 1), ("i_yf", 1)), True, None,
              "normalised I(X;F) + I(Y;F), probe/decoder estimates (the paper's Algorithm 1)"),
    Criterion("knn-info", (("knn_i_xf", 1), ("knn_i_yf", 1)), True, None,
              "normalised I(X;F) + I(Y;F), kNN estimates (the cross-check as a selector)"),
    Criterion("val", (("acc", 1),), False, "val", "accuracy on held-out validation images"),
    Criterion("p_target", (("p_target_t", -1),), False, "train",
              "lowest mean tempered probability of the true class on training inputs (the softest targets)"),
    Criterion("nontarget_entropy", (("nontarget_entropy_t", 1),), False, "train",
              "highest entropy of the tempered non-target probabilities on training inputs (most dark knowledge)"),
    Criterion("nc1", (("nc1", 1),), False, "train",
              "highest within-class variability of F on training inputs (least neural collapse, NC1)"),
)}
TIE_SE = 2.0        # a term is normalised only when its range across checkpoints exceeds this many SEs
TIE_LEVEL = 0.975  # ties: not worse than the best at the 2.5 % one-sided level of a paired t over split seeds


def seed_mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and SE over split seeds, which overlap (`stats.resampled_mean_se`): a plain SE made tie sets too narrow,
    so that another set of split seeds picked another T*."""
    return resampled_mean_se(values, HOLDOUT)


def criterion_key(name: str, split: str | None, analysis_split: str) -> str:
    if name not in CRITERIA:
        raise UserError(f"select: unknown criterion {name!r} (known: {', '.join(CRITERIA)})")
    return f"{name}@{split or CRITERIA[name].split or analysis_split}"


def evaluate(checkpoints: list[dict], criterion: Criterion, split: str) -> dict:
    """The criterion on one split. `checkpoints`: [{"epoch", "val_acc", split: {"seeds": [{quantity: float|None}]}}].

    Returns {"criterion", "split", "t_star", "ties", "best", "scores": [{"epoch", "score", "se", "diff", "diff_se",
    "tied"}], "terms": {quantity: "normalised" | "flat" | "raw"}, "skipped": [{"epoch", "why"}], "flat": bool}."""
    per_seed = {c["epoch"]: [s for s in (c.get(split) or {}).get("seeds", [])] for c in checkpoints}
    terms_state, scales = {}, {}
    for quantity, direction in criterion.terms:
        means, ses = [], []
        for seeds in per_seed.values():
            values = [s.get(quantity) for s in seeds if s.get(quantity) is not None]
            if values:
                mean, se = seed_mean_se(values)
                means.append(mean)
                ses.append(se or 0.0)
        if not criterion.normalise:
            terms_state[quantity] = "raw"
            continue
        if not means:
            terms_state[quantity] = "flat"
            continue
        low, high = min(means), max(means)
        noise = statistics.median(ses) if ses else 0.0
        if high - low > TIE_SE * noise and high > low:
            terms_state[quantity], scales[quantity] = "normalised", (low, high)
        else:
            terms_state[quantity] = "flat"

    def seed_score(seed: dict) -> float | None:
        """None when any term failed on this seed, flat or not: a failed estimate disqualifies the seed."""
        if any(seed.get(quantity) is None for quantity, _ in criterion.terms):
            return None
        total = 0.0
        for quantity, direction in criterion.terms:
            if terms_state[quantity] == "flat":
                continue
            value = seed[quantity]
            if quantity in scales:
                low, high = scales[quantity]
                value = (value - low) / (high - low)
            total += direction * value
        return total

    scores, skipped = {}, []
    for epoch, seeds in per_seed.items():
        values = {i: seed_score(s) for i, s in enumerate(seeds)}
        values = {i: v for i, v in values.items() if v is not None}
        if values:
            scores[epoch] = values
        else:
            why = "no split seed gave a valid estimate" if seeds else "not measured on this split"
            skipped.append({"epoch": epoch, "why": why})
    if not scores:
        return {"criterion": criterion.name, "split": split, "t_star": None, "ties": [], "best": None, "scores": [],
                "terms": terms_state, "skipped": skipped, "flat": True}
    means = {e: statistics.mean(v.values()) for e, v in scores.items()}
    best = max(means, key=lambda e: (means[e], e))
    rows, ties = [], []
    for epoch in sorted(scores):
        common = sorted(scores[epoch].keys() & scores[best].keys())
        diffs = [scores[epoch][i] - scores[best][i] for i in common]
        diff, diff_se = seed_mean_se(diffs) if diffs else (means[epoch] - means[best], None)
        if epoch == best:
            tied = True
        elif diff_se:
            # Not significantly worse than the best: a paired t over the split seeds, with their degrees of freedom
            # (2 SE alone is too narrow with 5 seeds: an estimated SE that comes out small by chance broke ties).
            tied = diff >= -t_quantile(TIE_LEVEL, len(diffs) - 1) * diff_se
        else:
            tied = diff >= 0.0
        ties += [epoch] if tied else []
        mean, se = seed_mean_se(list(scores[epoch].values()))
        rows.append({"epoch": epoch, "score": mean, "se": se, "diff": diff, "diff_se": diff_se, "tied": tied})
    val = {c["epoch"]: c.get("val_acc", -1.0) for c in checkpoints}
    t_star = max(ties, key=lambda e: (val.get(e) if val.get(e) is not None else -1.0, e))
    flat = all(state == "flat" for state in terms_state.values())
    return {"criterion": criterion.name, "split": split, "t_star": t_star, "ties": ties, "best": best,
            "scores": rows, "terms": terms_state, "skipped": skipped, "flat": flat}


def ranking(result: dict) -> list[int]:
    """Epochs best first: T* first, then by mean score (later first on equal scores); skipped ones last."""
    rest = sorted((r for r in result["scores"] if r["epoch"] != result["t_star"]),
                  key=lambda r: (r["score"], r["epoch"]), reverse=True)
    head = [result["t_star"]] if result["t_star"] is not None else []
    return head + [r["epoch"] for r in rest] + [s["epoch"] for s in result["skipped"]]
