"""Figures for papers: the information plane, the trajectory of confidence and dark knowledge, class correlation."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .report import data_label  # noqa: E402
from .storage import atomic_write_bytes  # noqa: E402

plt.rcParams.update({"figure.dpi": 150, "savefig.bbox": "tight", "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False})


def save(fig, path: Path) -> str:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return str(path)


def information_plane(records: list[dict], selected_epoch: int, title: str, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (xk, yk, label) in zip(axes, (("i_xf", "i_yf", "probe / decoder bounds"),
                                          ("knn_i_xf", "knn_i_yf", "kNN (KSG / Ross) on a projection"))):
        xs = [r[xk] for r in records]
        ys = [r[yk] for r in records]
        epochs = [r["epoch"] for r in records]
        ax.plot(xs, ys, "-", color="0.7", lw=1, zorder=1)
        points = ax.scatter(xs, ys, c=epochs, cmap="viridis", s=36, zorder=2)
        for x, y, e in zip(xs, ys, epochs):
            ax.annotate(str(e), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        best = next(r for r in records if r["epoch"] == selected_epoch)
        ax.scatter([best[xk]], [best[yk]], marker="*", s=260, facecolor="none", edgecolor="crimson", lw=1.5,
                   zorder=3, label=f"T* (epoch {selected_epoch})")
        ax.set_xlabel("I(X;F)  [nats]")
        ax.set_ylabel("I(Y;F)  [nats]")
        ax.set_title(label)
        ax.legend(loc="lower right", fontsize=7, frameon=False)
    fig.colorbar(points, ax=axes, label="epoch", shrink=0.85)
    fig.suptitle(title)
    return save(fig, path)


def trajectory(records: list[dict], selected_epoch: int, num_classes: int, title: str, path: Path) -> str:
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(epochs, [100 * r["val_acc"] for r in records], "o-", label="val accuracy")
    axes[0].plot(epochs, [100 * r["confidence"] for r in records], "s--", label="mean max-probability")
    axes[0].set_ylabel("%")
    axes[0].set_title("accuracy and confidence")
    max_entropy = math.log(num_classes - 1) if num_classes > 2 else 1.0
    axes[1].plot(epochs, [r["nontarget_entropy"] / max_entropy for r in records], "o-", label="tau = 1")
    axes[1].plot(epochs, [r["nontarget_entropy_t"] / max_entropy for r in records], "s--", label="tempered")
    axes[1].set_ylabel("fraction of log(C-1)")
    axes[1].set_title("non-target entropy (dark knowledge)")
    axes[2].plot(epochs, [r["ece"] for r in records], "o-", label="ECE")
    axes[2].plot(epochs, [r["val_nll"] for r in records], "s--", label="NLL")
    axes[2].set_title("calibration")
    for ax in axes:
        ax.axvline(selected_epoch, color="crimson", lw=1, ls=":", label="T*")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def class_correlation_pair(intermediate: dict, full: dict, class_names: list[str], title: str, path: Path) -> str:
    """Soft-label matrices (diagonal masked, so the off-diagonal dark knowledge is visible) and class correlations,
    intermediate beside full, each row of panels on one colour scale."""
    soft = [np.array(r["soft_matrix"]) for r in (intermediate, full)]
    for m in soft:
        np.fill_diagonal(m, np.nan)
    vmax = max(np.nanmax(m) for m in soft)
    corr = [np.array(r["class_correlation"]) for r in (intermediate, full)]
    n = len(class_names)
    size = min(12, 4 + 0.35 * n)
    fig, axes = plt.subplots(2, 2, figsize=(2 * size / 1.6, 2 * size / 1.8))
    labels = [f"epoch {r['epoch']} ({r['fraction']:.2g})" for r in (intermediate, full)]
    for col in range(2):
        im_soft = axes[0, col].imshow(soft[col], cmap="magma", vmin=0, vmax=vmax)
        axes[0, col].set_title(f"{labels[col]}\nmean soft labels (off-diagonal)")
        im_corr = axes[1, col].imshow(corr[col], cmap="RdBu_r", vmin=-1, vmax=1)
        axes[1, col].set_title(f"{labels[col]}\nclass correlation")
        for row in range(2):
            ax = axes[row, col]
            ticks = range(n) if n <= 20 else range(0, n, max(1, n // 10))
            ax.set_xticks(list(ticks))
            ax.set_yticks(list(ticks))
            ax.set_xticklabels([class_names[i] for i in ticks], rotation=90, fontsize=6)
            ax.set_yticklabels([class_names[i] for i in ticks], fontsize=6)
            ax.spines[:].set_visible(False)
        axes[0, col].set_ylabel("true class")
    fig.colorbar(im_soft, ax=axes[0, :].tolist(), shrink=0.8, label="probability (tempered)")
    fig.colorbar(im_corr, ax=axes[1, :].tolist(), shrink=0.8, label="Pearson r")
    fig.suptitle(title)
    return save(fig, path)


def plot_analysis(run: Path, analysis: dict, manifest: dict) -> dict[str, str]:
    records = analysis["checkpoints"]
    selected = analysis["selected"]["epoch"]
    name = f"{manifest.model['name']} on {data_label(manifest.data)}, seed {manifest.seed}"
    full = records[-1]
    intermediate = next((r for r in records if r["epoch"] == selected), full)
    if intermediate is full and len(records) > 1:
        intermediate = min(records[:-1], key=lambda r: abs(r["fraction"] - 0.5))
    out = run / "plots"
    return {
        "information_plane": information_plane(records, selected, f"information plane — {name}",
                                               out / "information_plane.png"),
        "trajectory": trajectory(records, selected, len(analysis["class_names"]), f"trajectory — {name}",
                                 out / "trajectory.png"),
        "class_correlation": class_correlation_pair(intermediate, full, analysis["class_names"],
                                                    f"class correlation — {name} (tau = {analysis['temperature']})",
                                                    out / "class_correlation.png"),
    }
