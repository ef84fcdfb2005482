"""The report's figures in STUDY/plots/, each a PNG with a PDF beside it (same stem): student accuracy by variant,
each selection benchmark's curve, each pair's information plane (every trajectory, from the database's summaries:
`plane`), and copies of the lead teachers' own class-correlation and trajectory figures. A teacher figure whose run
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
from .plane import information_plane_plot, pair_colours
from .selection import SELECTORS, SelectionBenchmark, Selector

TEACHER_FIGURES = ("class_correlation", "trajectory")
ACCURACY = "accuracy_by_variant.png"
NO_KD, T_FULL = "crimson", "tab:green"  # the reference lines' colours, the same in every figure
PANELS_PER_ROW = 4


def _name(kind: str, pair: str) -> str:
    return f"{kind}_{slug(pair, keep='._', collapse=True)}.png"


def pdf_of(png: str | Path) -> Path:
    """The PDF written beside a figure's PNG."""
    return Path(png).with_suffix(".pdf")


@dataclass
class Figures:
    """The figures written (the PNGs' paths; each has its PDF beside it, `pdf_of`): the accuracy plot, each pair's
    selection curve and information plane, and the teacher figures present (pair -> [(figure, path)])."""
    accuracy: str | None = None
    selection: dict[str, str] = field(default_factory=dict)
    plane: dict[str, str] = field(default_factory=dict)
    teacher: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def paths(self) -> list[str]:
        return ([self.accuracy] if self.accuracy else []) + list(self.selection.values()) + list(
            self.plane.values()) + [path for figures in self.teacher.values() for _, path in figures]


def _copy_teacher_figure(source: Path | None, target: Path) -> None:
    """The lead teacher's figure, its PDF first (when the analysis wrote one), so a copied PNG has its PDF."""
    if source is None or not source.is_file():
        return
    if pdf_of(source).is_file():
        atomic_write_bytes(pdf_of(target), pdf_of(source).read_bytes())
    atomic_write_bytes(target, source.read_bytes())


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
        plane = plots / _name("information_plane", pair.name)
        if any(t.summary is not None for t in pair.trajectories):
            figures.plane[pair.name] = information_plane_plot(pair, plane)
        elif plane.is_file():  # kept from an earlier report: nothing here can redraw it
            figures.plane[pair.name] = str(plane)
        figures.teacher[pair.name] = []
        for figure in TEACHER_FIGURES:
            target = plots / _name(figure, pair.name)
            source = study / pair.lead_teacher / "plots" / f"{figure}.png" if pair.lead_teacher is not None else None
            _copy_teacher_figure(source, target)
            if target.is_file():  # copied now, or kept from an earlier report when the run folder is not here
                figures.teacher[pair.name].append((figure, str(target)))
    if report.pairs:
        figures.accuracy = accuracy_plot(report.pairs, plots / ACCURACY)
    return figures


def accuracy_plot(pairs: list[PairReport], path: Path) -> str:
    """accuracy_figure, saved; returns the PNG's path (a PDF beside it)."""
    from ...selection.plots import save

    return save(accuracy_figure(pairs), path)


