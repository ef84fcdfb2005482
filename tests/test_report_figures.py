"""The figures as a reviewer reads them: a PDF beside every PNG the report writes; the study's information plane
with every trajectory in a colour of its own and epoch labels that do not pile up; selection-plot legends that say
what they mean; the no-KD and T^full references where students are compared; class names that do not collide.
Figures are inspected as matplotlib draws them (before they are saved), never by pixel hashes."""

import dataclasses
import itertools
import math
import statistics

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.transforms import Bbox

from ckptkd.selection.plots import class_correlation_figure
from ckptkd.study.report import write_report
from ckptkd.study.report.loading import load
from ckptkd.study.report.model import build
from ckptkd.study.report.plane import (MIN_LABEL_DISTANCE, STAR_SIZE, epoch_ranges, information_plane_figure,
                                       pair_colours, plane_drawing)
from ckptkd.study.report.plots import (DODGE_POINTS, NO_KD, T_FULL, Pick, accuracy_figure, pdf_of, selection_figure,
                                       side_by_side)
from ckptkd.study.report.selection import SELECTORS, Selector
from ckptkd.study.report.trajectories import Trajectory, TrajectoryRow, TrajectorySummary

from test_study_report import ACC, CURVE, PDF, A, make_main_study, make_selection_study, section

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
BLACK = (0.0, 0.0, 0.0, 1.0)


def report_model(study):
    inputs = load(study)
    return build(inputs.config, inputs.rows, inputs.blocked, inputs.trajectories)


@pytest.fixture(scope="module")
def main(tmp_path_factory):
    """The main study of test_study_report (three pairs, three trajectories each, the lead teacher's figures of
    one pair in its run folder), its report written, and its report model."""
    study = make_main_study(tmp_path_factory.mktemp("figures"))
    return study, write_report(study, quiet=True), report_model(study)


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    """The selection-benchmark study of test_study_report, its report written, and its only pair's model."""
    study = make_selection_study(tmp_path_factory.mktemp("curve"))
    return study, write_report(study, quiet=True), report_model(study).pairs[0]


def overlapping(extents: dict) -> list:
    """The pairs of named display boxes that overlap."""
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(extents.items(), 2) if box_a.overlaps(box_b)]


# ---------------------------------------------------------------- PDFs

@pytest.mark.parametrize("which", ["main", "curve"])
def test_every_figure_the_report_writes_has_a_pdf_beside_it(which, request):
    study, result, _ = request.getfixturevalue(which)
    pngs = sorted((study / "plots").glob("*.png"))
    assert sorted(map(str, pngs)) == sorted(result["plots"])  # the report lists PNGs, as it always did
    assert sorted(p.stem for p in (study / "plots").glob("*.pdf")) == [p.stem for p in pngs]
    for png in pngs:
        assert pdf_of(png).read_bytes()[:4] == PDF, png
    assert "PDF" in section((study / "report.md").read_text(encoding="utf-8"), "## Plots")


# ---------------------------------------------------------------- the study's information plane

def normalised_distance(a, b, span):
    return math.hypot((a[0] - b[0]) / span[0], (a[1] - b[1]) / span[1])


def test_study_information_plane_draws_every_trajectory_in_its_own_colour(main):
    _, _, report = main
    pair = next(p for p in report.pairs if p.name == A)
    drawing = plane_drawing(pair)
    assert [t.number for t in drawing.tracks] == [0, 1, 2] and drawing.missing == []
    colours = [t.colour for t in drawing.tracks]
    assert len(set(colours)) == 3 and colours == [pair_colours(pair)[n] for n in (0, 1, 2)]
    assert [t.epochs for t in drawing.tracks] == [[5, 10, 15, 20]] * 3 and all(t.selected == 10 for t in
                                                                                drawing.tracks)
    # labels: each trajectory has some, and no two labelled points are closer than the minimum distance
    assert {label.number for label in drawing.labels} == {0, 1, 2}
    points = [(x, y) for t in drawing.tracks for x, y in zip(t.xs, t.ys)]
    span = (np.ptp([p[0] for p in points]), np.ptp([p[1] for p in points]))
    for a, b in itertools.combinations(drawing.labels, 2):
        assert normalised_distance((a.x, a.y), (b.x, b.y), span) >= MIN_LABEL_DISTANCE, (a, b)

    fig = information_plane_figure(pair)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if c.get_label().startswith("trajectory")]
    assert [c.get_label() for c in bars] == [f"trajectory {t}, T* = epoch 10" for t in (0, 1, 2)]
    assert [mcolors.to_hex(c.lines[0].get_color()) for c in bars] == colours
    for bar, track in zip(bars, drawing.tracks):  # joined in epoch order
        assert list(bar.lines[0].get_xdata()) == track.xs
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend[:3] == [c.get_label() for c in bars] and "T* (the tie-aware pick)" in legend
    renderer = fig.canvas.get_renderer()
    labels = {f"{i}: {text.get_text()}": text.get_window_extent(renderer) for i, text in enumerate(ax.texts)}
    assert len(labels) == len(drawing.labels) and overlapping(labels) == []


