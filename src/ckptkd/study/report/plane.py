"""The study's information plane of a pair: every teacher trajectory's checkpoints in one figure, I(Y;F) against
I(X;F) (the probe / decoder estimates, mean ± SE over split seeds), drawn from the trajectory summaries the report
model holds, so it needs no run folder (they are not committed with a study).

`plane_drawing` decides what is drawn (pure: which points, in which colour, which epochs are labelled and with what
text); `information_plane_figure` draws it, placing each label where it covers nothing; `information_plane_plot`
saves it. A converged trajectory's late checkpoints sit on top of each other: they
share one label naming the epochs it stands for ("18–60") instead of piling up into an unlabelled blob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .model import PairReport

MIN_LABEL_DISTANCE = 0.06  # between labelled points, as a fraction of the plotted span in x and in y


def trajectory_colours(numbers) -> dict[int, str]:
    """One distinct colour per trajectory number (by rank, so every figure of a pair gives trajectory t the same
    colour): the ten of tab10, tab20 up to twenty, a sampled sequential map beyond."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    numbers = sorted(set(numbers))
    if len(numbers) <= 20:
        palette = colormaps["tab10" if len(numbers) <= 10 else "tab20"].colors
        return {n: to_hex(palette[i]) for i, n in enumerate(numbers)}
    return {n: to_hex(colormaps["viridis"](i / (len(numbers) - 1))) for i, n in enumerate(numbers)}


def pair_colours(pair: PairReport) -> dict[int, str]:
    """The colours of a pair's trajectories, those of its selection benchmark included."""
    numbers = {t.number for t in pair.trajectories}
    if pair.selection is not None:
        numbers |= set(pair.selection.trajectories)
    return trajectory_colours(numbers)


@dataclass
class Track:
    """One trajectory's checkpoints with an estimate, in epoch order; `failed`: the epochs whose estimate failed."""
    number: int
    colour: str
    epochs: list[int]
    xs: list[float]
    ys: list[float]
    x_se: list[float]
    y_se: list[float]
    selected: int | None     # T*, when its checkpoint has an estimate
    argmax: int | None       # T*_info, when it differs from T* and has an estimate
    failed: list[int] = field(default_factory=list)

    def point(self, epoch: int) -> tuple[float, float]:
        i = self.epochs.index(epoch)
        return self.xs[i], self.ys[i]


@dataclass
class Label:
    """An epoch label at one checkpoint of a trajectory; `text` names every epoch it stands for."""
    number: int
    epoch: int
    text: str
    x: float
    y: float


@dataclass
class PlaneDrawing:
    tracks: list[Track]
    missing: list[int]       # trajectories without any estimate (not analysed, or every estimate failed)
    labels: list[Label]


def epoch_ranges(epochs: list[int], group: set[int]) -> str:
    """`group`'s epochs as runs of consecutive saved checkpoints: "18–60", or "6, 18–30"."""
    runs: list[list[int]] = []
    for i, epoch in enumerate(epochs):
        if epoch not in group:
            continue
        if runs and epochs.index(runs[-1][-1]) == i - 1:
            runs[-1].append(epoch)
        else:
            runs.append([epoch])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def _labels(tracks: list[Track], min_distance: float) -> list[Label]:
    """The labelled checkpoints across every trajectory: every trajectory's first checkpoint, then every last, then
    every T*, then the others trajectory by trajectory in epoch order, each only when at least `min_distance` from
    all labelled so far (in units of the plotted span). A checkpoint left unlabelled joins the nearest label of its
    own trajectory closer than that, whose text then names its epoch too."""
    from ...selection.plots import spaced_labels

    points = [(t, e) for t in tracks for e in t.epochs]
    index = {(t.number, e): i for i, (t, e) in enumerate(points)}
    xs = [t.point(e)[0] for t, e in points]
    ys = [t.point(e)[1] for t, e in points]
    priority = []
    for pick in (lambda t: t.epochs[0], lambda t: t.epochs[-1], lambda t: t.selected):
        priority += [index[(t.number, pick(t))] for t in tracks if pick(t) is not None]
    chosen = spaced_labels(xs, ys, priority, min_distance)
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0

    def distance(i: int, j: int) -> float:
        return math.hypot((xs[i] - xs[j]) / span_x, (ys[i] - ys[j]) / span_y)

    groups = {i: {points[i][1]} for i in chosen}
    for i, (track, epoch) in enumerate(points):
        own = [j for j in chosen if points[j][0] is track and distance(i, j) < min_distance]
        if i not in groups and own:
            groups[min(own, key=lambda j: distance(i, j))].add(epoch)
    return [Label(points[i][0].number, points[i][1], epoch_ranges(points[i][0].epochs, groups[i]), xs[i], ys[i])
            for i in chosen]