def accuracy_figure(pairs: list[PairReport]):
    """Each pair's students by variant (Table 3's and the ensembles): one dot per student, mean ± std, and in each
    pair's panel two references: the no-KD students' mean ± std (dashed line, band) and T^full's students' mean
    (dash-dotted line, another colour). One legend, below the panels, where it covers no data."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from ...selection.plots import plt

    shown = {p.name: [v for v in p.variants if v != "none" and variants_mod.parse(v).table in ("table3", "ensembles")]
             for p in pairs}
    width = max(len(v) for v in shown.values()) if shown else 1
    # At most PANELS_PER_ROW panels a row, so that a study of many pairs stays readable on a page.
    columns = min(len(pairs), PANELS_PER_ROW) or 1
    rows = -(-len(pairs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=((1.5 + 0.65 * width) * columns, 3.9 * rows + 0.4),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[len(pairs):]:
        fig.delaxes(ax)
    references = {"none": False, "Tfull": False}
    variant_mean = None  # one of the error bars drawn, for the legend
    for ax, pair in zip(axes.flat, pairs):
        for x, variant in enumerate(shown[pair.name]):
            values = [100 * v for v in pair.cell(variant).values]
            if not values:
                continue
            ax.scatter(x + np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [x], values, s=12,
                       color="0.55", zorder=2)
            mean, std = stats.mean_std(values)
            variant_mean = ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="o", color="C0", capsize=4, zorder=3)
        baseline = [100 * v for v in pair.cell("none").values]
        if baseline:
            mean, std = stats.mean_std(baseline)
            ax.axhline(mean, color=NO_KD, ls="--", lw=1, zorder=1)
            if std:
                ax.axhspan(mean - std, mean + std, color=NO_KD, alpha=0.08, lw=0)
            references["none"] = True
        full = pair.cell("Tfull").values
        if full:
            ax.axhline(100 * statistics.mean(full), color=T_FULL, ls="-.", lw=1, zorder=1)
            references["Tfull"] = True
        ax.set_xticks(range(len(shown[pair.name])), [variants_mod.parse(v).label for v in shown[pair.name]],
                      rotation=30, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, len(shown[pair.name]) - 0.4)  # a panel of one variant as wide a slot as the others'
        ax.set_ylabel("student test accuracy (%)")
        ax.set_title(pair.name, fontsize=9)
    legend = [(Line2D([], [], marker="o", ms=4, ls="none", color="0.55"), "one student")]
    if variant_mean is not None:
        legend.append((variant_mean, "a variant's students: mean ± std"))
    if references["none"]:
        legend.append(((Patch(color=NO_KD, alpha=0.08, lw=0), Line2D([], [], color=NO_KD, ls="--", lw=1)),
                       "no KD: mean ± std"))
    if references["Tfull"]:
        legend.append((Line2D([], [], color=T_FULL, ls="-.", lw=1), "T^full: mean"))
    handles, labels = zip(*legend)
    # In one row where the panels are wide enough for it (about 2 inches an entry), else in two columns: a legend
    # wider than the figure would squeeze the panels.
    columns = len(handles) if fig.get_figwidth() >= 2 * len(handles) else 2
    fig.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=8, frameon=False)
    return fig


# One marker per selector that picks a checkpoint; T^full has none: it is always the last checkpoint, marked by a
# line of its own.
SELECTOR_MARKERS = dict(zip([key for _label, key in SELECTORS if key != "Tfull"], "*^vsDPXo<>hp8d"))
DODGE_POINTS = 10  # picks of several selectors at one checkpoint are set this far apart, side by side


@dataclass
class Pick:
    """A selector's pick drawn on a trajectory's curve: the teacher epoch and its students' mean accuracy (%)."""
    trajectory: int
    epoch: int
    accuracy: float
    selector: Selector


def side_by_side(picks: list[Pick], close: float) -> list[list[Pick]]:
    """The picks that would hide one another, grouped to be drawn side by side: at one epoch, those whose accuracies
    are within `close` of the next (the same checkpoint picked by several selectors, or trajectories whose curves
    meet there); in trajectory order within a group."""
    groups: list[list[Pick]] = []
    for pick in sorted(picks, key=lambda p: (p.epoch, p.accuracy, p.trajectory)):
        last = groups[-1][-1] if groups else None
        if last is not None and last.epoch == pick.epoch and pick.accuracy - last.accuracy <= close:
            groups[-1].append(pick)
        else:
            groups.append([pick])
    order = {id(pick): i for i, pick in enumerate(picks)}
    return [sorted(group, key=lambda p: order[id(p)]) for group in groups]


def _marker_points(marker: str) -> float:
    """A selector marker's size in points: a star of the others' size looks smaller than they do."""
    return 11.0 if marker == "*" else 7.5


def selection_plot(pair: PairReport, benchmark: SelectionBenchmark, path: Path) -> str:
    """selection_figure, saved; returns the PNG's path (a PDF beside it)."""
    from ...selection.plots import save

    return save(selection_figure(pair, benchmark), path)


