"""Tables for people: a run's trajectory in the terminal (rich), and later the study's report."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .checkpoints import load_manifest


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
    (console or Console()).print(table)
    return table