def plane_drawing(pair: PairReport, min_distance: float = MIN_LABEL_DISTANCE) -> PlaneDrawing:
    """What the pair's information plane shows: a track per trajectory with an estimate, the trajectories without
    one, and the epoch labels."""
    colours = pair_colours(pair)
    tracks, missing = [], []
    for trajectory in pair.trajectories:
        summary = trajectory.summary
        rows = summary.rows if summary is not None else []
        shown = sorted((r for r in rows if r.i_xf[0] is not None and r.i_yf[0] is not None), key=lambda r: r.epoch)
        if not shown:
            missing.append(trajectory.number)
            continue
        epochs = [r.epoch for r in shown]
        selected = summary.selected_epoch if summary.selected_epoch in epochs else None
        argmax = summary.argmax if summary.argmax in epochs and summary.argmax != selected else None
        tracks.append(Track(trajectory.number, colours[trajectory.number], epochs, [r.i_xf[0] for r in shown],
                            [r.i_yf[0] for r in shown], [r.i_xf[1] or 0.0 for r in shown],
                            [r.i_yf[1] or 0.0 for r in shown], selected, argmax,
                            sorted(set(r.epoch for r in rows) - set(epochs))))
    return PlaneDrawing(tracks, missing, _labels(tracks, min_distance) if tracks else [])


# Where a label may sit around its point: a direction (x, y and horizontal alignment), at growing distances in
# points, so a label near a crowded point moves out until it is clear.
_DIRECTIONS = ((1, 0.4, "left"), (1, -1.2, "left"), (-1, 0.4, "right"), (-1, -1.2, "right"), (0, 1, "center"),
               (0, -1.8, "center"))
_DISTANCES = (5, 10, 16, 24)
POINT_SIZE, STAR_SIZE = 3.5, 13.0  # marker sizes in points: the points and T*'s star


def _sampled(start, end, step: float):
    """Points along a display-space segment, `step` pixels apart (both ends included)."""
    import numpy as np

    count = max(2, int(math.hypot(end[0] - start[0], end[1] - start[1]) / step) + 1)
    return np.linspace(start, end, count)


class _Obstacles:
    """What no label may cover, in display space: boxes (the markers, the labels placed so far) and points sampled
    along every drawn line (the lines joining checkpoints, the error bars)."""

    def __init__(self, ax, renderer, drawing: PlaneDrawing):
        import numpy as np
        from matplotlib.transforms import Bbox

        one_point = renderer.points_to_pixels(1.0)
        self.boxes, segments = [], []
        for track in drawing.tracks:
            centres = ax.transData.transform(list(zip(track.xs, track.ys)))
            segments += list(zip(centres[:-1], centres[1:]))
            for i, epoch in enumerate(track.epochs):
                half = (STAR_SIZE if epoch in (track.selected, track.argmax) else POINT_SIZE) * one_point / 2
                (px, py) = centres[i]
                self.boxes.append(Bbox([[px - half, py - half], [px + half, py + half]]))
                x, y, x_se, y_se = track.xs[i], track.ys[i], track.x_se[i], track.y_se[i]
                left, right, bottom, top = ax.transData.transform([(x - x_se, y), (x + x_se, y), (x, y - y_se),
                                                                   (x, y + y_se)])
                segments += [(left, right), (bottom, top)]
        self.points = np.concatenate([_sampled(a, b, one_point) for a, b in segments]) if segments else \
            np.empty((0, 2))

    def covered_by(self, extent) -> bool:
        on_line = ((self.points[:, 0] >= extent.x0) & (self.points[:, 0] <= extent.x1)
                   & (self.points[:, 1] >= extent.y0) & (self.points[:, 1] <= extent.y1))
        return bool(on_line.any()) or any(extent.overlaps(box) for box in self.boxes)


