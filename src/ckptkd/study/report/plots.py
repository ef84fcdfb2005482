"""The report's figures in STUDY/plots/: student accuracy by variant, each selection benchmark's curve, and copies of
the lead teachers' own figures (information plane, class correlation, trajectory). A teacher figure whose run
folder is not here is kept from an earlier report, never deleted. File names carry the pair's name as a slug."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ... import stats
from ...formatting import slug
from ...run.storage import atomic_write_bytes
from .. import variants as variants_mod
from .model import PairReport, Report
from .selection import SelectionBenchmark

TEACHER_FIGURES = ("information_plane", "class_correlation", "trajectory")
ACCURACY = "accuracy_by_variant.png"


def _name(kind: str, pair: str) -> str:
    return f"{kind}_{slug(pair, keep='._', collapse=True)}.png"


@dataclass
class Figures:
    """The figures written (paths): the accuracy plot, each pair's selection curve, and the teacher figures present
    (pair -> [(figure, path)])."""
    accuracy: str | None = None
    selection: dict[str, str] = field(default_factory=dict)
    teacher: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def paths(self) -> list[str]:
        return ([self.accuracy] if self.accuracy else []) + list(self.selection.values()) + [
            path for figures in self.teacher.values() for _, path in figures]


def write_figures(report: Report, study: Path) -> Figures:
    plots = study / "plots"
    figures = Figures()
    for pair in report.pairs:
        if pair.selection is not None:
            figures.selection[pair.name] = selection_plot(pair, pair.selection,
                                                          plots / _name("selection", pair.name))
    for pair in report.pairs:
        if not pair.trajectories:
            continue  # a pair without teacher runs in the database shows no teacher figures
        figures.teacher[pair.name] = []
        for figure in TEACHER_FIGURES:
            target = plots / _name(figure, pair.name)
            source = study / pair.lead_teacher / "plots" / f"{figure}.png" if pair.lead_teacher is not None else None
            if source is not None and source.is_file():
                atomic_write_bytes(target, source.read_bytes())
            if target.is_file():  # copied now, or kept from an earlier report when the run folder is not here
                figures.teacher[pair.name].append((figure, str(target)))
    if report.pairs:
        figures.accuracy = accuracy_plot(report.pairs, plots / ACCURACY)
    return figures


def accuracy_plot(pairs: list[PairReport], path: Path) -> str:
    """Each pair's students by variant (Table 3's and the ensembles): one dot per student, mean ± std, and the no-KD
    baseline as a band."""
    from ...selection.plots import plt, save

    shown = {p.name: [v for v in p.variants if v != "none" and variants_mod.parse(v).table in ("table3", "ensembles")]
             for p in pairs}
    width = max(len(v) for v in shown.values()) if shown else 1
    fig, axes = plt.subplots(1, len(pairs), figsize=((1.5 + 0.65 * width) * len(pairs), 3.8), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for x, variant in enumerate(shown[pair.name]):
            values = [100 * v for v in pair.cell(variant).values]
            if not values:
                continue
            ax.scatter(x + np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [x], values, s=12,
                       color="0.55", zorder=2)
            mean, std = stats.mean_std(values)
            ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="o", color="C0", capsize=4, zorder=3)
        baseline = [100 * v for v in pair.cell("none").values]
        if baseline:
            mean, std = stats.mean_std(baseline)
            ax.axhline(mean, color="crimson", ls="--", lw=1, label="no KD (mean ± std)")
            if std:
                ax.axhspan(mean - std, mean + std, color="crimson", alpha=0.08, lw=0)
            ax.legend(fontsize=7, frameon=False, loc="best")
        ax.set_xticks(range(len(shown[pair.name])), [variants_mod.parse(v).label for v in shown[pair.name]],
                      rotation=30, ha="right")
        ax.set_ylabel("student test accuracy (%)")
        ax.set_title(pair.name, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def selection_plot(pair: PairReport, benchmark: SelectionBenchmark, path: Path) -> str:
    """Student accuracy against the teacher epoch that taught it (mean ± SE over seeds, one line per trajectory),
    with each selector's pick marked on its trajectory's line."""
    from ...selection.plots import plt, save

    markers = "*^vsDPXo<>"
    fig, ax = plt.subplots(figsize=(8, 4.4), layout="constrained")
    for i, (t, by_epoch) in enumerate(sorted(benchmark.curve.items())):
        epochs = sorted(by_epoch)
        means = [100 * statistics.mean(by_epoch[e].values()) for e in epochs]
        ses = [100 * (stats.mean_se(list(by_epoch[e].values()))[1] or 0.0) for e in epochs]
        color = f"C{i}"
        ax.errorbar(epochs, means, yerr=ses, fmt="-", color=color, capsize=2, lw=1.2, label=f"trajectory {t}")
        for j, selector in enumerate(benchmark.selectors):
            pick = selector.picks.get(t)
            if pick in by_epoch:
                ax.scatter([pick], [means[epochs.index(pick)]], marker=markers[j % len(markers)], s=70,
                           facecolor="none", edgecolor=color, lw=1.1, zorder=3,
                           label=selector.label if i == 0 else None)
    ax.set_xlabel("teacher epoch (the checkpoint that taught the student)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"selection benchmark — {pair.teacher_model} → {pair.student_model}")
    fig.legend(loc="outside right center", fontsize=7, frameon=False)
    return save(fig, path)
