"""The study report on a fabricated study: a results DB filled by hand, teacher folders with tiny files, no training."""

import csv
import io
import json
import math
import re
import statistics

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from pathlib import Path
from rich.console import Console

from ckptkd.errors import UserError
from ckptkd.results import ResultsDB
from ckptkd.study_report import write_report

VARIANTS = ["none", "T0.3", "T0.5", "T0.7", "Tfull", "Tstar", "snapshot", "full_ensemble"]
TABLE3 = ["none", "T0.3", "T0.5", "T0.7", "Tfull", "Tstar"]
EPOCHS = 20
SAVED = [6, 10, 12, 14, 20]

# Student test accuracy by seed 0, 1, 2. resnet8->mlp: T0.5 beats Tfull on every seed and the snapshot ensemble beats
# the full ensemble on seeds 1 and 2; resnet14->resnet8: Tfull beats every intermediate teacher on every seed.
STUDENTS = {
    "resnet8->mlp": {
        "none": [0.800, 0.805, 0.795], "T0.3": [0.812, 0.815, 0.808], "T0.5": [0.830, 0.834, 0.826],
        "T0.7": [0.822, 0.827, 0.818], "Tfull": [0.818, 0.821, 0.815], "Tstar": [0.829, 0.836, 0.824],
        "snapshot": [0.840, 0.838, 0.845], "full_ensemble": [0.842, 0.835, 0.841]},
    "resnet14->resnet8": {
        "none": [0.850, 0.846, 0.853], "T0.3": [0.852, 0.850, 0.851], "T0.5": [0.857, 0.855, 0.858],
        "T0.7": [0.861, 0.859, 0.860], "Tfull": [0.866, 0.864, 0.867], "Tstar": [0.859, 0.862, 0.857],
        "snapshot": [0.868, 0.865, 0.866], "full_ensemble": [0.872, 0.870, 0.869]},
}
# The shared-teacher pair has one trajectory teacher; the other has one per student seed.
TEACHERS = {"resnet8->mlp": {0: 0.880}, "resnet14->resnet8": {0: 0.905, 1: 0.910, 2: 0.902}}
# The epoch T* selected, by teacher seed.
T_STAR = {"resnet8->mlp": {0: 10}, "resnet14->resnet8": {0: 12, 1: 14, 2: 14}}
VARIANT_EPOCHS = {"T0.3": [6], "T0.5": [10], "T0.7": [14], "Tfull": [20], "snapshot": [6, 10, 14],
                  "full_ensemble": [20, 20, 20]}


def _png() -> bytes:
    buffer = io.BytesIO()
    plt.imsave(buffer, np.zeros((1, 1, 3)), format="png")
    return buffer.getvalue()


def _teacher_folder(folder, model: str, seed: int, selected: int) -> None:
    (folder / "plots").mkdir(parents=True)
    checkpoints = [{"epoch": e, "fraction": e / EPOCHS, "path": f"checkpoints/epoch-{e:04d}.safetensors",
                    "metrics": {"train_acc": 0.6 + e / 50, "val_acc": 0.5 + e / 50, "test_acc": 0.49 + e / 50}}
                   for e in SAVED]
    (folder / "manifest.json").write_text(json.dumps({
        "format": 1, "kind": "train", "status": "complete", "name": folder.name, "model": {"name": model},
        "data": {"name": "digits"}, "seed": seed, "epochs": EPOCHS, "checkpoints": checkpoints}))
    records = [{"epoch": e, "fraction": e / EPOCHS, "val_acc": 0.5 + e / 50, "confidence": 0.4 + e / 40,
                "nontarget_entropy": 2.0 - e / 20, "nontarget_entropy_t": 2.1 - e / 25, "i_xf": 1.0 + e / 10,
                "i_yf": 1.5 + e / 100, "score": 1.0 if e == selected else e / 25, "knn_score": e / 21} for e in SAVED]
    (folder / "analysis.json").write_text(json.dumps({
        "format": 1, "checkpoints": records,
        "selected": {"epoch": selected, "reference": f"{folder}@epoch={selected}"},
        "agreement": {"spearman_i_xf": 0.9, "spearman_i_yf": None, "spearman_score": 0.8}}))
    for figure in ("information_plane", "class_correlation", "trajectory"):
        (folder / "plots" / f"{figure}.png").write_bytes(_png())


