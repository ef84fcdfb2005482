"""Terminal tables (rich) for the commands that show runs: a folder of runs, one run's trajectory, an analysis."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..formatting import data_label, percent, terminal_console
from ..run import Run


def _percent(value) -> str:
    return percent(value, missing="")


def _num(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def runs_table(folder: str | Path, runs: list[Path], console: Console | None = None) -> Table:
    """Print (and return) one row per run of a folder of runs (the students of `distill --fuse`, say)."""
    table = Table(title=f"{folder}  ({len(runs)} runs)")
    for column in ("run", "kind", "model", "seed", "teachers", "status", "test %", "last-k %", "best val %"):
        numeric = column in ("seed", "test %", "last-k %", "best val %")
        table.add_column(column, justify="right" if numeric else "left")
    for path in runs:
        manifest = Run(path).manifest
        final = manifest.final
        table.add_row(str(path.relative_to(folder)), manifest.kind, manifest.model["name"], str(manifest.seed),
                      " + ".join(t["reference"] for t in manifest.teachers) or "—", manifest.status,
                      _percent(final.test_acc) if final else "—", _percent(final.test_acc_last_k) if final else "—",
                      _percent(final.best_val_acc) if final else "—")
    (console or terminal_console()).print(table)
    return table


def _trajectories(row: dict) -> str:
    """The teacher trajectory a study task belongs to: one index, or how many cells a shared run serves."""
    group = row["group"] or {}
    if group.get("role") in ("teacher", "analysis", "proxy"):
        return str(group.get("teacher_seed", ""))
    shared = {cell[2] for cell in group.get("serves", []) if len(cell) == 4}
    return str(shared.pop()) if len(shared) == 1 else f"all {len(shared)}" if shared else ""


def study_table(study: str | Path, console: Console | None = None) -> Table:
    """Print (and return) one row per task of a study, from its database (read-only, while workers run): which pair,
    variant, teacher trajectory and seed it is, its status there, its teachers' epochs and its accuracies."""
    from ..study.queue import ResultsDB

    study = Path(study)
    with ResultsDB(study / "results.sqlite", readonly=True) as db:
        rows = db.rows()
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    table = Table(title=f"{study}  ({len(rows)} tasks: "
                        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ")")
    for column in ("run", "kind", "pair", "variant", "traj.", "seed", "teacher epochs", "status", "test %",
                   "best val %"):
        numeric = column in ("traj.", "seed", "test %", "best val %")
        # the run's name whole (it says pair, variant, trajectory and seed); the pair's, repeated, may be cut
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column == "run",
                         overflow="ellipsis" if column == "pair" else "fold", max_width=22 if column == "pair" else None)
    for row in rows:
        group, metrics = row["group"] or {}, row["metrics"] or {}
        status = row["status"] + (f" ({row['attempts']} attempts)" if row["status"] == "failed" else "")
        epochs = "+".join(str(e) for e in metrics.get("teacher_epochs") or [])
        others = len(group.get("pairs", [])) - 1  # a task several pairs share (a teacher, a no-KD student)
        pair = group.get("pair", "") + (f" (+{others})" if others > 0 else "")
        table.add_row(row["name"], group.get("role", row["kind"]), pair, group.get("variant", ""),
                      _trajectories(row), str(group.get("seed", "")), epochs, status,
                      _percent(metrics.get("test_acc")), _percent(metrics.get("best_val_acc")))
    (console or terminal_console()).print(table)
    return table