def converged_summary() -> TrajectorySummary:
    """A trajectory that moves for two checkpoints, then sits still (within a hair) for eight: T* among those."""
    positions = {6: (16.2, 2.06), 12: (14.9, 2.24)} | {e: (15.37 + 0.001 * (e % 7), 2.278 + 0.0001 * (e % 5))
                                                       for e in range(18, 61, 6)}
    rows = [TrajectoryRow(e, e / 60, 0.9, 0.8, 0.8, 0.7, 0.3, 2.0, 0.1, (x, 0.1), (y, 0.002), (0.1, 0.01))
            for e, (x, y) in positions.items()]
    return TrajectorySummary(24, [24], "info", "train", rows, {})


def test_converged_checkpoints_share_one_label_naming_their_epochs_and_missing_ones_say_so(main):
    _, _, report = main
    pair = dataclasses.replace(next(p for p in report.pairs if p.name == A), selection=None,
                               trajectories=[Trajectory(0, "runs/t0", converged_summary()),
                                             Trajectory(1, None, None)])
    drawing = plane_drawing(pair)
    assert drawing.missing == [1] and [t.number for t in drawing.tracks] == [0]
    assert sorted((label.epoch, label.text) for label in drawing.labels) == [(6, "6"), (12, "12"), (60, "18–60")]
    fig = information_plane_figure(pair)
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend[:2] == ["trajectory 0, T* = epoch 24", "trajectory 1: no estimate"]
    # the range's label is placed clear of T*'s star, which sits among the checkpoints it names
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    (x, y), = ax.transData.transform([drawing.tracks[0].point(24)])
    half = renderer.points_to_pixels(STAR_SIZE) / 2
    extents = {text.get_text(): text.get_window_extent(renderer) for text in ax.texts}
    extents["T* star"] = Bbox([[x - half, y - half], [x + half, y + half]])
    assert sorted(extents) == ["12", "18–60", "6", "T* star"] and overlapping(extents) == []


def test_epoch_ranges_name_runs_of_saved_checkpoints():
    saved = [6, 12, 18, 24, 30, 36]
    assert epoch_ranges(saved, {18, 24, 30, 36}) == "18–36"
    assert epoch_ranges(saved, {6, 18, 24}) == "6, 18–24"
    assert epoch_ranges(saved, {12}) == "12"


# ---------------------------------------------------------------- where students are compared

def test_selection_plot_colours_each_trajectory_and_keeps_its_legends_apart(curve):
    _, _, pair = curve
    fig = selection_figure(pair, pair.selection)
    ax = fig.axes[0]
    colours = pair_colours(pair)
    by_text = {tuple(t.get_text() for t in legend.get_texts()): legend for legend in fig.legends}
    assert len(by_text) == 2
    references, selectors = sorted(by_text.items(), key=lambda item: "trajectory 0" not in item[0])
    assert list(references[0]) == ["no KD: mean of 2 students", "trajectory 0", "trajectory 1",
                                   "T^full: the last checkpoint"]
    handles = references[1].legend_handles
    assert [mcolors.to_hex(h.get_color()) for h in handles[1:3]] == [colours[0], colours[1]]
    # the selector legend: black markers, each selector once, in SELECTORS' order; T^full is a line, not a marker
    labels = [label for label, _key in SELECTORS]
    assert list(selectors[0]) == sorted(set(selectors[0]), key=labels.index) and "T^full" not in selectors[0]
    for handle in selectors[1].legend_handles:
        assert mcolors.to_rgba(handle.get_markeredgecolor()) == BLACK and handle.get_markerfacecolor() == "none"
    # every pick's marker in the colour of the trajectory whose curve it sits on
    means = {t: {e: statistics.mean(accs) for e, accs in by_epoch.items()} for t, by_epoch in CURVE.items()}
    markers = [c for c in ax.collections if isinstance(c, PathCollection)]
    # 5 picks on each trajectory: T*, info@val, p_target (trajectory 0 only), NC1 (trajectory 1 only: epoch 3
    # taught no student), best val and T^0.5
    assert len(markers) == 10
    for marker in markers:
        epoch, accuracy = marker.get_offsets()[0]
        (t,) = [t for t in means if math.isclose(means[t][int(epoch)], accuracy)]
        assert mcolors.to_hex(marker.get_edgecolor()[0]) == colours[t]
    # picks that would hide one another are set side by side: the same checkpoint picked by several selectors, and
    # T* of both trajectories at epoch 6, where their curves meet (64.56 and 64.53 %)
    fig.canvas.draw()
    apart = 0.9 * fig.canvas.get_renderer().points_to_pixels(DODGE_POINTS)
    shown = [m.get_offset_transform().transform(m.get_offsets())[0] for m in markers]
    assert min(math.dist(a, b) for a, b in itertools.combinations(shown, 2)) >= apart
    # the references: no KD at its students' mean, T^full at the last checkpoint
    no_kd = [line for line in ax.lines if mcolors.to_hex(line.get_color()) == mcolors.to_hex(NO_KD)]
    assert len(no_kd) == 1 and list(no_kd[0].get_ydata()) == pytest.approx([55.5, 55.5])
    assert any(list(line.get_xdata()) == [8, 8] for line in ax.lines)


