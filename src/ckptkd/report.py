"""Tables for people: a run's trajectory in the terminal (rich), and later the study's report."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .run import Run


def terminal_console() -> Console:
    """A console that keeps tables readable when output goes to a file or a CI log (rich would assume 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _num(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def data_label(data: dict) -> str:
    """A data set's name for titles: the user's own file or folder name for npz and folder data."""
    return data.get("label") or data.get("name", "?")


def trajectory_table(run: str | Path, console: Console | None = None) -> Table:
    """Print (and return) one row per saved checkpoint, then the run's final numbers."""
    run = Path(run)
    manifest = Run(run).manifest
    table = Table(title=f"{run}  ({manifest.kind}, {manifest.model['name']} on {data_label(manifest.data)}, "
                        f"seed {manifest.seed}, {manifest.status})")
    for column in ("epoch", "fraction", "lr", "train loss", "train %", "val %", "test %", "sha256"):
        table.add_column(column, justify="right" if column != "sha256" else "left", no_wrap=True)
    for c in manifest.checkpoints:
        m = c.metrics
        table.add_row(str(c.epoch), f"{c.fraction:.2f}", f"{c.lr:.3g}", _num(m.get("train_loss"), ".4f"),
                      _pct(m.get("train_acc")), _pct(m.get("val_acc")), _pct(m.get("test_acc")), c.sha256[:12])
    lines = []
    if manifest.teachers:
        lines.append("teachers: " + ", ".join(t["reference"] for t in manifest.teachers))
    final = manifest.final
    if final:
        last_k = (f" (mean of the last {final.last_k}: {_pct(final.test_acc_last_k)}%)"
                  if final.last_k and final.last_k > 1 else "")
        lines.append(f"last epoch {final.epoch}: test {_pct(final.test_acc)}%{last_k}, val {_pct(final.val_acc)}%"
                     f"; best val {_pct(final.best_val_acc)}% at epoch {final.best_val_epoch}"
                     f"; {final.train_time_s:.1f} s")
    if not manifest.health.get("ok", True):
        from .health import describe

        lines.append(f"health: {describe(manifest.health)}")
    table.caption = "\n".join(lines) or None
    (console or terminal_console()).print(table)
    return table


def analysis_table(analysis: dict, console: Console | None = None) -> Table:
    """One row per checkpoint: accuracy, confidence, dark knowledge, both estimators; T* marked."""
    table = Table(title=f"{analysis['run']}: checkpoints on the validation split (n = {analysis['n_val']}, "
                        f"tau = {analysis['temperature']})")
    for column in ("epoch", "val%", "conf%", "H_nt", "I(X;F)", "I(Y;F)", "score", "kNN", ""):
        table.add_column(column, justify="right", no_wrap=True)
    selected = analysis["selected"]["epoch"]
    for r in analysis["checkpoints"]:
        table.add_row(str(r["epoch"]), _pct(r["val_acc"]), _pct(r["confidence"]), f"{r['nontarget_entropy']:.3f}",
                      f"{r['i_xf']:.2f}", f"{r['i_yf']:.3f}", f"{r['score']:.2f}", f"{r['knn_score']:.2f}",
                      "T*" if r["epoch"] == selected else "")
    agreement = analysis["agreement"]
    table.caption = (f"H_nt: non-target entropy (nats); score: normalised I(X;F) + I(Y;F); kNN: the same score from "
                     f"the kNN estimator.\nT* = {analysis['selected']['reference']};  Spearman(probe, kNN): I(X;F) "
                     f"{agreement['spearman_i_xf']}, I(Y;F) {agreement['spearman_i_yf']}, score "
                     f"{agreement['spearman_score']};  {analysis['timing_s']['measure']:.1f} s "
                     f"({analysis['timing_s']['cached']} cached)")
    (console or terminal_console()).print(table)
    return table
