"""Figures for papers: the information plane, the trajectory of confidence and dark knowledge, class correlation."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from ..formatting import data_label  # noqa: E402
from ..run.storage import atomic_write_bytes  # noqa: E402

# pdf.fonttype 42 embeds TrueType fonts: publishers' checks reject the default Type 3 fonts.
plt.rcParams.update({"figure.dpi": 150, "savefig.bbox": "tight", "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False, "pdf.fonttype": 42})


def save(fig, path: Path) -> str:
    """Write `fig` as PNG at `path` and as PDF beside it (same stem: vector, for papers), each atomically; returns
    the PNG's path. The PDF goes first, so a PNG on disk has its PDF. The PDF's creation date is left out: the same
    figure gives the same bytes, and a report rebuilt from the same results changes no file."""
    path = Path(path)
    for target, kind, metadata in ((path.with_suffix(".pdf"), "pdf", {"CreationDate": None}), (path, "png", None)):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=kind, metadata=metadata)
        atomic_write_bytes(target, buffer.getvalue())
    plt.close(fig)
    return str(path)


def spaced_labels(xs: list[float], ys: list[float], first: list[int], min_distance: float = 0.06) -> list[int]:
    """Which points get a label: the indices in `first` in their order, then every other point in order, each kept
    only when it is at least `min_distance` (a fraction of the plot's span in x and in y) from every point already
    kept, so points that sit on top of each other (a converged run) share one label instead of piling up into an
    unreadable smear."""
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    chosen: list[int] = []
    for i in list(dict.fromkeys(first)) + [i for i in range(len(xs)) if i not in first]:
        if all(math.hypot((xs[i] - xs[j]) / span_x, (ys[i] - ys[j]) / span_y) >= min_distance for j in chosen):
            chosen.append(i)
    return chosen


def _epoch_labels(xs: list[float], ys: list[float], epochs: list[int], keep: set[int]) -> set[int]:
    """The epochs of one trajectory that get a label: those in `keep` first (spaced_labels)."""
    return {epochs[i] for i in spaced_labels(xs, ys, [i for i, e in enumerate(epochs) if e in keep])}


def information_plane(records: list[dict], split: str, selected: int, ties: list[int], title: str,
                      path: Path) -> str:
    """I(Y;F) against I(X;F) per checkpoint, mean +- SE over split seeds, joined in training order: the probe /
    decoder estimates and the kNN cross-check side by side. T* is starred, its ties ringed, failed ones named."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    points = None
    for ax, (xk, yk, label) in zip(axes, (("i_xf", "i_yf", "probe / decoder"), ("knn_i_xf", "knn_i_yf", "kNN"))):
        shown, failed = [], []
        for r in records:
            ex, ey = r[split]["estimates"][xk], r[split]["estimates"][yk]
            (shown if ex["mean"] is not None and ey["mean"] is not None else failed).append((r, ex, ey))
        if failed:
            ax.text(0.02, 0.02, "failed: epoch " + ", ".join(str(r["epoch"]) for r, _, _ in failed),
                    transform=ax.transAxes, fontsize=7, color="crimson")
        if not shown:
            ax.set_title(f"{label}: no estimate")
            continue
        xs, ys = [e[1]["mean"] for e in shown], [e[2]["mean"] for e in shown]
        epochs = [e[0]["epoch"] for e in shown]
        ax.plot(xs, ys, "-", color="0.75", lw=1, zorder=1)
        ax.errorbar(xs, ys, xerr=[e[1]["se"] or 0 for e in shown], yerr=[e[2]["se"] or 0 for e in shown],
                    fmt="none", ecolor="0.55", lw=0.8, zorder=1)
        points = ax.scatter(xs, ys, c=epochs, cmap="viridis", s=30, zorder=2)
        labelled = _epoch_labels(xs, ys, epochs, {selected, epochs[0], epochs[-1]})
        for n, (x, y, e) in enumerate(zip(xs, ys, epochs)):
            if e in labelled:
                ax.annotate(str(e), (x, y), textcoords="offset points", xytext=(5, 5 if n % 2 else -9), fontsize=7)
        tied = [(x, y) for x, y, e in zip(xs, ys, epochs) if e in ties and e != selected]
        if tied:
            ax.scatter(*zip(*tied), s=130, facecolor="none", edgecolor="darkorange", lw=1.2, zorder=3,
                       label="tied with T* (not significantly worse)")
        if selected in epochs:
            k = epochs.index(selected)
            ax.scatter([xs[k]], [ys[k]], marker="*", s=260, facecolor="none", edgecolor="crimson", lw=1.5,
                       zorder=4, label=f"T* (epoch {selected})")
        ax.set_xlabel("I(X;F)  [nats]")
        ax.set_ylabel("I(Y;F)  [nats]")
        ax.set_title(f"{label}, {split} split")
        ax.margins(0.12)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=8)
    if points is not None:
        bar = fig.colorbar(points, ax=axes, label="epoch", shrink=0.85)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    fig.suptitle(title)
    return save(fig, path)


