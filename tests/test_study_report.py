"""The study report on fabricated studies: a results DB filled by hand (ResultsDB.add/claim/complete/fail), tiny run
folders where a test needs them, no training. Every expected number is computed here, independently of the report's
own helpers (statistics/numpy/itertools), and compared with what report.md, results.csv and the terminal show."""

import csv
import io
import itertools
import json
import math
import re
import shutil
import statistics

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from rich.console import Console

from ckptkd.errors import UserError
from ckptkd.run.storage import write_sealed_json
from ckptkd.study.queue import ResultsDB
from ckptkd.study.report import CARRIED, write_report
from conftest import exact_permutation_p

EMPTY = "—"
PNG = b"\x89PNG\r\n\x1a\n"
PDF = b"%PDF"
FLAG = {"flag": "loss_rising", "epoch": 12, "detail": "training loss rose for 4 epochs (1.23 to 1.57)"}


# ---------------------------------------------------------------- formatting and statistics, written out here

def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def summary(values) -> str:
    """mean ± sample std (ddof = 1) in %."""
    values = list(values)
    return f"{pct(statistics.mean(values))} ± {pct(statistics.stdev(values))}"


def points(x: float) -> str:
    """A signed difference in points as the report writes it (U+2212 for minus, 0.00 unsigned)."""
    if round(x, 2) == 0:
        return "0.00"
    return f"{x:+.2f}".replace("-", "−")


