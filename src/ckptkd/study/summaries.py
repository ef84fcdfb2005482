"""What the study database keeps of a finished task: a run's numbers, an analysis's trajectory summary. Enough to
rebuild every section of the report when the run folders are gone (they are not committed with a study's results)."""

from __future__ import annotations

from pathlib import Path

def run_metrics(kind: str, run) -> tuple[dict, dict]:
    """What the study database keeps of a finished training run: (metrics, timings)."""
    manifest = run.manifest
    final = manifest.final
    metrics = {"test_acc": final.test_acc, "val_acc": final.val_acc, "train_acc": final.train_acc,
               "best_val_acc": final.best_val_acc, "best_val_epoch": final.best_val_epoch,
               "train_time_s": final.train_time_s, "test_acc_last_k": final.test_acc_last_k, "last_k": final.last_k,
               "test_top5": final.test_top5, "test_top5_last_k": final.test_top5_last_k,
               "test_acc_best_of_last": final.test_acc_best_of_last, "best_of_last": final.best_of_last,
               "health": manifest.health}
    if kind == "distill":
        ensemble = manifest.teacher_ensemble or {}
        metrics.update(teacher_val_acc=ensemble.get("val_acc"), teacher_test_acc=ensemble.get("test_acc"),
                       teachers=[t["reference"] for t in manifest.teachers],
                       teacher_epochs=[t["epoch"] for t in manifest.teachers],
                       teacher_cache=ensemble.get("cache"))
    return metrics, {"train_time_s": final.train_time_s}


def analysis_metrics(analysis: dict, path: Path, recorded: dict[int, dict] | None = None) -> dict:
    """What the study database keeps of an analysis: enough to rebuild the report's trajectory section even when
    the run folders are gone (they are not committed with a study's results)."""
    split = analysis["split"]
    scores = {row["epoch"]: row for row in analysis["criteria"][analysis["selected"]["criterion"]]["scores"]}
    trajectory = []
    for r in analysis["checkpoints"]:
        m, est = r[split], r[split]["estimates"]
        row = scores.get(r["epoch"], {})
        trajectory.append({"epoch": r["epoch"], "fraction": r["fraction"], "val_acc": r["val"]["acc"],
                           "train_acc": r["train"]["acc"], "test_acc": (recorded or {}).get(r["epoch"], {}).get(
                               "test_acc"),
                           "confidence": m["confidence"], "p_target_t": m["p_target_t"],
                           "nontarget_entropy_t": m["nontarget_entropy_t"], "nc1": m["nc1"],
                           **{q: [est[q]["mean"], est[q]["se"]] for q in ("i_xf", "i_yf")},
                           "score": [row.get("score"), row.get("se")]})
    return {"selected_epoch": analysis["selected"]["epoch"], "argmax": analysis["selected"].get("argmax"),
            "analysis": str(path / "analysis.json"),
            "split": split, "criterion": analysis["selected"]["criterion"], "ties": analysis["selected"]["ties"],
            "trajectory": trajectory, "agreement": analysis.get("agreement"),
            "picks": {key: {"t_star": c["t_star"], "t_star_info": c.get("best"), "ties": c["ties"],
                            "flat": c["flat"]}
                      for key, c in analysis["criteria"].items()}}