def trajectory_table(run: str | Path, console: Console | None = None) -> Table:
    """Print (and return) one row per saved checkpoint, then the run's final numbers."""
    run = Path(run)
    manifest = Run(run).manifest
    table = Table(title=f"{run}  ({manifest.kind}, {manifest.model['name']} on {data_label(manifest.data)}, "
                        f"seed {manifest.seed}, {manifest.status})")
    top5 = any("test_top5" in c.metrics for c in manifest.checkpoints)  # more than 5 classes, ckptkd 0.4 on
    for column in ("epoch", "fraction", "lr", "train loss", "train %", "val %", "test %") + (
            ("test top-5 %",) if top5 else ()) + ("sha256",):
        table.add_column(column, justify="right" if column != "sha256" else "left", no_wrap=True)
    for c in manifest.checkpoints:
        m = c.metrics
        table.add_row(str(c.epoch), f"{c.fraction:.2f}", f"{c.lr:.3g}", _num(m.get("train_loss"), ".4f"),
                      _percent(m.get("train_acc")), _percent(m.get("val_acc")), _percent(m.get("test_acc")),
                      *([_percent(m.get("test_top5"))] if top5 else []), c.sha256[:12])
    lines = []
    if manifest.teachers:
        lines.append("teachers: " + ", ".join(t["reference"] for t in manifest.teachers))
    final = manifest.final
    if final:
        last_k = (f" (mean of the last {final.last_k}: {_percent(final.test_acc_last_k)}%)"
                  if final.last_k and final.last_k > 1 else "")
        top5_text = f" (top-5 {_percent(final.test_top5)}%)" if final.test_top5 is not None else ""
        lines.append(f"last epoch {final.epoch}: test {_percent(final.test_acc)}%{top5_text}{last_k}, "
                     f"val {_percent(final.val_acc)}%"
                     f"; best val {_percent(final.best_val_acc)}% at epoch {final.best_val_epoch}"
                     f"; {final.train_time_s:.1f} s")
        if final.best_of_last:  # eval.best_of_last: the paper's metric, named for what it selects on
            lines.append(f"best test accuracy of the last {final.best_of_last} epochs (the paper's metric; it selects "
                         f"on the test set): {_percent(final.test_acc_best_of_last)}%")
    if manifest.ema_checkpoints:  # optim.ema: the average's own numbers at its last checkpoint
        last = manifest.ema_checkpoints[-1]
        lines.append(f"weight average (optim.ema) at epoch {last.epoch}: test {_percent(last.metrics.get('test_acc'))}"
                     f"%, val {_percent(last.metrics.get('val_acc'))}% ({last.path})")
    if not manifest.health.get("ok", True):
        from ..training.health import describe

        lines.append(f"health: {describe(manifest.health)}")
    table.caption = "\n".join(lines) or None
    (console or terminal_console()).print(table)
    return table


def estimate_text(estimate: dict, digits: int) -> str:
    """mean±SE of a per-seed estimate; "failed" when no seed gave a value, with how many seeds failed otherwise."""
    if estimate["mean"] is None:
        return "failed"
    text = f"{estimate['mean']:.{digits}f}"
    if estimate["se"] is not None:
        text += f"±{estimate['se']:.{digits}f}"
    return text + (f" ({estimate['failed']} failed)" if estimate["failed"] else "")


def analysis_table(analysis: dict, console: Console | None = None) -> Table:
    """One row per checkpoint on the selection split: accuracy, soft labels, geometry, both estimators, the score;
    T* and its ties marked."""
    split = analysis["split"]
    selected = analysis["selected"]
    criterion = analysis["criteria"][selected["criterion"]]
    scores = {row["epoch"]: row for row in criterion["scores"]}
    knn = {row["epoch"]: row for row in analysis["criteria"][f"knn-info@{split}"]["scores"]}
    table = Table(title=f"{analysis['run']}: {split} split (n = {analysis['splits'][split]['n']}), tau = "
                        f"{analysis['temperature']}, {analysis['seeds']} split seeds")
    for column in ("epoch", "val%", "conf%", "p_t", "H_nt", "NC1", "I(X;F)", "I(Y;F)", "score", "kNN", ""):
        table.add_column(column, justify="right", no_wrap=True)
    for r in analysis["checkpoints"]:
        m, est = r[split], r[split]["estimates"]
        row = scores.get(r["epoch"])
        score = "skipped" if row is None else estimate_text({"mean": row["score"], "se": row["se"], "failed": 0}, 2)
        knn_row = knn.get(r["epoch"])
        mark = "T*" if r["epoch"] == selected["epoch"] else ("tie" if r["epoch"] in selected["ties"] else "")
        table.add_row(str(r["epoch"]), _percent(r["val"]["acc"]), _percent(m["confidence"]), _num(m["p_target_t"], ".3f"),
                      _num(m["nontarget_entropy_t"], ".3f"), _num(m["nc1"], ".3g"), estimate_text(est["i_xf"], 2),
                      estimate_text(est["i_yf"], 3), score, "—" if knn_row is None else f"{knn_row['score']:.2f}",
                      mark)
    agreement = analysis["agreement"]
    lines = ["conf: mean max-probability; p_t: tempered probability of the true class; H_nt: tempered non-target "
             "entropy (nats); NC1: within-class variability; I: nats, mean±SE over split seeds.",
             f"T* = {selected['reference']} by {selected['criterion']} ({selected['description']}); ties: "
             f"{', '.join(map(str, selected['ties']))}.",
             f"Spearman(probe, kNN) across checkpoints: I(X;F) {_or_na(agreement['spearman_i_xf'])}, I(Y;F) "
             f"{_or_na(agreement['spearman_i_yf'])}, score {_or_na(agreement['spearman_score'])}; "
             f"{analysis['timing_s']['measure']:.1f} s ({analysis['timing_s']['cached']} cached)."]
    lines += [f"note: {note}" for note in analysis.get("notes", [])]
    table.caption = "\n".join(lines)
    (console or terminal_console()).print(table)
    return table


def _or_na(value) -> str:
    """A correlation that could not be computed (too few checkpoints scored) reads as n/a, not None."""
    return "n/a" if value is None else str(value)