def make_study(root, *, seeds=(0, 1, 2), fail=()):
    """A finished study of 2 pairs x len(seeds) seeds x 8 variants; the run_ids in `fail` fail (once, for good)."""
    study = root / "study"
    study.mkdir()
    pairs = [{"name": name, "teacher": {"model": {"name": name.split("->")[0]}, "data": {"name": "digits"}},
              "student": {"model": {"name": name.split("->")[1]}}} for name in STUDENTS]
    (study / "study.yaml").write_text(yaml.safe_dump({
        "name": "fabricated", "seeds": list(seeds), "ensemble_size": 3, "variants": VARIANTS, "pairs": pairs,
        "snapshot": [0.3, 0.5, 0.7]}))
    db = ResultsDB(study / "results.sqlite", max_attempts=1)
    metrics = {}

    def add(run_id, kind, group, result, depends_on=()):
        db.add(run_id, kind=kind, name=run_id, config={}, path=f"runs/{run_id}", depends_on=depends_on,
               group={"pair": group.pop("pair"), **group})
        metrics[run_id] = result

    for pair, accuracies in STUDENTS.items():
        teacher_model, student_model = pair.split("->")
        shared = len(TEACHERS[pair]) == 1
        for teacher_seed, acc in TEACHERS[pair].items():
            if not shared and teacher_seed not in seeds:
                continue
            teacher = f"{teacher_model}-t{teacher_seed}"
            _teacher_folder(study / "runs" / teacher, teacher_model, teacher_seed, T_STAR[pair][teacher_seed])
            add(teacher, "train", {"pair": pair, "role": "teacher", "teacher_model": teacher_model,
                                   "student_model": student_model, "teacher_seed": teacher_seed, "seed": teacher_seed},
                {"test_acc": acc, "val_acc": acc + 0.01, "best_val_acc": acc + 0.012, "best_val_epoch": 18})
            add(f"{teacher}-analysis", "analyze", {"pair": pair, "role": "analysis", "seed": teacher_seed,
                                                   "teacher_seed": teacher_seed},
                {"selected_epoch": T_STAR[pair][teacher_seed], "analysis": f"runs/{teacher}/analysis.json"},
                depends_on=[teacher])
        for member in (1, 2):
            add(f"{teacher_model}-{pair}-member{member}", "train",
                {"pair": pair, "role": "ensemble_member", "teacher_seed": 10 + member, "seed": 10 + member},
                {"test_acc": 0.87, "val_acc": 0.88, "best_val_acc": 0.89, "best_val_epoch": 19})
        for variant in VARIANTS:
            for seed in seeds:
                teacher_seed = 0 if shared else seed
                teacher = f"{teacher_model}-t{teacher_seed}"
                epochs = [T_STAR[pair][teacher_seed]] if variant == "Tstar" else VARIANT_EPOCHS.get(variant, [])
                acc = accuracies[variant][seed]
                add(f"{pair}-{variant}-s{seed}", "train" if variant == "none" else "distill",
                    {"pair": pair, "role": "student", "variant": variant, "seed": seed, "teacher_seed": teacher_seed},
                    {"test_acc": acc, "val_acc": acc + 0.005, "train_acc": 0.95, "best_val_acc": acc + 0.008,
                     "best_val_epoch": 17, "train_time_s": 3.0,
                     "teacher_test_acc": None if variant == "none" else 0.88 + 0.001 * teacher_seed,
                     "teacher_val_acc": None if variant == "none" else 0.89,
                     "teachers": [f"runs/{teacher}@epoch={e}" for e in epochs], "teacher_epochs": epochs},
                    depends_on=[] if variant == "none" else [f"{teacher}-analysis"])
    while (run := db.claim()) is not None:
        if run["run_id"] in fail:
            db.fail(run["run_id"], error="RuntimeError: out of memory\nTraceback ...")
        else:
            db.complete(run["run_id"], metrics=metrics[run["run_id"]], timings={"train_s": 1.0})
    db.close()
    return study


