"""Tables for people: a run's trajectory in the terminal (rich), and later the study's report."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .checkpoints import load_manifest


def terminal_console() -> Console:
    """A console that keeps tables readable when output goes to a file or a CI log (rich would assume 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def trajectory_table(run: str | Path, console: Console | None = None) -> Table:
    """Print (and return) one row per saved checkpoint, then the run's final numbers."""
    run = Path(run)
    manifest = load_manifest(run)
    table = Table(title=f"{run}  ({manifest['kind']}, {manifest['model']['name']} on {manifest['data']['name']}, "
                        f"seed {manifest['seed']}, {manifest['status']})")
    for column in ("epoch", "fraction", "lr", "train loss", "train %", "val %", "test %", "sha256"):
        table.add_column(column, justify="right" if column != "sha256" else "left")
    for c in manifest["checkpoints"]:
        m = c["metrics"]
        table.add_row(str(c["epoch"]), f"{c['fraction']:.2f}", f"{c['lr']:.3g}", f"{m['train_loss']:.4f}",
                      _pct(m["train_acc"]), _pct(m["val_acc"]), _pct(m.get("test_acc")), c["sha256"][:12])
    final = manifest.get("final")
    if final:
        table.caption = (f"last epoch {final['epoch']}: test {_pct(final['test_acc'])}%, val {_pct(final['val_acc'])}%"
                         f"; best val {_pct(final['best_val_acc'])}% at epoch {final['best_val_epoch']}"
                         f"; {final['train_time_s']:.1f} s")
    if manifest.get("teachers"):
        refs = ", ".join(t["reference"] for t in manifest["teachers"])
        table.caption = f"teachers: {refs}\n" + (table.caption or "")
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