def _value(value, scale: float = 1.0) -> float:
    """A measurement for plotting: a missing (non-finite) one leaves a gap."""
    return math.nan if value is None else scale * value


def _twin(ax):
    """A second y axis on the right of `ax`, remembered so the panel's legend can list both."""
    twin = ax.twinx()
    twin.spines["right"].set_visible(True)
    ax.twins = [*getattr(ax, "twins", []), twin]
    return twin


def trajectory(records: list[dict], criterion: dict, num_classes: int, title: str, path: Path) -> str:
    """Accuracy and confidence, dark knowledge, calibration and the selection score against epoch."""
    epochs = [r["epoch"] for r in records]
    selected = criterion["t_star"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.2))
    for split, style in (("train", "-"), ("val", "--")):
        axes[0].plot(epochs, [_value(r[split]["acc"], 100) for r in records], "o" + style, ms=3, color="C0",
                     label=f"accuracy ({split})")
        axes[0].plot(epochs, [_value(r[split]["confidence"], 100) for r in records], "s" + style, ms=3, color="C1",
                     label=f"max-probability ({split})")
    axes[0].set_ylabel("%")
    axes[0].set_title("accuracy and confidence")
    max_entropy = math.log(num_classes - 1) if num_classes > 2 else 1.0
    target = _twin(axes[1])
    for split, style in (("train", "-"), ("val", "--")):
        axes[1].plot(epochs, [_value(r[split]["nontarget_entropy_t"], 1 / max_entropy) for r in records], "o" + style,
                     ms=3, color="C2", label=f"non-target entropy ({split})")
        target.plot(epochs, [_value(r[split]["p_target_t"]) for r in records], "s" + style, ms=3, color="C3",
                    label=f"p(true class) ({split})")
    axes[1].set_ylabel("non-target entropy / log(C-1)", color="C2")
    target.set_ylabel("probability of the true class", color="C3")
    axes[1].set_title("soft labels at tau (dark knowledge)")
    axes[2].plot(epochs, [_value(r["val"]["ece"]) for r in records], "o-", ms=3, color="C4", label="ECE (val)")
    axes[2].set_ylabel("expected calibration error", color="C4")
    nll = _twin(axes[2])
    nll.plot(epochs, [_value(r["val"]["nll"]) for r in records], "s--", ms=3, color="C5", label="NLL (val)")
    nll.set_ylabel("negative log-likelihood (nats)", color="C5")
    axes[2].set_title("calibration (val)")
    rows = {row["epoch"]: row for row in criterion["scores"]}
    have = [e for e in epochs if e in rows]
    axes[3].errorbar(have, [rows[e]["score"] for e in have], yerr=[rows[e]["se"] or 0 for e in have], fmt="o-",
                     ms=3, capsize=2, color="C0", label=criterion["criterion"])
    tied = [e for e in have if e in criterion["ties"]]
    axes[3].scatter(tied, [rows[e]["score"] for e in tied], s=80, facecolor="none", edgecolor="darkorange",
                    label="tied with T* (not significantly worse)")
    axes[3].set_title(f"selection score ({criterion['criterion']}@{criterion['split']})")
    axes[3].set_ylabel("score (mean ± SE)")
    for ax in axes:
        if selected is not None:
            ax.axvline(selected, color="crimson", lw=1, ls=":", label="T*")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5 between 1 and 2
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)      # the same span in every panel, scored or not
        for y_axis in (ax, *getattr(ax, "twins", [])):
            y_axis.ticklabel_format(axis="y", useOffset=False)  # values near 1 read as such, not as 1e-5 + 0.99999
        handles, labels = ax.get_legend_handles_labels()
        for twin in getattr(ax, "twins", []):  # a panel with two y axes gets one legend for both
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        # Below the panel: with a twin axis, matplotlib's "best" place ignores the twin's lines and covers them.
        ax.legend(handles, labels, fontsize=6, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def class_ticks(class_names: list[str]) -> list[int]:
    """The classes named on the axes of a class-by-class panel: every one up to 20 classes, about ten beyond."""
    n = len(class_names)
    return list(range(n)) if n <= 20 else list(range(0, n, max(1, n // 10)))


def class_correlation_pair(intermediate: dict, full: dict, class_names: list[str], title: str, path: Path) -> str:
    """class_correlation_figure, saved; returns the PNG's path (a PDF beside it)."""
    return save(class_correlation_figure(intermediate, full, class_names, title), path)


def class_correlation_figure(intermediate: dict, full: dict, class_names: list[str], title: str):
    """Soft-label matrices and class correlations on the training inputs, intermediate beside full, diagonals
    masked (the true class would dwarf the off-diagonal structure that is the point), each row of panels on one
    colour scale. Class names on both axes of every panel, long x ones upright; the constrained layout gives them
    the room they take, so long names (Fashion-MNIST's "T-shirt/top") overlap neither a neighbouring panel nor a
    title."""
    soft = [np.array(r["train"]["soft_matrix"], dtype=float) for r in (intermediate, full)]
    corr = [np.array(r["train"]["class_correlation"], dtype=float) for r in (intermediate, full)]
    for m in soft + corr:
        np.fill_diagonal(m, np.nan)
    vmax = max(np.nanmax(m) for m in soft)
    cmax = max(np.nanmax(np.abs(m)) for m in corr) or 1.0
    ticks = class_ticks(class_names)
    names = [class_names[i] for i in ticks]
    # Names longer than "cat" would collide side by side: they stand upright (slanted ones would need more room).
    upright = max(len(name) for name in names) > 3
    size = min(12.0, 7.0 + 0.2 * len(ticks))
    fig, axes = plt.subplots(2, 2, figsize=(size * 1.1, size), layout="constrained")
    labels = [f"epoch {r['epoch']} ({r['fraction']:.0%} of training)" for r in (intermediate, full)]
    # The masked diagonal in grey: white is r = 0 on the correlation scale, and would read as "uncorrelated".
    magma, red_blue = (plt.get_cmap(name).with_extremes(bad="0.8") for name in ("magma", "RdBu_r"))
    for col in range(2):
        im_soft = axes[0, col].imshow(soft[col], cmap=magma, vmin=0, vmax=vmax)
        axes[0, col].set_title(f"{labels[col]}\nmean soft labels, diagonal (grey) masked")
        axes[0, col].set(xlabel="predicted class", ylabel="true class")
        im_corr = axes[1, col].imshow(corr[col], cmap=red_blue, vmin=-cmax, vmax=cmax)
        axes[1, col].set_title(f"{labels[col]}\nclass correlation, diagonal (grey) masked")
        axes[1, col].set(xlabel="class", ylabel="class")
        for row in range(2):
            ax = axes[row, col]
            ax.set_xticks(ticks, names, rotation=90 if upright else 0, fontsize=7)
            ax.set_yticks(ticks, names, fontsize=7)
            ax.spines[:].set_visible(False)
    fig.colorbar(im_soft, ax=axes[0, :].tolist(), shrink=0.85, label="probability at tau (training inputs)")
    fig.colorbar(im_corr, ax=axes[1, :].tolist(), shrink=0.85, label="Pearson r between classes' soft outputs")
    fig.suptitle(title)
    return fig


def plot_analysis(run, analysis: dict, manifest, out: Path | None = None) -> dict[str, str]:
    """The analysis figures, written into `out` (default RUN/plots/; `analyze` builds them in a hidden folder and
    publishes them with analysis.json)."""
    records = analysis["checkpoints"]
    selected = analysis["selected"]
    criterion = analysis["criteria"][selected["criterion"]]
    name = f"{manifest.model['name']} on {data_label(manifest.data)}, seed {manifest.seed}"
    full = records[-1]
    intermediate = next((r for r in records if r["epoch"] == selected["epoch"]), full)
    if intermediate is full and len(records) > 1:
        intermediate = min(records[:-1], key=lambda r: abs(r["fraction"] - 0.5))
    out = run.plots_dir if out is None else Path(out)
    split = analysis["split"]
    figures = {
        "information_plane": information_plane(records, split, selected["epoch"], selected["ties"],
                                               f"information plane — {name} (tau = {analysis['temperature']:g})",
                                               out / "information_plane.png"),
        "trajectory": trajectory(records, criterion, len(analysis["class_names"]),
                                 f"trajectory — {name} (tau = {analysis['temperature']:g})", out / "trajectory.png"),
    }
    if full["train"].get("soft_matrix") is not None:  # not recorded beyond analysis.MATRIX_CLASSES classes
        figures["class_correlation"] = class_correlation_pair(
            intermediate, full, analysis["class_names"],
            f"class structure of the soft labels — {name} (tau = {analysis['temperature']:g})",
            out / "class_correlation.png")
    return figures