def test_picks_that_would_hide_one_another_are_grouped_side_by_side():
    star, cross = (Selector(label, key, {}) for label, key in SELECTORS[:2])
    picks = [Pick(0, 6, 64.56, star), Pick(0, 6, 64.56, cross), Pick(1, 6, 64.53, star), Pick(1, 6, 61.0, cross),
             Pick(1, 8, 64.53, star)]
    groups = side_by_side(picks, close=0.1)
    assert [[(p.trajectory, p.epoch, p.selector.key) for p in g] for g in groups] == [
        [(1, 6, "info@train:argmax")], [(0, 6, "info@train"), (0, 6, "info@train:argmax"), (1, 6, "info@train")],
        [(1, 8, "info@train")]]


def test_accuracy_plot_has_no_kd_and_t_full_references_and_a_legend_off_the_data(main):
    _, _, report = main
    fig = accuracy_figure(report.pairs)
    for ax, pair in zip(fig.axes, report.pairs):
        levels = {mcolors.to_hex(line.get_color()): line.get_ydata()[0] for line in ax.lines
                  if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2}
        assert levels[mcolors.to_hex(NO_KD)] == pytest.approx(100 * statistics.mean(ACC[pair.name]["none"].values()))
        assert levels[mcolors.to_hex(T_FULL)] == pytest.approx(
            100 * statistics.mean(ACC[pair.name]["Tfull"].values()))
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["one student", "a variant's students: mean ± std",
                                                         "no KD: mean ± std", "T^full: mean"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    below = legend.get_window_extent(renderer)
    assert all(not below.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


def test_many_pairs_wrap_into_rows_of_at_most_four_panels(main):
    _, _, report = main
    pairs = (report.pairs * 7)[:7]
    fig = accuracy_figure(pairs)
    assert len(fig.axes) == 7  # no empty panels
    rows = sorted({round(ax.get_position().y0, 3) for ax in fig.axes})
    assert len(rows) == 2 and max(sum(round(ax.get_position().y0, 3) == y for ax in fig.axes) for y in rows) == 4
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert all(not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


# ---------------------------------------------------------------- class names

def matrices(n: int, epoch: int, fraction: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"epoch": epoch, "fraction": fraction,
            "train": {"soft_matrix": rng.dirichlet(np.ones(n), size=n).tolist(),
                      "class_correlation": np.corrcoef(rng.normal(size=(n, 40))).tolist()}}


@pytest.mark.parametrize("names", [FASHION, [f"{name}_{i}" for i, name in
                                             enumerate(itertools.islice(itertools.cycle(FASHION), 100))]],
                         ids=["fashion-mnist", "100 classes"])
def test_class_correlation_labels_do_not_overlap(names):
    fig = class_correlation_figure(matrices(len(names), 24, 0.4, 0), matrices(len(names), 60, 1.0, 1), names,
                                   "class structure of the soft labels — cnn on fashion-mnist, seed 0 (tau = 4)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [fig._suptitle]
    for ax in fig.axes:  # the four panels and the two colour bars
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label] + ax.get_xticklabels() + ax.get_yticklabels()
    extents = {f"{i}: {t.get_text()}": t.get_window_extent(renderer) for i, t in enumerate(texts)
               if t.get_visible() and t.get_text()}
    assert overlapping(extents) == []
    shown = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert shown == (names if len(names) <= 20 else names[::10])  # every name, or every tenth