def _place_label(ax, renderer, label: Label, colour: str, obstacles: _Obstacles) -> bool:
    """Draw `label` at the first place around its point (_DIRECTIONS at each of _DISTANCES) where it stays inside
    the axes and covers no obstacle, which it then becomes; False (nothing drawn) where no place is free."""
    inside = ax.get_window_extent(renderer)
    for distance in _DISTANCES:
        for dx, dy, align in _DIRECTIONS:
            text = ax.annotate(label.text, (label.x, label.y), textcoords="offset points",
                               xytext=(dx * distance, dy * distance), ha=align, fontsize=7, color=colour, zorder=6)
            text.set_in_layout(False)  # labels must not move the axes they were placed in
            extent = text.get_window_extent(renderer)
            within = inside.x0 <= extent.x0 and extent.x1 <= inside.x1 and inside.y0 <= extent.y0 \
                and extent.y1 <= inside.y1
            if within and not obstacles.covered_by(extent):
                obstacles.boxes.append(extent)
                return True
            text.remove()
    return False


def _place_labels(fig, ax, drawing: PlaneDrawing) -> None:
    """Every label where it covers no label placed before it, no point or star and no line; one with no free place
    is left out rather than drawn over another. Placed after the layout is fixed, so the extents compared are those
    saved."""
    colours = {t.number: t.colour for t in drawing.tracks}
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    obstacles = _Obstacles(ax, renderer, drawing)
    for label in drawing.labels:
        _place_label(ax, renderer, label, colours[label.number], obstacles)


def information_plane_plot(pair: PairReport, path: Path) -> str:
    """The pair's information plane (see the module's docstring), saved; returns the PNG's path (a PDF beside it)."""
    from ...selection.plots import save

    return save(information_plane_figure(pair), path)


def information_plane_figure(pair: PairReport):
    """The pair's information plane as a matplotlib figure, its labels placed."""
    from matplotlib.lines import Line2D

    from ...selection.plots import plt

    drawing = plane_drawing(pair)
    fig, ax = plt.subplots(figsize=(8.5, 5.2), layout="constrained")
    for track in drawing.tracks:
        failed = f"; estimate failed at epoch {', '.join(map(str, track.failed))}" if track.failed else ""
        star = f", T* = epoch {track.selected}" if track.selected is not None else ""
        ax.errorbar(track.xs, track.ys, xerr=track.x_se, yerr=track.y_se, fmt="-o", color=track.colour, ms=POINT_SIZE,
                    lw=1.2, elinewidth=0.7, capsize=0, zorder=2, label=f"trajectory {track.number}{star}{failed}")
        if track.selected is not None:
            ax.scatter(*track.point(track.selected), marker="*", s=STAR_SIZE ** 2, facecolor=track.colour,
                       edgecolor="black", lw=0.9, zorder=4)
        if track.argmax is not None:
            ax.scatter(*track.point(track.argmax), marker="D", s=(STAR_SIZE * 0.6) ** 2, facecolor="none",
                       edgecolor="black", lw=1.1, zorder=4)
    drawn, _ = ax.get_legend_handles_labels()
    by_number = dict(zip((track.number for track in drawing.tracks), drawn)) | {
        number: Line2D([], [], ls="none", label=f"trajectory {number}: no estimate") for number in drawing.missing}
    handles = [by_number[number] for number in sorted(by_number)]  # in trajectory order, with or without estimate
    handles.append(Line2D([], [], marker="*", ms=12, ls="none", mfc="white", mec="black",
                          label="T* (the tie-aware pick)"))
    if any(track.argmax is not None for track in drawing.tracks):
        handles.append(Line2D([], [], marker="D", ms=6, ls="none", mfc="none", mec="black",
                              label="T*_info (the criterion's argmax), where it differs"))
    if not drawing.tracks:
        ax.text(0.5, 0.5, "no estimate for any trajectory", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("I(X;F)  [nats]")
    ax.set_ylabel("I(Y;F)  [nats]")
    ax.margins(0.08)
    ax.set_title(f"information plane — {pair.name}: {pair.teacher_model} teacher trajectories\n"
                 "probe / decoder estimates, mean ± SE over split seeds; labels: epochs (a range: checkpoints too "
                 "close to label apart)", fontsize=9)
    fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)
    if drawing.labels:
        _place_labels(fig, ax, drawing)
    return fig