def selection_figure(pair: PairReport, benchmark: SelectionBenchmark):
    """Student accuracy against the teacher epoch that taught it (mean ± SE over seeds, one line per trajectory in
    its colour), each selector's pick marked on its trajectory's line in that colour, the no-KD students' mean as a
    dashed line and T^full (the last checkpoint) as a dotted one. Two legends: the trajectories and references on
    the right, the selectors (black markers: the colour is the trajectory's) below."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import ScaledTranslation

    from ...selection.plots import plt

    colours = pair_colours(pair)
    fig, ax = plt.subplots(figsize=(8.5, 5.4), layout="constrained")
    none = pair.cell("none").values
    if none:
        ax.axhline(100 * statistics.mean(none), color=NO_KD, ls="--", lw=1, zorder=1,
                   label=f"no KD: mean of {len(none)} students")
    means_by_trajectory, picks = {}, []
    for t, by_epoch in sorted(benchmark.curve.items()):
        epochs = sorted(by_epoch)
        means = {e: 100 * statistics.mean(by_epoch[e].values()) for e in epochs}
        ses = [100 * (stats.mean_se(list(by_epoch[e].values()))[1] or 0.0) for e in epochs]
        ax.errorbar(epochs, [means[e] for e in epochs], yerr=ses, fmt="-", color=colours[t], capsize=2, lw=1.2,
                    zorder=2, label=f"trajectory {t}")
        means_by_trajectory[t] = means
        picks += [Pick(t, selector.picks[t], means[selector.picks[t]], selector) for selector in benchmark.selectors
                  if selector.key in SELECTOR_MARKERS and selector.picks.get(t) in by_epoch]
    span = np.ptp([m for means in means_by_trajectory.values() for m in means.values()]) or 1.0
    groups = side_by_side(picks, 0.02 * span)
    epochs_drawn = [e for by_epoch in benchmark.curve.values() for e in by_epoch]
    if epochs_drawn:  # room at both ends for picks set side by side (about 6 inches of axis span the epochs)
        widest = max(((len(g) - 1) / 2 * DODGE_POINTS / 72 for g in groups), default=0.0) + 0.1
        low, high = min(epochs_drawn), max(epochs_drawn)
        pad = widest * max(high - low, 1) / 6
        ax.set_xlim(low - pad, high + pad)
    for group in groups:
        for k, pick in enumerate(group):
            shift = (k - (len(group) - 1) / 2) * DODGE_POINTS / 72
            marker = SELECTOR_MARKERS[pick.selector.key]
            ax.scatter([pick.epoch], [pick.accuracy], marker=marker, s=_marker_points(marker) ** 2,
                       facecolor="none", edgecolor=colours[pick.trajectory], lw=1.1, zorder=3,
                       transform=ax.transData + ScaledTranslation(shift, 0, fig.dpi_scale_trans))
    lasts = sorted({max(by_epoch) for by_epoch in benchmark.curve.values()})
    for last in lasts:
        ax.axvline(last, color="0.35", ls=":", lw=1.2, zorder=1)
        ax.annotate(f"T^full (epoch {last})", (last, 1), xycoords=("data", "axes fraction"), xytext=(-3, -3),
                    textcoords="offset points", ha="right", va="top", fontsize=7, color="0.25")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="0.35", ls=":", lw=1.2))
    labels.append("T^full: the last checkpoint")
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False)
    drawn = {pick.selector.key for pick in picks}
    selectors = [Line2D([], [], marker=SELECTOR_MARKERS[s.key], ls="none", ms=_marker_points(SELECTOR_MARKERS[s.key]),
                        mfc="none", mec="black", label=s.label) for s in benchmark.selectors if s.key in drawn]
    if selectors:
        fig.legend(handles=selectors, loc="outside lower center", ncol=3, fontsize=7, frameon=False,
                   title="each selector's pick, in its trajectory's colour (picks that would hide one another: side "
                         "by side)",
                   title_fontsize=7)
    ax.set_xlabel("teacher epoch (the checkpoint that taught the student)")
    ax.set_ylabel("student test accuracy (%), mean ± SE over seeds")
    ax.set_title(f"selection benchmark — {pair.name}")
    return fig