def table3_rows(report: str) -> dict[str, list[str]]:
    """Table 3's rows by their first cell (the teacher model, or **Average**), without the leading/trailing pipes."""
    section = report.split("## Table 3", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def summary(values) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def test_report_of_a_complete_study(tmp_path):
    study = make_study(tmp_path)
    terminal = io.StringIO()
    paths = write_report(study, console=Console(file=terminal, width=220))
    report = (study / "report.md").read_text()

    assert "| Teacher | Student | Teacher acc. | Student (no KD) | T^0.3 | T^0.5 | T^0.7 | T^full | T* |" in report
    rows = table3_rows(report)
    assert list(rows) == ["resnet8", "resnet14", "**Average**"]
    for pair, teacher_model in (("resnet8->mlp", "resnet8"), ("resnet14->resnet8", "resnet14")):
        cells = rows[teacher_model]
        assert cells[1] == pair.split("->")[1]
        teachers = list(TEACHERS[pair].values())
        assert cells[2] == (summary(teachers) if len(teachers) > 1 else f"{100 * teachers[0]:.2f}")
        students = [c.strip("*") for c in cells[3:]]
        assert students == [summary(STUDENTS[pair][v]) for v in TABLE3]
        means = [statistics.mean(STUDENTS[pair][v]) for v in TABLE3]
        bold = [i for i, c in enumerate(cells[3:]) if c.startswith("**")]
        assert bold == [means.index(max(means))]
    averages = [statistics.mean(statistics.mean(STUDENTS[p][v]) for p in STUDENTS) for v in TABLE3]
    assert [c.strip("*") for c in rows["**Average**"][3:]] == [f"{100 * a:.2f}" for a in averages]
    assert rows["**Average**"][3 + averages.index(max(averages))].startswith("**")
    assert "sample standard deviation (ddof = 1)" in report

    t05, tfull = STUDENTS["resnet8->mlp"]["T0.5"], STUDENTS["resnet8->mlp"]["Tfull"]
    diff = 100 * (statistics.mean(t05) - statistics.mean(tfull))
    pooled = 100 * math.sqrt((statistics.stdev(t05) ** 2 + statistics.stdev(tfull) ** 2) / 2)
    assert (f"T^0.5 reached {summary(t05)} % vs {summary(tfull)} % for T^full (+{diff:.2f} points, "
            f"+{diff / pooled:.2f} pooled std; better on 3 of 3 paired seeds), so its mean is above that of T^full"
            in report)
    assert "T*, the checkpoint selected by the information criterion, is the same checkpoint as T^0.5" in report
    assert re.search(r"The snapshot ensemble reached .* for the full ensemble \(\+\d\.\d\d points, .*better on 2 of 3 "
                     r"paired seeds\), so its mean is above that of the full ensemble", report)
    other = report.split("**resnet14->resnet8.**", 1)[1]
    assert "T^0.7 gave the highest mean student accuracy" in other
    assert "better on 0 of 3 paired seeds), so its mean is below that of T^full" in other
    assert ("is the same checkpoint as T^0.7 for 2 of 3 teachers (T*: epochs 12, 14, 14 for teacher seeds 0, 1, 2; "
            "T^0.7: epoch 14)") in other

    ensemble = report.split("## Full ensemble vs snapshot ensemble", 1)[1].split("\n## ", 1)[0]
    snap, full = STUDENTS["resnet8->mlp"]["snapshot"], STUDENTS["resnet8->mlp"]["full_ensemble"]
    assert f"| resnet8->mlp | 88.00 | **{summary(snap)}** | 88.00 | {summary(full)} | " in ensemble
    assert "| 2 of 3 |" in ensemble

    trajectory = report.split("### resnet8->mlp", 1)[1].split("\n### ", 1)[0]
    assert "| 10 | 0.50 | 80.00 | 70.00 | 69.00 | 65.00 | 1.500 | 2.000 | 1.600 | 1.000 | T* |" in trajectory
    assert "I(X;F) 0.900, I(Y;F) undefined, score 0.800" in trajectory
    assert "not complete" not in report

    assert paths["report"] == str(study / "report.md")
    with open(paths["csv"], newline="") as f:
        lines = list(csv.reader(f))
    with ResultsDB(study / "results.sqlite") as db:
        assert len(lines) == len(db.rows()) + 1
    assert lines[0][:4] == ["run_id", "kind", "name", "status"]
    assert ["resnet8->mlp-T0.5-s1", "distill", "resnet8->mlp-T0.5-s1", "complete", "resnet8->mlp", "student",
            "T0.5", "1", "0", "0.834"] == lines[[r[0] for r in lines].index("resnet8->mlp-T0.5-s1")][:10]

    names = sorted(p.split("/")[-1] for p in paths["plots"])
    assert "accuracy_by_variant.png" in names and "information_plane_resnet8-mlp.png" in names
    assert "class_correlation_resnet14-resnet8.png" in names
    for path in paths["plots"]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{path.split('/')[-1]})" in report

    printed = terminal.getvalue()
    assert "Table 3" in printed and "Average" in printed and "Full ensemble vs snapshot ensemble" in printed
    write_report(study, quiet=True)
    assert (study / "report.md").read_text() == report


def test_failed_and_blocked_runs_are_reported(tmp_path):
    study = make_study(tmp_path, fail={"resnet14-t2-analysis", "resnet8->mlp-T0.7-s2"})
    write_report(study, quiet=True)
    report = (study / "report.md").read_text()
    # The failed analysis blocks the 7 teacher-using students of seed 2, which stay pending.
    assert "**9 of 60 runs are not complete** (7 pending, 2 failed)" in report
    assert "- `resnet14-t2-analysis` (analyze, failed, attempts: 1): RuntimeError: out of memory" in report
    assert "- `resnet14->resnet8-T0.5-s2` (distill, pending, attempts: 0; depends on failed resnet14-t2-analysis)" \
        in report
    rows = table3_rows(report)
    assert rows["resnet8"][3 + TABLE3.index("T0.7")] == summary(STUDENTS["resnet8->mlp"]["T0.7"][:2]) + " (n=2)"
    assert rows["resnet14"][3] == summary(STUDENTS["resnet14->resnet8"]["none"])