def exact_sign_flip_p(diffs) -> float:
    d = np.asarray(diffs, dtype=float)
    observed = abs(d.mean())
    flips = [abs((np.asarray(signs) * d).mean()) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def holm(pvalues: dict) -> dict:
    keys = sorted(pvalues, key=pvalues.get)
    out, running = {}, 0.0
    for i, k in enumerate(keys):
        running = max(running, min(1.0, (len(keys) - i) * pvalues[k]))
        out[k] = running
    return out


def unit_level(p, a, b):
    """(units text, mean, (low, high), p, smallest p) of a - b in points, computed here at the independent unit:
    trajectories when both depend on the trajectory, trajectory means against no-KD runs when b is no KD."""
    from scipy import stats as scipy_stats

    if b == "none":
        first = [100 * statistics.mean(ACC[p][a][(t, s)] for s in range(3)) for t in range(3)]
        second = [100 * v for v in ACC[p]["none"].values()]
        va, vb = statistics.variance(first) / 3, statistics.variance(second) / 3
        df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
        mean = statistics.mean(first) - statistics.mean(second)
        half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
        return ("3 trajectories against 3 runs", mean, (mean - half, mean + half),
                exact_permutation_p(first, second), 2 / math.comb(6, 3))
    units = [100 * statistics.mean(ACC[p][a][(t, s)] - ACC[p][b][(t, s)] for s in range(3)) for t in range(3)]
    mean = statistics.mean(units)
    half = scipy_stats.t.ppf(0.975, 2) * statistics.stdev(units) / math.sqrt(3)
    return "3 trajectories", mean, (mean - half, mean + half), exact_sign_flip_p(units), 2 / 2 ** 3


def ci_of(text: str) -> tuple[float, float]:
    return tuple(float(x.replace("−", "-")) for x in text.strip("[]").split(", "))


def section(report: str, heading: str) -> str:
    """The body of the '## heading...' section, up to the next '## ' heading."""
    return report.split("\n" + heading, 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in text (header and alignment rows dropped), as stripped cells."""
    rows, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("| "):
            continue
        if i + 1 < len(lines) and lines[i + 1].startswith("|--") or line.startswith("|--"):
            continue  # a header row
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def table3(report: str) -> dict[str, list[str]]:
    """Table 3's rows by their first cell (the teacher model, or **Average**)."""
    return {cells[0]: cells for cells in table_rows(section(report, "## Table 3"))}


def header_row(report: str, heading: str) -> list[str]:
    line = next(line for line in section(report, heading).splitlines() if line.startswith("| "))
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def png(shade: float = 0.0) -> bytes:
    buffer = io.BytesIO()
    plt.imsave(buffer, np.full((2, 2, 3), shade), format="png")
    return buffer.getvalue()


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- a fabricated study

class Study:
    """study.yaml and results.sqlite written by hand: runs are added in order, then claimed and completed (or
    failed) as the DB hands them out; runs meant to stay pending are added after that."""

    def __init__(self, root, name="fabricated", seeds=(0, 1, 2), trajectories=3, **extra):
        self.dir = root / name
        self.dir.mkdir()
        self.config = {"name": name, "seeds": list(seeds), "trajectories": trajectories, "ensemble_size": 3,
                       "max_attempts": 1, "snapshot": [0.3, 0.5, 0.7], "variants": [], "pairs": [], **extra}
        self.runs, self.later = [], []

    def pair(self, name, variants, epochs=20, data="cifar100"):
        teacher, student = name.split("->")
        self.config["pairs"].append({"name": name, "variants": list(variants),
                                     "teacher": {"model": {"name": teacher}, "data": {"name": data},
                                                 "schedule": {"epochs": epochs}},
                                     "student": {"model": {"name": student}}})
        self.config["variants"] = sorted(set(self.config["variants"]) | set(variants))

    def add(self, run_id, kind, group, metrics=None, *, outcome="complete", depends_on=(), duration=1.0,
            name=None, error="RuntimeError: CUDA out of memory\nTraceback (most recent call last): ..."):
        run = dict(run_id=run_id, kind=kind, group=group, metrics=metrics, outcome=outcome,
                   depends_on=list(depends_on), duration=duration, name=name or run_id, error=error)
        (self.later if outcome == "pending" else self.runs).append(run)
        return run_id

    def teacher(self, pair, t, acc, *, outcome="complete", duration=10.0, run_id=None, top5=None):
        teacher_model, student_model = pair.split("->")
        run_id = run_id or f"{teacher_model}-t{t}"
        return self.add(run_id, "train", {"pair": pair, "pairs": [pair], "serves": [[pair]], "role": "teacher",
                                          "teacher_model": teacher_model, "student_model": student_model,
                                          "teacher_seed": t, "seed": t},
                        {"test_acc": acc, "val_acc": acc + 0.01, "best_val_acc": acc + 0.012, "best_val_epoch": 18,
                         "health": {"ok": True, "flags": []}, **({"test_top5": top5} if top5 is not None else {})},
                        outcome=outcome, duration=duration, name=run_id.replace("id-", ""))

    def analysis(self, pair, t, metrics, *, depends_on, outcome="complete", duration=5.0, run_id=None):
        run_id = run_id or f"{pair.split('->')[0]}-t{t}-analysis"
        return self.add(run_id, "analyze", {"pair": pair, "pairs": [pair], "serves": [[pair]], "role": "analysis",
                                            "teacher_seed": t, "seed": t}, metrics,
                        outcome=outcome, depends_on=depends_on, duration=duration, name=run_id.replace("id-", ""))

    def student(self, pair, variant, cells, acc, *, depends_on=(), also=(), flags=(), cache=None, old=False,
                outcome="complete", duration=3.0, run_id=None, teacher_epochs=(10,), teacher_acc=None, top5=None,
                paper=None):
        """One student task serving (variant, t, s) for each (t, s) in cells, and every (variant, t, s) in also."""
        teacher_model, student_model = pair.split("->")
        t, s = cells[0]
        run_id = run_id or f"{pair}-{variant}-t{t}s{s}"
        group = {"pair": pair, "role": "student", "variant": variant, "seed": s, "teacher_seed": t,
                 "teacher_model": teacher_model, "student_model": student_model}
        if not old:
            group.update(pairs=[pair], serves=[[pair, variant, u, v] for u, v in cells] + [[pair, *c] for c in also])
        kd = variant != "none"
        metrics = None if acc is None else {
            "test_acc": round(acc + 0.0031, 6), "test_acc_last_k": acc, "val_acc": acc + 0.01,
            "best_val_acc": acc + 0.012, "best_val_epoch": 17, "train_time_s": duration - 0.5,
            "health": {"ok": not flags, "flags": list(flags)},
            "teacher_test_acc": (teacher_acc or 0.75 + 0.001 * t) if kd else None,
            "teacher_val_acc": 0.76 if kd else None,
            "teachers": [f"runs/{teacher_model}-t{t}@epoch={e}" for e in teacher_epochs] if kd else [],
            "teacher_epochs": list(teacher_epochs) if kd else [], "teacher_cache": cache if kd else None,
            **({"test_top5": round(top5 + 0.002, 6), "test_top5_last_k": top5} if top5 is not None else {}),
            **({"test_acc_best_of_last": paper, "best_of_last": 10} if paper is not None else {})}
        return self.add(run_id, "train" if not kd else "distill", group, metrics, outcome=outcome,
                        depends_on=depends_on, duration=duration, name=run_id.replace("id-", ""))

    def build(self):
        (self.dir / "study.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        db = ResultsDB(self.dir / "results.sqlite", max_attempts=1)
        by_id = {}
        for run in self.runs:
            db.add(run["run_id"], kind=run["kind"], name=run["name"], config={"id": run["run_id"]},
                   path=f"runs/{run['name']}", depends_on=run["depends_on"], group=run["group"])
            by_id[run["run_id"]] = run
        while (claimed := db.claim()) is not None:
            run = by_id[claimed["run_id"]]
            if run["outcome"] == "fail":
                db.fail(run["run_id"], error=run["error"])
            else:
                db.complete(run["run_id"], metrics=run["metrics"], timings={"duration_s": run["duration"]})
        for run in self.later:
            db.add(run["run_id"], kind=run["kind"], name=run["name"], config={"id": run["run_id"]},
                   path=f"runs/{run['name']}", depends_on=run["depends_on"], group=run["group"])
        db.close()
        return self.dir


def trajectory_metrics(epochs, saved, selected, *, t=0, picks=None, val=None, teacher="teacher"):
    """An analysis row's metrics as ckptkd.study.analysis_metrics stores them; each trajectory's information
    estimates shifted by its number, so that the trajectories of a pair lie apart in the information plane."""
    rows = [{"epoch": e, "fraction": e / epochs, "val_acc": (val or {}).get(e, 0.5 + e / 100),
             "train_acc": 0.6 + e / 50, "test_acc": 0.49 + e / 100, "confidence": 0.4 + e / 40,
             "p_target_t": 0.3 + e / 100, "nontarget_entropy_t": 2.0 - e / 20, "nc1": 1.5 - e / 20,
             "i_xf": [1 + e / 10 + 0.3 * t, 0.01], "i_yf": [1.5 + e / 100 - 0.02 * t, 0.002],
             "score": [e / 25, 0.01]} for e in saved]
    return {"selected_epoch": selected, "analysis": f"runs/{teacher}-t{t}/analysis.json", "split": "train",
            "criterion": "info", "ties": [selected], "trajectory": rows,
            "agreement": {"spearman_i_xf": 0.9, "spearman_i_yf": None, "spearman_score": 0.8},
            "picks": picks or {"info@train": {"t_star": selected, "ties": [selected], "flat": False}}}


def pdf_stand_in(shade: float = 0.0) -> bytes:
    """A teacher figure's PDF as the report copies it (bytes it never parses)."""
    return PDF + f"-1.4 stand-in {shade}\n".encode()


def teacher_folder(study, name, shade=0.0, pdf=True):
    """A teacher's run folder with its analysis figures: a PNG each, and its PDF unless the run predates them."""
    plots = study / "runs" / name / "plots"
    plots.mkdir(parents=True)
    for figure in ("information_plane", "class_correlation", "trajectory"):
        (plots / f"{figure}.png").write_bytes(png(shade))
        if pdf:
            (plots / f"{figure}.pdf").write_bytes(pdf_stand_in(shade))


# ---------------------------------------------------------------- the main study: three pairs, three verdicts

A, B, C = "wrn40->wrn16", "resnet56->resnet20", "vgg13->vgg8"
INTERMEDIATE = ["T0.3", "T0.5", "T0.7"]
COLUMNS = ["none", "T0.3", "T0.5", "T0.7", "Tfull", "Tstar"]
LABELS = {"none": "Student (no KD)", "T0.3": "T^0.3", "T0.5": "T^0.5", "T0.7": "T^0.7", "Tfull": "T^full",
          "Tstar": "T*"}
CELLS = [(t, s) for t in range(3) for s in range(3)]
TEACHER_ACC = {A: [0.752, 0.761, 0.757], B: [0.731, 0.729, 0.735], C: [0.712, 0.718, 0.709]}
FLAGGED = (B, "T0.7", (1, 2))
CACHED_PAIRS = (A, B)  # C's KD students ran their teachers online


def main_accuracies():
    """{pair: {variant: {(t, s): acc}}}; no KD by seed only (one run serves every trajectory)."""
    rng = np.random.default_rng(2024)
    r = lambda x: round(float(x) / 100, 4)
    out = {}
    # pair: (Tfull - none, {intermediate: (shift vs Tfull, noise)}, Tstar shift)
    design = {A: (3.0, {"T0.3": (-0.5, 0.3), "T0.5": (1.5, 0.2), "T0.7": (0.0, 0.4)}, 1.0),
              B: (2.0, {v: (-1.0, 0.2) for v in INTERMEDIATE}, None),
              C: (0.3, {v: (-1.0, 0.2) for v in INTERMEDIATE}, None)}
    for p, (gain, shifts, star) in design.items():
        none = {s: 70 + 0.4 * s + rng.normal(0, 0.3) for s in range(3)}
        full = {(t, s): none[s] + 0.2 * (t - 1) + gain + rng.normal(0, 0.2 if p != C else 0.08) for t, s in CELLS}
        acc = {"none": {s: r(v) for s, v in none.items()}, "Tfull": {k: r(v) for k, v in full.items()}}
        for v, (shift, noise) in shifts.items():
            acc[v] = {k: r(full[k] + shift + rng.normal(0, noise)) for k in CELLS}
        if star is not None:
            acc["Tstar"] = {k: r(full[k] + star + rng.normal(0, 0.3)) for k in CELLS}
        out[p] = acc
    return out


ACC = main_accuracies()


def paired(p, a, b) -> dict:
    """a - b by (trajectory, seed), none looked up by seed."""
    get = lambda v, t, s: ACC[p][v][s] if v == "none" else ACC[p][v][(t, s)]
    return {(t, s): get(a, t, s) - get(b, t, s) for t, s in CELLS}


def duration(run_id: str) -> float:
    return 1.0 + sum(map(ord, run_id)) % 17


def make_main_study(root):
    st = Study(root, name="main")
    for p in (A, B, C):
        st.pair(p, [v for v in COLUMNS if v in ACC[p]])
        teachers, analyses = {}, {}
        for t in range(3):
            teachers[t] = st.teacher(p, t, TEACHER_ACC[p][t], duration=duration(f"{p}t{t}"))
            analyses[t] = st.analysis(p, t, trajectory_metrics(20, [5, 10, 15, 20], 10, t=t,
                                                               teacher=p.split("->")[0]),
                                      depends_on=[teachers[t]], duration=duration(f"{p}a{t}"))
        for s in range(3):
            st.student(p, "none", [(t, s) for t in range(3)], ACC[p]["none"][s], duration=duration(f"{p}n{s}"))
        epochs = {"T0.3": 6, "T0.5": 10, "T0.7": 14, "Tfull": 20, "Tstar": 10}
        for v in COLUMNS[1:]:
            if v not in ACC[p]:
                continue
            for t, s in CELLS:
                run_id = f"{p}-{v}-t{t}s{s}"
                cache = ({"built": 1 if s == 0 else 0, "reused": 0 if s == 0 else 1, "seconds": 2.0}
                         if p in CACHED_PAIRS else None)
                st.student(p, v, [(t, s)], ACC[p][v][(t, s)], cache=cache, duration=duration(run_id),
                           depends_on=[teachers[t]] + ([analyses[t]] if v == "Tstar" else []),
                           flags=[FLAG] if (p, v, (t, s)) == FLAGGED else (), teacher_epochs=(epochs[v],))
    teacher_folder(st.dir, "wrn40-t0")
    return st.build()


@pytest.fixture(scope="module")
def main(tmp_path_factory):
    """The main study and one write_report of it (with an 80-column recording console), shared by the tests that
    only read what it wrote."""
    study = make_main_study(tmp_path_factory.mktemp("main"))
    console = Console(width=80, record=True, force_terminal=False, file=io.StringIO())
    result = write_report(study, console=console)
    return study, result, (study / "report.md").read_text(encoding="utf-8"), console.export_text()


def test_design_of_the_main_study_is_what_the_verdicts_need():
    """Guards the fabricated numbers, so a verdict test fails for the report, not for an unlucky draw: A's and B's
    gates pass at the unit level, C's KD gain is below the gate; A's T^0.5 beats T^full on every trajectory (but 3
    trajectories cannot reach p < 0.05); B's intermediate teachers are clearly worse (their intervals end below 0)."""
    for p in (A, B):
        _, mean, (low, _), _, _ = unit_level(p, "Tfull", "none")
        assert mean >= 0.5 and low > 0, p
    _, mean, _, _, _ = unit_level(C, "Tfull", "none")
    assert mean < 0.5
    assert all(d > 0.012 for d in paired(A, "T0.5", "Tfull").values())
    for v in INTERMEDIATE:
        assert unit_level(B, v, "Tfull")[2][1] < 0, v


def test_verdicts_and_findings(main):
    _, result, report, _ = main
    cannot = "design cannot resolve: 3 trajectories, smallest attainable p = 0.75 after Holm's correction over 3"
    assert result["verdicts"] == {A: f"inconclusive ({cannot})", B: "no gain larger than 0.3 points",
                                  C: result["verdicts"][C]}
    assert result["verdicts"][C] in ("inconclusive (KD did not clearly help)",
                                     "inconclusive (KD helped by less than the 0.5-point gate)")
    findings = section(report, "## Findings")
    assert f"**{A}: inconclusive ({cannot}).** KD helped:" in findings
    assert f"Whether an intermediate checkpoint teaches better is not settled ({cannot}); the best: T^0.5" in findings
    assert f"**{B}: no gain larger than 0.3 points.** KD helped:" in findings
    assert "No intermediate checkpoint gains more than 0.3 points over T^full" in findings
    assert "refuted" not in report and "confirmed" not in findings
    gate_c = unit_level(C, "Tfull", "none")[1]
    assert f"T^full − no KD = {points(gate_c)} points" in findings.split(f"**{C}", 1)[1]
    # the sentences give the same unit-level statistics as the table, with the unit and its n
    units, mean, _, p_value, smallest = unit_level(A, "T0.5", "Tfull")
    assert (f"T^0.5 − T^full = {points(mean)} points (95 % CI [" in findings
            and f"p = {p_value:.3g}, Holm 0.75, smallest attainable 0.75; unit: {units}; 9 wins / 0 losses in 9 "
                "paired students)" in findings)


def test_table3_cells_bold_best_and_average(main):
    _, _, report, _ = main
    assert header_row(report, "## Table 3") == ["Teacher", "Student", "Teacher acc."] + [LABELS[v] for v in COLUMNS]
    rows = table3(report)
    assert list(rows) == ["wrn40", "resnet56", "vgg13", "**Average**"]
    pair_means = {}
    for p in (A, B, C):
        cells = rows[p.split("->")[0]]
        assert cells[1] == p.split("->")[1]
        assert cells[2] == summary(TEACHER_ACC[p])
        expected, means = [], []
        for v in COLUMNS:
            if v not in ACC[p]:
                expected.append(EMPTY)
                means.append(None)
                continue
            values = list(ACC[p][v].values())  # the last-k metric, one value per distinct run
            text = summary(values)
            if (p, v) == FLAGGED[:2]:
                text += " ⚠1"
            expected.append(text)
            means.append(statistics.mean(values))
        assert [c.strip("*") for c in cells[3:]] == expected, p
        best = max(round(100 * m, 2) for m in means if m is not None)
        bold = [i for i, c in enumerate(cells[3:]) if c.startswith("**")]
        assert bold == [i for i, m in enumerate(means) if m is not None and round(100 * m, 2) == best], p
        pair_means[p] = means
    average = rows["**Average**"]
    assert average[2] == pct(statistics.mean(statistics.mean(TEACHER_ACC[p]) for p in (A, B, C)))
    expected = [pct(statistics.mean(pair_means[p][i] for p in (A, B, C))) for i in range(len(COLUMNS) - 1)]
    assert [c.strip("*") for c in average[3:]] == expected + [EMPTY]  # T*: only pair A has it, so no average
    means = [statistics.mean(pair_means[p][i] for p in (A, B, C)) for i in range(len(COLUMNS) - 1)]
    assert [c.startswith("**") for c in average[3:-1]] == [m == max(means) for m in means]
    assert "the mean test accuracy of each student's last k epochs" in report


def test_comparisons_match_an_independent_computation_at_the_unit(main):
    _, _, report, _ = main
    assert header_row(report, "## Comparisons") == [
        "Pair", "Comparison", "Unit (n)", "Mean Δ (points)", "95 % CI", "p", "Holm p", "Smallest p",
        "Wins / ties / losses", "Claim"]
    rows = {(r[0], r[1]): r[2:] for r in table_rows(section(report, "## Comparisons"))}
    expected_keys = []
    for p in (A, B, C):
        expected_keys.append((p, "T^full − no KD (gate)"))
        expected_keys += [(p, f"{LABELS[v]} − T^full") for v in INTERMEDIATE]
        if "Tstar" in ACC[p]:
            expected_keys.append((p, "T* − T^full"))
    assert list(rows) == expected_keys
    for p in (A, B, C):
        raw = {v: unit_level(p, v, "Tfull")[3] for v in INTERMEDIATE}
        adjusted = holm(raw)
        comparisons = [("Tfull", "none", "T^full − no KD (gate)")] + [(v, "Tfull", f"{LABELS[v]} − T^full")
                                                                      for v in INTERMEDIATE]
        if "Tstar" in ACC[p]:
            comparisons.append(("Tstar", "Tfull", "T* − T^full"))
        for a, b, label in comparisons:
            units, mean, (low, high), p_value, smallest = unit_level(p, a, b)
            unit, shown, ci, p_text, holm_text, smallest_text, counts, _claim = rows[(p, label)]
            assert unit == units and shown == points(mean), (p, label)
            assert ci_of(ci) == pytest.approx((low, high), abs=0.006), (p, label)
            assert p_text == f"{p_value:.3g}"
            values = [100 * d for d in paired(p, a, b).values()]
            wins = sum(v > 0 for v in values), sum(v == 0 for v in values), sum(v < 0 for v in values)
            assert counts == " / ".join(map(str, wins))  # over the 9 paired students: shown, not tested
            if a in INTERMEDIATE:
                assert holm_text == f"{adjusted[a]:.3g}" and smallest_text == f"{3 * smallest:.3g}", (p, label)
            else:
                assert holm_text == EMPTY and smallest_text == f"{smallest:.3g}"
    # pair A's T^0.5: every trajectory gains, and 3 of them can give no p below 2/8, 3/4 after Holm
    assert rows[(A, "T^0.5 − T^full")][3:6] == ["0.25", "0.75", "0.75"]


def test_shared_no_kd_student_counts_once_but_pairs_with_every_trajectory(main):
    _, _, report, _ = main
    rows = table3(report)
    for p in (A, B, C):
        none = list(ACC[p]["none"].values())
        cell = rows[p.split("->")[0]][3].strip("*")
        assert cell == summary(none)  # 3 distinct runs, not 9 cells
        assert cell != summary([v for v in none for _ in range(3)])
        assert "(n=" not in cell
        gate = next(r for r in table_rows(section(report, "## Comparisons"))
                    if r[0] == p and r[1].endswith("(gate)"))
        assert gate[2] == "3 trajectories against 3 runs"  # each no-KD run once, not 9 pairs
        assert gate[3] == points(unit_level(p, "Tfull", "none")[1])


def test_flagged_student_is_marked_and_listed(main):
    _, _, report, _ = main
    pair, variant, (t, s) = FLAGGED
    cell = table3(report)[pair.split("->")[0]][3 + COLUMNS.index(variant)]
    assert cell.endswith(" ⚠1")
    other = [c for row in table3(report).values() for c in row if "⚠" in c]
    assert other == [cell]
    health = section(report, "## Run health")
    assert "1 completed runs were flagged" in health
    assert (f"- `{pair}-{variant}-t{t}s{s}` ({variant}): loss_rising at epoch 12: training loss rose for 4 epochs "
            "(1.23 to 1.57)") in health


def test_compute_time_is_summed_by_kind_of_run(main):
    study, _, report, _ = main
    with ResultsDB(study / "results.sqlite", readonly=True) as db:
        rows = db.rows()
    parts = {}
    for r in rows:
        g, m = r["group"], r["metrics"]
        if g["role"] == "analysis":
            part = "checkpoint analysis"
        elif g["role"] == "teacher":
            part = "teacher training"
        elif g["variant"] == "none":
            part = "students, no KD"
        else:
            part = "KD students, cached teachers" if m["teacher_cache"] else "KD students, teachers online"
        parts.setdefault(part, []).append(r["timings"]["duration_s"])
    table = {r[0].strip("*"): r[1:] for r in table_rows(section(report, "## Compute time"))}
    assert list(table) == ["teacher training", "checkpoint analysis", "students, no KD",
                           "KD students, cached teachers", "KD students, teachers online", "total"]
    for part, seconds in parts.items():
        assert table[part] == [str(len(seconds)), f"{sum(seconds):.0f}", f"{statistics.mean(seconds):.1f}"]
    everything = [d for seconds in parts.values() for d in seconds]
    assert table["total"][:2] == [str(len(rows)), f"**{sum(everything):.0f}**"]
    kd = [r for r in rows if r["group"]["role"] == "student" and r["group"]["pair"] in CACHED_PAIRS
          and r["group"]["variant"] != "none"]
    built = sum(r["metrics"]["teacher_cache"]["built"] for r in kd)
    reused = sum(r["metrics"]["teacher_cache"]["reused"] for r in kd)
    assert f"Teacher caches: {built} built ({2 * built:.0f} s, inside the KD-student times above) and reused " \
           f"{reused} times." in report


def test_trajectories_csv_and_plots(main):
    study, result, report, _ = main
    assert result["carried_over"] == []
    trajectories = section(report, "## Teacher trajectories")
    for p in (A, B, C):
        for t in range(3):
            assert f"### {p}, trajectory {t}\n" in trajectories
    first = trajectories.split(f"### {A}, trajectory 0", 1)[1].split("\n### ", 1)[0]
    assert ("| 10 | 0.50 | 80.00 | 60.00 | 59.00 | 65.00 | 0.400 | 1.500 | 1 | 2.00 ± 0.01 | 1.600 ± 0.002 "
            "| 0.40 ± 0.01 | T* |") in first
    assert "I(X;F) 0.900, I(Y;F) undefined, score 0.800" in first
    assert CARRIED not in report and "not complete" not in report

    with ResultsDB(study / "results.sqlite", readonly=True) as db:
        db_rows = db.rows()
    with open(result["csv"], newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(db_rows)
    row = next(r for r in lines if r["run_id"] == f"{A}-T0.5-t1s2")
    assert (row["kind"], row["status"], row["pair"], row["role"], row["variant"], row["seed"], row["teacher_seed"]) \
        == ("distill", "complete", A, "student", "T0.5", "2", "1")
    assert float(row["test_acc_last_k"]) == ACC[A]["T0.5"][(1, 2)]
    assert float(row["test_acc"]) == pytest.approx(ACC[A]["T0.5"][(1, 2)] + 0.0031)
    flagged = next(r for r in lines if r["run_id"] == f"{FLAGGED[0]}-{FLAGGED[1]}-t1s2")
    assert flagged["health"] == "loss_rising"

    # every pair's information plane, drawn from the database; the lead teacher's own figures copied for the one
    # pair whose run folder is here
    names = sorted(path.rsplit("/", 1)[-1] for path in result["plots"])
    assert names == ["accuracy_by_variant.png", "class_correlation_wrn40-wrn16.png",
                     "information_plane_resnet56-resnet20.png", "information_plane_vgg13-vgg8.png",
                     "information_plane_wrn40-wrn16.png", "trajectory_wrn40-wrn16.png"]
    for path in result["plots"]:
        assert open(path, "rb").read(8) == PNG
        assert f"(plots/{path.rsplit('/', 1)[-1]})" in report
    for figure in ("class_correlation", "trajectory"):
        assert (study / "plots" / f"{figure}_wrn40-wrn16.png").read_bytes() == png()
        assert (study / "plots" / f"{figure}_wrn40-wrn16.pdf").read_bytes() == pdf_stand_in()
    assert (study / "plots" / "information_plane_wrn40-wrn16.png").read_bytes() != png()  # drawn, not copied


def test_terminal_view_at_80_columns_keeps_every_label_whole(main):
    _, _, _, text = main
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Table 3" in line)
    end = next(i for i in range(start, len(lines)) if lines[i].lstrip().startswith(("└", "┗", "+")))
    block = "\n".join(lines[start:end + 1])  # Table 3 as the terminal shows it
    assert all(len(line) <= 80 for line in lines)
    for word in ["Teacher acc.", "Average"] + [LABELS[v] for v in COLUMNS]:
        assert re.search(rf"(^|[ │┃|]){re.escape(word)}( |$)", block, re.M), (word, block)
    for p in (A, B, C):
        assert " ".join(p.split("->")) in block or p.split("->")[0] in block
        assert summary(ACC[p]["none"].values()) in block
    assert "…" not in text  # nothing cut short: a table that does not fit is turned or left to report.md
    # no word broken over two lines: no line of the table ends in the first part of a label
    for word in ("Teacher", "Student", "T^full", "T^0.5", "Average"):
        for cut in range(1, len(word)):
            for i in range(len(lines[start:end])):
                here, below = lines[start + i], lines[start + i + 1]
                broken = re.search(rf"(^|[ │┃|]){re.escape(word[:cut])}[ ]*[│┃|]", here) and word[cut:] in below
                assert not broken or word in here, (word, here, below)
    assert f"{A}: inconclusive (design cannot resolve" in text and f"{B}: no gain larger than 0.3 points." in text


def test_report_is_reproducible(main, tmp_path):
    study, _, report, _ = main
    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    before = files(copy)
    write_report(copy, quiet=True)
    assert files(copy) == before  # same report.md, results.csv, PNGs, and an untouched results.sqlite


# ---------------------------------------------------------------- failed and blocked runs

def make_failing_study(root):
    """One pair, 3 trajectories x 3 seeds; run_ids are hashes, names are readable (as a planned study has them).
    The teacher of trajectory 1 fails (its analysis and every student of it are blocked, the T* students through
    their analysis as well), the analysis of trajectory 2 fails (its T* students are blocked), the no-KD student of
    seed 2 fails."""
    st = Study(root, name="failing")
    p = "resnet32->resnet8"
    st.pair(p, ["none", "T0.5", "Tfull", "Tstar"])
    rid = lambda name: f"id-{name}"
    teachers, analyses = {}, {}
    for t in range(3):
        teachers[t] = st.teacher(p, t, 0.7, run_id=rid(f"teacher-t{t}"), outcome="fail" if t == 1 else "complete")
        analyses[t] = st.analysis(p, t, trajectory_metrics(20, [10, 20], 10, t=t), depends_on=[teachers[t]],
                                  run_id=rid(f"teacher-t{t}-analysis"), outcome="fail" if t == 2 else "complete")
    rng = np.random.default_rng(5)
    for s in range(3):
        st.student(p, "none", [(t, s) for t in range(3)], 0.6 + 0.01 * s, run_id=rid(f"none-s{s}"),
                   outcome="fail" if s == 2 else "complete")
    for v in ("T0.5", "Tfull", "Tstar"):
        for t, s in CELLS:
            st.student(p, v, [(t, s)], round(0.62 + 0.01 * rng.random(), 4), run_id=rid(f"{v}-t{t}s{s}"),
                       depends_on=[teachers[t]] + ([analyses[t]] if v == "Tstar" else []))
    return st.build(), p


def not_complete_lines(report):
    return {m.group(1): m for m in re.finditer(
        r"^- `([^`]+)` \((\w+), (\w+), attempts: (\d+)(?:; blocked by failed ([^)]*))?\)(.*)$",
        section(report, "## Runs not complete"), re.M)}


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    study, pair = make_failing_study(tmp_path_factory.mktemp("failing"))
    write_report(study, quiet=True)
    with ResultsDB(study / "results.sqlite", readonly=True) as db:
        rows = db.rows()
    return study, pair, (study / "report.md").read_text(encoding="utf-8"), rows


def test_failed_and_blocked_runs_are_reported(failing):
    study, pair, report, rows = failing
    failed = {r["name"] for r in rows if r["status"] == "failed"}
    assert failed == {"teacher-t1", "teacher-t2-analysis", "none-s2"}
    pending = [r for r in rows if r["status"] == "pending"]
    # blocked: analysis t1, 3 variants x 3 seeds of trajectory 1, the 3 T* students of trajectory 2
    assert len(pending) == 1 + 9 + 3
    assert (f"**{len(failed) + len(pending)} of {len(rows)} runs are not complete** ({len(pending)} pending, "
            f"{len(failed)} failed)") in report
    lines = not_complete_lines(report)
    assert set(lines) == failed | {r["name"] for r in pending}
    for name in failed:
        assert lines[name].group(3) == "failed" and lines[name].group(4) == "1"
        assert lines[name].group(5) is None
        assert lines[name].group(6) == ": RuntimeError: CUDA out of memory"
    culprits = lambda name: {c.replace("id-", "") for c in (lines[name].group(5) or "").split(", ") if c}
    # directly blocked by the failed analysis
    for s in range(3):
        assert lines[f"Tstar-t2s{s}"].group(3) == "pending"
        assert culprits(f"Tstar-t2s{s}") == {"teacher-t2-analysis"}
        assert culprits(f"T0.5-t1s{s}") == {"teacher-t1"}
    # blocked transitively: teacher t1 failed, so its analysis can never run
    assert culprits("teacher-t1-analysis") == {"teacher-t1"}
    assert "teacher-t1" in culprits("Tstar-t1s0")
    # students of the trajectories that ran are in the tables; the failed no-KD seed leaves n=2 of 3 runs
    cells = table3(report)["resnet32"]
    none = [0.60, 0.61]
    assert cells[3].strip("*") == f"{summary(none)} (n=2)"
    assert cells[4].strip("*").endswith("(n=6)") and cells[6].strip("*").endswith("(n=3)")


def test_blocked_runs_are_only_said_to_be_blocked_by_runs_that_failed(failing):
    """BUG (study_report.py, the "Runs not complete" section, `waits = f"; blocked by failed ..."`, line 915 today):
    ResultsDB.blocked() gives for each blocked run the dependencies that block it, and a dependency may itself be
    blocked rather than failed. The T* students of trajectory 1 depend on the failed teacher and on its analysis,
    which is pending (blocked); the report says they are "blocked by failed ...teacher-t1, ...teacher-t1-analysis",
    i.e. that the analysis failed, which it did not. It should name only the failed run(s) at the root of the chain
    (here teacher-t1), or say which dependency is itself blocked."""
    _, _, report, rows = failing
    failed = {r[key] for r in rows if r["status"] == "failed" for key in ("run_id", "name")}
    lines = not_complete_lines(report)
    wrong = {name: m.group(5) for name, m in lines.items()
             if m.group(5) and not set(m.group(5).split(", ")) <= failed}
    assert wrong == {}, f"said to be blocked by failed runs that did not fail: {wrong}"


# ---------------------------------------------------------------- carrying over what cannot be rebuilt

def make_old_study(root, *, trajectories=1, name="old"):
    """A study from before the DB kept trajectories: analysis rows with only selected_epoch/analysis, students
    without `serves`; its run folders (teacher_folder, analysis_file) are added by each test."""
    st = Study(root, name=name, trajectories=trajectories)
    p = "cnn->cnn"
    st.pair(p, ["none", "T0.5", "Tfull"])
    for t in range(trajectories):
        teacher = st.teacher(p, t, 0.8)
        st.analysis(p, t, {"selected_epoch": 10, "analysis": f"runs/cnn-t{t}/analysis.json"}, depends_on=[teacher])
        for s in range(3):
            if t == 0:
                st.student(p, "none", [(0, s)], 0.7 + 0.003 * s, old=True)
            for v, gain in (("T0.5", 0.02), ("Tfull", 0.01)):
                st.student(p, v, [(t, s)], round(0.7 + gain + 0.002 * s + 0.001 * t, 4), old=True,
                           depends_on=[teacher])
    return st.build(), p


def format2_analysis(epochs=20, saved=(5, 10, 15, 20), selected=10):
    """A teacher's analysis.json (format 2), as ckptkd.study.analysis_metrics reads it."""
    checkpoints = [{"epoch": e, "fraction": e / epochs, "val": {"acc": 0.5 + e / 100}, "train": {
        "acc": 0.6 + e / 50, "confidence": 0.4 + e / 40, "p_target_t": 0.3 + e / 100,
        "nontarget_entropy_t": 2.0 - e / 20, "nc1": 1.5 - e / 20,
        "estimates": {"i_xf": {"mean": 1 + e / 10, "se": 0.01}, "i_yf": {"mean": 1.5 + e / 100, "se": 0.002}}}}
        for e in saved]
    criterion = {"scores": [{"epoch": e, "score": e / 25, "se": 0.01} for e in saved], "t_star": selected,
                 "ties": [selected], "flat": False}
    return {"format": 2, "split": "train", "checkpoints": checkpoints, "criteria": {"info@train": criterion},
            "selected": {"epoch": selected, "criterion": "info@train", "ties": [selected]},
            "agreement": {"spearman_i_xf": 0.9, "spearman_i_yf": None, "spearman_score": 0.8}}


def analysis_file(study, teacher, **kwargs):
    (study / "runs" / teacher / "analysis.json").write_text(json.dumps(format2_analysis(**kwargs)))


def format2_rows(epochs=20, saved=(5, 10, 15, 20), selected=10):
    """The trajectory table rows the report shows for format2_analysis(...) (no manifest here, so no test %)."""
    rows = []
    for e in saved:
        cells = [str(e), f"{e / epochs:.2f}", pct(0.6 + e / 50), pct(0.5 + e / 100), EMPTY, pct(0.4 + e / 40),
                 f"{0.3 + e / 100:.3f}", f"{2.0 - e / 20:.3f}", format(1.5 - e / 20, ".3g"),
                 f"{1 + e / 10:.2f} ± 0.01", f"{1.5 + e / 100:.3f} ± 0.002", f"{e / 25:.2f} ± 0.01",
                 "T*" if e == selected else ""]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def trajectory_body(report, heading) -> list[str]:
    """The lines of one '### ' trajectory section, without its heading and the blank lines around it."""
    body = section(report, "## Teacher trajectories").split(f"{heading}\n", 1)[1].split("\n### ", 1)[0]
    return body.strip().splitlines()


def test_a_fresh_clone_carries_the_trajectory_section_over(tmp_path):
    """A report built from the teacher's run folder, then the study copied without runs/ (as git has it): the
    section comes back from report.json with the same numbers, marked; report.md itself is never read back."""
    study, pair = make_old_study(tmp_path)
    teacher_folder(study, "cnn-t0", shade=0.25)
    analysis_file(study, "cnn-t0")
    first = write_report(study, quiet=True)
    assert first["carried_over"] == []
    rebuilt = trajectory_body((study / "report.md").read_text(encoding="utf-8"), f"### {pair}")
    assert rebuilt[0].startswith("Trajectory 0 (`runs/cnn-t0-analysis`): T* (the tie-aware pick) = epoch 10 by "
                                 "info@train")
    assert [line for line in rebuilt if line.startswith("| ") and line[2].isdigit()] == format2_rows()

    clone = tmp_path / "clone"
    shutil.copytree(study, clone, ignore=shutil.ignore_patterns("runs"))
    (clone / "report.md").write_text("# stale\n\n### cnn->cnn\n\n| stale |\n", encoding="utf-8")
    kept_plot = (clone / "plots" / "class_correlation_cnn-cnn.png").read_bytes()
    plane = (clone / "plots" / "information_plane_cnn-cnn.png").read_bytes()
    result = write_report(clone, quiet=True)
    report = (clone / "report.md").read_text(encoding="utf-8")
    assert result["carried_over"] == [f"### {pair}"]
    assert trajectory_body(report, f"### {pair}") == [CARRIED, ""] + rebuilt
    assert "| stale |" not in report
    # the teacher plot of a run folder that is not here is kept and linked; the information plane is drawn again,
    # from the carried-over summary, the same
    target = clone / "plots" / "class_correlation_cnn-cnn.png"
    assert str(target) in result["plots"] and target.read_bytes() == kept_plot == png(0.25)
    assert (clone / "plots" / "class_correlation_cnn-cnn.pdf").read_bytes() == pdf_stand_in(0.25)
    assert f"![class correlation, {pair}](plots/class_correlation_cnn-cnn.png)" in section(report, "## Plots")
    assert (clone / "plots" / "information_plane_cnn-cnn.png").read_bytes() == plane
    assert f"![information plane, {pair}](plots/information_plane_cnn-cnn.png)" in section(report, "## Plots")
    # the old DB's students (no `serves`) are still paired and tabled
    assert table3(report)["cnn"][3].strip("*") == summary([0.7, 0.703, 0.706])
    before = files(clone)
    again = write_report(clone, quiet=True)
    assert again["carried_over"] == [f"### {pair}"]
    assert files(clone) == before  # report.md, report.json, results.csv and every PNG byte-identical


def test_a_report_never_loses_what_it_had(tmp_path):
    """Two trajectories, each section rebuilt from its teacher's analysis.json; then one run folder goes, then the
    other, then report.md and the plots as well: every report still has both sections, with the same lines."""
    study, pair = make_old_study(tmp_path, trajectories=2)
    for t, selected in ((0, 10), (1, 15)):
        teacher_folder(study, f"cnn-t{t}")
        analysis_file(study, f"cnn-t{t}", selected=selected)
    headings = [f"### {pair}, trajectory {t}" for t in (0, 1)]
    write_report(study, quiet=True)
    report = (study / "report.md").read_text(encoding="utf-8")
    first = {h: trajectory_body(report, h) for h in headings}
    for t, (h, selected) in enumerate(zip(headings, (10, 15))):
        assert first[h][0].startswith(f"Trajectory {t} (`runs/cnn-t{t}-analysis`): T* (the tie-aware pick) = "
                                      f"epoch {selected} by")
        assert [line for line in first[h] if line.startswith("| ") and line[2].isdigit()] == \
            format2_rows(selected=selected)

    shutil.rmtree(study / "runs" / "cnn-t1")
    result = write_report(study, quiet=True)
    report = (study / "report.md").read_text(encoding="utf-8")
    assert result["carried_over"] == [headings[1]]
    assert trajectory_body(report, headings[0]) == first[headings[0]]
    assert trajectory_body(report, headings[1]) == [CARRIED, ""] + first[headings[1]]

    shutil.rmtree(study / "runs")
    (study / "report.md").unlink()
    result = write_report(study, quiet=True)
    report = (study / "report.md").read_text(encoding="utf-8")
    assert result["carried_over"] == headings
    for h in headings:
        assert trajectory_body(report, h) == [CARRIED, ""] + first[h]
    before = files(study)
    write_report(study, quiet=True)
    assert files(study) == before


def test_a_damaged_report_json_is_refused(tmp_path):
    """report.json may hold the only copy of a section: a damaged or foreign one stops the report with one line
    naming it, and nothing is overwritten."""
    study, pair = make_old_study(tmp_path)
    teacher_folder(study, "cnn-t0")
    analysis_file(study, "cnn-t0")
    write_report(study, quiet=True)
    data = study / "report.json"
    text = data.read_text(encoding="utf-8")
    assert json.loads(text)["pairs"][0]["trajectories"][0]["summary"]["selected_epoch"] == 10
    for damaged, message in ((text.replace('"selected_epoch": 10', '"selected_epoch": 15'),
                              "does not match its checksum"),
                             (text[:len(text) // 2], "is not valid JSON"),
                             (None, "is not a report.json this ckptkd can read")):
        if damaged is None:
            write_sealed_json(data, {"format": 99, "pairs": []})
        else:
            data.write_text(damaged, encoding="utf-8")
        before = files(study)
        with pytest.raises(UserError, match=message) as error:
            write_report(study, quiet=True)
        assert str(data) in str(error.value) and "\n" not in str(error.value)
        assert files(study) == before
    data.unlink()  # no report.json at all is an ordinary first report
    assert write_report(study, quiet=True)["carried_over"] == []


def test_rebuilt_sections_survive_the_run_folders_going_away(tmp_path):
    """Rebuilt from the teacher's analysis.json (old DB rows), then the run folders are deleted: the next report
    carries the very same lines over; rebuilt from the DB's trajectory metrics, deleting the folders changes
    nothing at all."""
    study, pair = make_old_study(tmp_path)
    teacher_folder(study, "cnn-t0", shade=0.25)
    (study / "runs" / "cnn-t0" / "analysis.json").write_text(json.dumps(format2_analysis()))
    first = write_report(study, quiet=True)
    report = (study / "report.md").read_text(encoding="utf-8")
    assert first["carried_over"] == [] and CARRIED not in report
    rebuilt = section(report, "## Teacher trajectories").split(f"### {pair}\n", 1)[1].strip().splitlines()
    assert "| 10 | 0.50 | 80.00 | 60.00 | — | 65.00 | 0.400 | 1.500 | 1 | 2.00 ± 0.01 | 1.600 ± 0.002 | 0.40 ± " \
           "0.01 | T* |" in rebuilt
    shutil.rmtree(study / "runs")
    second = write_report(study, quiet=True)
    assert second["carried_over"] == [f"### {pair}"]
    carried = (study / "report.md").read_text(encoding="utf-8")
    assert "\n".join([f"### {pair}", "", CARRIED, ""] + rebuilt) in carried
    assert sorted(second["plots"]) == sorted(first["plots"])
    assert (study / "plots" / "trajectory_cnn-cnn.png").read_bytes() == png(0.25)
    before = files(study)
    write_report(study, quiet=True)
    assert files(study) == before

    # with the trajectory in the DB, the section is rebuilt without the run folders, and identically
    st = Study(tmp_path, name="new", trajectories=1)
    st.pair(pair, ["none", "Tfull"])
    teacher = st.teacher(pair, 0, 0.8, run_id="cnn-t0")
    st.analysis(pair, 0, trajectory_metrics(20, [5, 10, 15, 20], 10, teacher="cnn"), depends_on=[teacher])
    for s in range(2):
        st.student(pair, "none", [(0, s)], 0.7 + 0.01 * s)
        st.student(pair, "Tfull", [(0, s)], 0.72 + 0.01 * s, depends_on=[teacher])
    new = st.build()
    teacher_folder(new, "cnn-t0", shade=0.75)
    with_folders = write_report(new, quiet=True)
    before = files(new)
    shutil.rmtree(new / "runs")
    without = write_report(new, quiet=True)
    assert without["carried_over"] == [] and CARRIED not in (new / "report.md").read_text(encoding="utf-8")
    assert without["plots"] == with_folders["plots"]
    assert files(new) == {k: v for k, v in before.items() if not k.startswith("runs/")}


# ---------------------------------------------------------------- the selection benchmark

SEL = "resnet110->resnet20"
# student accuracy (%) by trajectory, teacher epoch, seed
# (hundredths chosen so that no mean or SE below sits on a rounding boundary of the 2-decimal display)
CURVE = {0: {2: [60.0, 61.03], 4: [64.01, 65.52], 6: [63.1, 66.02], 8: [62.01, 63.0]},
         1: {2: [59.02, 60.04], 4: [62.02, 61.0], 6: [65.04, 64.02], 8: [63.44, 64.5]}}
PICKS = {0: {"info@train": 6, "info@val": 4, "nc1@train": 3, "p_target@train": 2},
         1: {"info@train": 6, "info@val": 8, "nc1@train": 2}}
VAL = {0: {2: 0.55, 4: 0.61, 6: 0.62, 8: 0.62}, 1: {2: 0.50, 4: 0.64, 6: 0.60, 8: 0.58}}  # best val: 8 (tie), 4


def make_selection_study(root):
    """Pair SEL with every checkpoint of its 2 trajectories teaching students of 2 seeds (CURVE), the selectors'
    picks (PICKS, VAL) and no-KD students."""
    st = Study(root, name="curve", seeds=(0, 1), trajectories=2)
    st.pair(SEL, ["none", "T0.5", "Tfull", "epoch2", "epoch4", "epoch6", "epoch8"], epochs=8)
    for t in range(2):
        teacher = st.teacher(SEL, t, 0.7)
        picks = {k: {"t_star": e, "ties": [e], "flat": False} for k, e in PICKS[t].items()}
        st.analysis(SEL, t, trajectory_metrics(8, [2, 4, 6, 8], PICKS[t]["info@train"], t=t, picks=picks,
                                               val=VAL[t]), depends_on=[teacher])
        for s in range(2):
            if t == 0:
                st.student(SEL, "none", [(0, s), (1, s)], 0.55 + 0.01 * s)
            for e, accs in CURVE[t].items():
                # T0.5 of an 8-epoch teacher is the epoch4 task, Tfull the epoch8 task
                also = [["T0.5", t, s]] if e == 4 else [["Tfull", t, s]] if e == 8 else []
                st.student(SEL, f"epoch{e}", [(t, s)], accs[s] / 100, also=also, depends_on=[teacher],
                           teacher_epochs=(e,))
    return st.build()


def test_selection_benchmark(tmp_path):
    study = make_selection_study(tmp_path)
    result = write_report(study, quiet=True)
    report = (study / "report.md").read_text(encoding="utf-8")

    def expected(picks_by_t):
        """Cross-fitted: for seed s, the best epoch by the other seed's students (the later on a tie); each
        trajectory's mean regret one unit."""
        regrets, gains = {}, {}
        for t, by_epoch in CURVE.items():
            pick = picks_by_t.get(t)
            if pick not in by_epoch:
                continue
            for s in range(2):
                best = max(by_epoch, key=lambda e: (by_epoch[e][1 - s], e))
                # from the stored fractions, as the DB holds them
                regrets.setdefault(t, []).append(100 * (by_epoch[pick][s] / 100 - by_epoch[best][s] / 100))
                gains.setdefault(t, []).append(100 * (by_epoch[pick][s] / 100 - by_epoch[8][s] / 100))

        def text(by_t):
            means = [statistics.mean(v) for v in by_t.values()]
            if not means:
                return EMPTY
            if len(means) == 1:
                return points(means[0])
            return f"{points(statistics.mean(means))} ± {statistics.stdev(means) / math.sqrt(len(means)):.2f}"
        return [", ".join(EMPTY if picks_by_t.get(t) is None else str(picks_by_t[t]) for t in (0, 1)),
                text(regrets), text(gains), str(len(regrets))]

    rows = {r[0]: r[1:] for r in table_rows(section(report, f"## Selection benchmark: {SEL}"))}
    by_key = lambda key: {t: PICKS[t].get(key) for t in (0, 1)}
    tstar = "T* (info, train; tie-aware)"
    assert rows[tstar][:4] == expected(by_key("info@train"))
    assert rows[tstar][:4] == ["6, 6", rows[tstar][1], "+1.31 ± 0.75", "2"]
    assert rows["info, val"][:4] == expected(by_key("info@val"))
    assert rows["NC1, train"][:4] == expected(by_key("nc1@train"))  # epoch 3 taught no student: only trajectory 1
    assert rows["NC1, train"][3] == "1"
    assert rows["p_target, train"][:4] == expected(by_key("p_target@train"))  # no pick on trajectory 1
    assert rows["kNN info, train"][:4] == [f"{EMPTY}, {EMPTY}", EMPTY, EMPTY, "0"]
    assert rows["best val accuracy"][:4] == expected({0: 8, 1: 4})
    assert rows["T^0.5"][:4] == expected({0: 4, 1: 4})
    assert rows["T^full"][:4] == expected({0: 8, 1: 8})
    assert rows["T^full"][2] == "0.00 ± 0.00" and rows["T^full"][4] == "0"
    assert rows[tstar][4] == "5"  # each trajectory's analysis took 5 s (its duration in the database)
    assert rows["proxy (short distillation, val)"][:4] == [f"{EMPTY}, {EMPTY}", EMPTY, EMPTY, "0"]

    plot = study / "plots" / "selection_resnet110-resnet20.png"
    assert str(plot) in result["plots"] and plot.read_bytes()[:8] == PNG
    assert "(plots/selection_resnet110-resnet20.png)" in report
    # the curve's students are not Table 3 columns; T^0.5 and T^full are, from the shared tasks (n = 4 runs)
    assert header_row(report, "## Table 3")[3:] == ["Student (no KD)", "T^0.5", "T^full"]
    cells = table3(report)["resnet110"]
    assert cells[4].strip("*") == summary([a / 100 for a in (CURVE[0][4] + CURVE[1][4])])
    assert cells[5].strip("*") == summary([a / 100 for a in (CURVE[0][8] + CURVE[1][8])])


# ---------------------------------------------------------------- smaller cases

def test_cached_online_and_ensemble_students_are_compared(tmp_path):
    p = "resnet8->mlp"
    st = Study(tmp_path, name="cache", trajectories=1, compare_online=["T0.5"])
    st.pair(p, ["none", "T0.5", "Tfull", "snapshot", "full_ensemble"])
    teacher = st.teacher(p, 0, 0.8)
    cached, online = [0.830, 0.834, 0.826], [0.79, 0.80, 0.81]
    snapshot, full = [0.840, 0.838, 0.845], [0.842, 0.835, 0.841]
    for s in range(3):
        st.student(p, "none", [(0, s)], 0.80 + 0.001 * s)
        st.student(p, "Tfull", [(0, s)], 0.82 + 0.001 * s, depends_on=[teacher], duration=4.0)
        st.student(p, "T0.5", [(0, s)], cached[s], depends_on=[teacher], duration=10.0 + s,
                   cache={"built": int(s == 0), "reused": int(s > 0), "seconds": 1.0})
        st.student(p, "T0.5@online", [(0, s)], online[s], depends_on=[teacher], duration=20.0 + s)
        st.student(p, "snapshot", [(0, s)], snapshot[s], depends_on=[teacher], teacher_epochs=(6, 10, 14),
                   teacher_acc=0.85)
        st.student(p, "full_ensemble", [(0, s)], full[s], depends_on=[teacher], teacher_epochs=(20, 20, 20),
                   teacher_acc=0.87)
    study = st.build()
    result = write_report(study, quiet=True)
    report = (study / "report.md").read_text()
    diff = 100 * (statistics.mean(cached) - statistics.mean(online))
    pooled = 100 * math.sqrt((statistics.stdev(cached) ** 2 + statistics.stdev(online) ** 2) / 2)
    rows = table_rows(section(report, "## Teacher cache"))
    assert rows == [[p, "T^0.5", summary(cached), summary(online), points(diff), points(diff / pooled),
                     "3 of 3 (sign test p = 0.25)", "no", "11.0", "21.0"]]  # 3 wins, 0 losses: 2 * (1/2)^3
    assert "T^0.5 (online)" not in section(report, "## Table 3")
    assert header_row(report, "## Table 3")[3:] == ["Student (no KD)", "T^0.5", "T^full"]
    assert "online" not in " ".join(r[1] for r in table_rows(section(report, "## Comparisons")))

    # the snapshot ensemble against the full ensemble: its own table, a paired comparison and a sentence
    rows = table_rows(section(report, "## Full ensemble vs snapshot ensemble"))
    snap_diff = 100 * (statistics.mean(snapshot) - statistics.mean(full))
    assert rows == [[p, "85.00", f"**{summary(snapshot)}**", "87.00", summary(full), points(snap_diff), "2 of 3"]]
    compared = {r[1]: r[2:] for r in table_rows(section(report, "## Comparisons"))}
    diffs = [100 * (a - b) for a, b in zip(snapshot, full)]
    # one trajectory: one unit at the trajectory level, and the seeds as units within it
    assert compared["snapshot ensemble − full ensemble"][:2] == ["1 trajectory", points(statistics.mean(diffs))]
    assert compared["snapshot ensemble − full ensemble"][5:8] == ["1", "2 / 0 / 1", "inconclusive (design cannot "
                                                                   "resolve: 1 trajectory, smallest attainable p = 1)"]
    assert "within that one trajectory (3 seeds, conditional on its teacher)" in report
    # T^0.5 beats T^full on all 3 students of the one trajectory: nothing can be concluded across teachers
    assert result["verdicts"] == {p: "inconclusive (design cannot resolve: 1 trajectory, smallest attainable p = 1)"}
    t05 = compared["T^0.5 − T^full"]
    assert t05[:2] == ["1 trajectory", "+0.90"] and t05[3:6] == ["1", "1", "1"]


def test_single_seed_cells_have_no_std(tmp_path):
    p = "resnet8->mlp"
    st = Study(tmp_path, name="single", seeds=(0,), trajectories=1)
    st.pair(p, ["none", "T0.5", "Tfull"])
    teacher = st.teacher(p, 0, 0.88)
    for v, acc in (("none", 0.8), ("T0.5", 0.83), ("Tfull", 0.82)):
        st.student(p, v, [(0, 0)], acc, depends_on=[] if v == "none" else [teacher])
    study = st.build()
    result = write_report(study, quiet=True)
    report = (study / "report.md").read_text()
    cells = table3(report)["resnet8"]
    assert [c.strip("*") for c in cells[2:]] == ["88.00", "80.00 (n=1)", "83.00 (n=1)", "82.00 (n=1)"]
    assert "±" not in " ".join(cells)
    gate = next(r for r in table_rows(section(report, "## Comparisons")) if r[1].endswith("(gate)"))
    assert gate[2:] == ["1 trajectory", "+2.00", EMPTY, "1", EMPTY, "1", "1 / 0 / 0", "gate"]
    assert result["verdicts"] == {p: "inconclusive (design cannot resolve: 1 trajectory, smallest attainable p = 1)"}


def test_study_with_nothing_complete(tmp_path):
    st = Study(tmp_path, name="new", seeds=(0, 1), trajectories=1)
    st.pair("a->b", ["none", "Tfull"])
    st.teacher("a->b", 0, 0.8, outcome="pending")
    study = st.build()
    result = write_report(study, quiet=True)
    report = (study / "report.md").read_text()
    assert table3(report)["a"] == ["a", "b", EMPTY, EMPTY, EMPTY]
    assert "**1 of 1 runs are not complete** (1 pending)" in report
    assert "a->b: the teacher of trajectory 0 has not been analysed yet." in report
    assert "- `a-t0` (train, pending, attempts: 0)" in section(report, "## Runs not complete")
    assert result["verdicts"] == {"a->b": "inconclusive (no no-KD and T^full students to compare)"}


def test_not_a_study(tmp_path):
    with pytest.raises(UserError, match="study folder not found"):
        write_report(tmp_path / "missing")
    with pytest.raises(UserError, match="not a ckptkd study"):
        write_report(tmp_path)
    (tmp_path / "study.yaml").write_text("name: x\n")
    with pytest.raises(UserError, match="not a ckptkd study"):
        write_report(tmp_path)


def test_a_two_seed_study_claims_nothing_it_cannot_and_says_when_t_star_is_t_full(tmp_path):
    """One trajectory and two seeds: nothing is confirmed or refuted, whatever the students did; T* picked the last
    checkpoint, so its students are T^full's very runs, which the findings say in words."""
    p = "resnet8->mlp"
    st = Study(tmp_path, name="two-seeds", seeds=(0, 1), trajectories=1)
    st.pair(p, ["none", "T0.3", "T0.5", "Tfull", "Tstar"])
    teacher = st.teacher(p, 0, 0.9)
    for s in range(2):
        st.student(p, "none", [(0, s)], 0.80 + 0.001 * s)
        st.student(p, "T0.3", [(0, s)], 0.86 + 0.001 * s, depends_on=[teacher], teacher_epochs=(6,))
        st.student(p, "T0.5", [(0, s)], 0.84 + 0.001 * s, depends_on=[teacher])
        st.student(p, "Tfull", [(0, s)], 0.83 + 0.001 * s, depends_on=[teacher], also=[["Tstar", 0, s]],
                   teacher_epochs=(20,))
    study = st.build()
    result = write_report(study, quiet=True)
    report = (study / "report.md").read_text()
    said = section(report, "## Findings") + section(report, "## Comparisons")
    assert "refuted" not in said and "confirmed" not in said
    assert result["verdicts"] == {p: "inconclusive (design cannot resolve: 1 trajectory, smallest attainable p = 1)"}
    assert ("T* is T^full on every trajectory (the criterion picked the last checkpoint), so their students are the "
            "very same runs") in section(report, "## Findings")
    compared = {r[1]: r[2:] for r in table_rows(section(report, "## Comparisons"))}
    assert compared["T* − T^full"][1] == "0.00" and compared["T* − T^full"][-1] == "the same runs"
    assert compared["T^0.3 − T^full"][-1].startswith("inconclusive (design cannot resolve: 1 trajectory")


def test_top5_and_the_papers_metric_are_reported_beside_top1_where_the_runs_recorded_them(main, tmp_path):
    """A second Table 3 in top-5 (the last-k mean, as top-1) and a third in the paper's best-of-the-last-N, labelled
    as selecting on test, their cells from the students' own values; neither where no run recorded them (the main
    study: its students predate them); results.csv carries the columns."""
    _, _, report, _ = main
    assert "Table 3, top-5" not in report and "paper's own metric" not in report
    st = Study(tmp_path, name="top5", seeds=(0, 1), trajectories=2)
    p = "wrn40->resnet8"
    st.pair(p, ["none", "Tfull"])
    top5 = {"none": {0: 0.91, 1: 0.93}, "Tfull": {(0, 0): 0.95, (0, 1): 0.96, (1, 0): 0.94, (1, 1): 0.99}}
    teachers = [st.teacher(p, t, 0.8, top5=0.97 + 0.01 * t) for t in range(2)]
    paper = {"none": {0: 0.72, 1: 0.73}, "Tfull": {(0, 0): 0.77, (0, 1): 0.78, (1, 0): 0.76, (1, 1): 0.79}}
    for s in range(2):
        st.student(p, "none", [(t, s) for t in range(2)], 0.7 + 0.01 * s, top5=top5["none"][s],
                   paper=paper["none"][s])
        for t in range(2):
            st.student(p, "Tfull", [(t, s)], 0.75, top5=top5["Tfull"][(t, s)], depends_on=[teachers[t]],
                       paper=paper["Tfull"][(t, s)])
    study = st.build()
    write_report(study, console=Console(file=io.StringIO()))
    text = (study / "report.md").read_text(encoding="utf-8")
    top5_section = section(text, "The same students in top-5").split("The same students in the paper")[0]
    rows = {r[0]: r for r in table_rows(top5_section)}
    assert rows["wrn40"][2] == summary([0.97, 0.98])
    assert [c.strip("*") for c in rows["wrn40"][3:]] == [summary(top5["none"].values()),
                                                          summary(top5["Tfull"].values())]
    assert rows["wrn40"][4].startswith("**")  # the better top-5 in bold
    assert "Teacher top-5" in top5_section
    paper_rows = {r[0]: r for r in table_rows(section(text, "The same students in the paper's own metric"))}
    assert [c.strip("*") for c in paper_rows["wrn40"][3:]] == [summary(paper["none"].values()),
                                                                summary(paper["Tfull"].values())]
    assert paper_rows["wrn40"][2] == summary([0.8, 0.8])  # the teachers' own accuracy (top-1)
    assert "picks an epoch by its test accuracy" in text and "never used for a claim" in text
    csv_rows = list(csv.DictReader(io.StringIO((study / "results.csv").read_text())))
    student = next(r for r in csv_rows if r["run_id"] == f"{p}-Tfull-t1s1")
    assert float(student["test_top5_last_k"]) == 0.99 and float(student["test_top5"]) == 0.992
    assert float(student["test_acc_best_of_last"]) == 0.79