def test_single_seed_has_no_std(tmp_path):
    study = make_study(tmp_path, seeds=(0,))
    write_report(study, quiet=True)
    report = (study / "report.md").read_text()
    cell = table3_rows(report)["resnet8"][3 + TABLE3.index("T0.5")].strip("*")
    assert cell == f"{100 * STUDENTS['resnet8->mlp']['T0.5'][0]:.2f} (n=1)"
    assert "(n=1, std undefined)" in report and "pooled std undefined with fewer than 2 seeds" in report


def test_study_with_nothing_complete(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "name": "new", "seeds": [0, 1], "ensemble_size": 2, "variants": ["Tfull", "none", "snapshot", "full_ensemble"],
        "pairs": [{"name": "a->b", "teacher": {"model": {"name": "a"}}, "student": {"model": {"name": "b"}}}]}))
    with ResultsDB(tmp_path / "results.sqlite") as db:
        db.add("t", kind="train", name="t", config={}, path="runs/t", group={"pair": "a->b", "role": "teacher"})
    write_report(tmp_path, quiet=True)
    report = (tmp_path / "report.md").read_text()
    assert table3_rows(report)["a"] == ["a", "b", "—", "—", "—"]
    assert "**1 of 1 runs are not complete** (1 pending)" in report
    assert "The snapshot ensemble and the full ensemble cannot be compared: the snapshot ensemble has no" in report
    assert "the trajectory teacher has not completed yet" in report


def test_not_a_study(tmp_path):
    with pytest.raises(UserError, match="study folder not found"):
        write_report(tmp_path / "missing")
    with pytest.raises(UserError, match="not a ckptkd study"):
        write_report(tmp_path)


def test_cached_and_online_students_are_compared(tmp_path):
    study = make_study(tmp_path)
    online = {0: 0.79, 1: 0.80, 2: 0.81}
    db = ResultsDB(study / "results.sqlite")
    for seed, acc in online.items():
        db.add(f"online-s{seed}", kind="distill", name=f"online-s{seed}", config={}, path=f"runs/online-s{seed}",
               group={"pair": "resnet8->mlp", "role": "student", "variant": "T0.5@online", "seed": seed,
                      "teacher_seed": 0})
    while (run := db.claim()) is not None:
        db.complete(run["run_id"], metrics={"test_acc": online[int(run["run_id"][-1])], "val_acc": 0.8,
                                            "teachers": ["runs/t@0.5"]},
                    timings={"duration_s": 20.0 + int(run["run_id"][-1])})
    db.close()
    report = Path(write_report(study, quiet=True)["report"]).read_text()
    table = report.split("## Teacher cache", 1)[1].split("\n## ", 1)[0]
    cached = STUDENTS["resnet8->mlp"]["T0.5"]
    diff = 100 * (statistics.mean(cached) - statistics.mean(online.values()))
    signed = f"{diff:+.2f}".replace("-", "−")
    assert f"| resnet8->mlp | T^0.5 | {summary(cached)} | 80.00 ± 1.00 | {signed} |" in table
    assert "| 3 of 3 (sign test p = 0.25) | no |" in table  # 3 wins, 0 losses: 2 * (1/2)^3
    assert table.splitlines()[-2].endswith(" | 21.0 |")  # the online students' mean wall time
    assert "T0.5@online" not in report.split("## Table 3", 1)[1].split("\n## ", 1)[0]  # not a Table 3 column


def test_compute_time_is_summed_by_kind_of_run(tmp_path):
    study = make_study(tmp_path, seeds=(0, 1))
    db = ResultsDB(study / "results.sqlite")
    rows = db.rows()
    db.close()
    report = Path(write_report(study, quiet=True)["report"]).read_text()
    section = report.split("## Compute time", 1)[1].split("\n## ", 1)[0]
    counts = {line.split(" | ")[0].strip("| *"): int(line.split(" | ")[1]) for line in section.splitlines()
              if line.startswith("| ") and not line.startswith("| Runs")}
    students = [r for r in rows if r["group"]["role"] == "student"]
    assert counts["teacher training"] == sum(r["group"]["role"] in ("teacher", "ensemble_member") for r in rows)
    assert counts["checkpoint analysis"] == sum(r["group"]["role"] == "analysis" for r in rows)
    assert counts["students, no KD"] == sum(r["group"]["variant"] == "none" for r in students)
    assert counts["KD students, teachers online"] == len(students) - counts["students, no KD"]
    assert counts["total"] == len(rows)
    assert "No teacher cache was used." in section
