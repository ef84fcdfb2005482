"""The study report's model on its own: `build` from database rows written here by hand (no database, no files),
checked against numbers computed here (itertools/statistics, never the report's helpers): the paired comparisons,
Holm's correction, the gate and the verdicts, the selection benchmark's regrets, the table cells' counts, the
carry-over merge and report.json's round trip."""

import itertools
import json
import statistics

import pytest

from ckptkd.study.report import build
from ckptkd.study.report.comparisons import Comparison
from ckptkd.study.report.report_json import to_json
from ckptkd.study.report.trajectories import Trajectory, TrajectorySummary
from ckptkd.study.report.verdicts import claim

CELLS = [(t, s) for t in range(3) for s in range(3)]


def exact_p(diffs) -> float:
    """Two-sided sign-flip p over every sign assignment."""
    observed = abs(statistics.mean(diffs))
    flips = [abs(statistics.mean(sign * d for sign, d in zip(signs, diffs)))
             for signs in itertools.product((1, -1), repeat=len(diffs))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def holm(pvalues: dict) -> dict:
    keys = sorted(pvalues, key=pvalues.get)
    out, running = {}, 0.0
    for i, k in enumerate(keys):
        running = max(running, min(1.0, (len(keys) - i) * pvalues[k]))
        out[k] = running
    return out


class Rows:
    """A study's config and database rows as `ResultsDB.rows()` gives them, written by hand."""

    def __init__(self):
        self.config = {"name": "model", "ensemble_size": 3, "pairs": []}
        self.rows = []

    def pair(self, name, variants, epochs=20):
        teacher, student = name.split("->")
        self.config["pairs"].append({"name": name, "variants": list(variants),
                                     "teacher": {"model": {"name": teacher}, "data": {"name": "cifar100"},
                                                 "schedule": {"epochs": epochs}},
                                     "student": {"model": {"name": student}}})

    def add(self, run_id, kind, group, metrics=None, status="complete", error=None):
        complete = status == "complete"
        self.rows.append({"run_id": run_id, "kind": kind, "name": run_id, "status": status, "path": f"runs/{run_id}",
                          "group": group, "metrics": metrics if complete else None,
                          "timings": {"duration_s": 2.0} if complete else None, "attempts": 1, "claimer": "w0",
                          "error": error, "depends_on": []})

    def teacher(self, pair, t, acc):
        self.add(f"{pair}-teacher-t{t}", "train", {"pair": pair, "pairs": [pair], "role": "teacher",
                                                    "teacher_seed": t}, {"test_acc": acc})

    def analysis(self, pair, t, metrics):
        self.add(f"{pair}-analysis-t{t}", "analyze", {"pair": pair, "pairs": [pair], "role": "analysis",
                                                       "teacher_seed": t}, metrics)

    def student(self, pair, variant, cells, acc, *, status="complete", run_id=None, flags=()):
        t, s = cells[0]
        self.add(run_id or f"{pair}-{variant}-t{t}s{s}", "distill",
                 {"pair": pair, "role": "student", "variant": variant, "seed": s, "teacher_seed": t,
                  "pairs": [pair], "serves": [[pair, variant, u, v] for u, v in cells]},
                 {"test_acc": acc, "test_acc_last_k": acc,
                  "health": {"ok": not flags, "flags": [{"flag": f, "epoch": 3, "detail": "x"} for f in flags]}},
                 status=status)

    def build(self, trajectories=None):
        return build(self.config, self.rows, {}, trajectories or {})


def design(rows, pair, none, shifts):
    """Students of a pair: no KD by seed (one run serving every trajectory), each other variant by (t, s) as
    none[s] + shifts[variant][(t, s)] (in fractions)."""
    rows.pair(pair, ["none"] + list(shifts))
    for t in range(3):
        rows.teacher(pair, t, 0.75)
    for s in range(3):
        rows.student(pair, "none", [(t, s) for t in range(3)], none[s])
    for variant, shift in shifts.items():
        for t, s in CELLS:
            rows.student(pair, variant, [(t, s)], none[s] + shift[(t, s)])


NONE = [0.70, 0.71, 0.69]
GAIN = {(t, s): 0.02 + 0.001 * t - 0.0005 * s for t, s in CELLS}          # T^full − no KD: +1.9 to +2.2 points
UP = {k: GAIN[k] + 0.01 + 0.0002 * (k[0] + k[1]) for k in CELLS}         # 1.0 to 1.08 points above T^full
DOWN = {k: GAIN[k] - 0.008 - 0.0003 * k[1] for k in CELLS}               # 0.8 to 0.86 points below
MIXED = {k: GAIN[k] + (0.03 if (k[0] + k[1]) % 2 else -0.025) for k in CELLS}  # +3 or −2.5 points: no verdict


def test_comparisons_pair_students_by_trajectory_and_seed():
    rows = Rows()
    design(rows, "a->b", NONE, {"Tfull": GAIN, "T0.5": UP})
    rows.rows = [r for r in rows.rows if r["run_id"] != "a->b-T0.5-t2s1"]  # one cell missing
    pair = rows.build().pairs[0]
    gate = pair.comparisons["gate"]
    assert (gate.a, gate.b) == ("Tfull", "none")
    # no KD's seed-s run pairs with T^full's student of (t, s) for every trajectory t
    assert gate.diffs == pytest.approx({k: GAIN[k] for k in CELLS})
    assert gate.mean == pytest.approx(100 * statistics.mean(GAIN.values()))
    assert gate.p == pytest.approx(exact_p(list(gate.diffs.values())))
    assert gate.signs == (9, 0, 0) and gate.holm is None
    low, high = gate.ci_points
    assert 100 * min(GAIN.values()) - 1e-9 <= low <= gate.mean <= high <= 100 * max(GAIN.values()) + 1e-9
    middle = pair.comparisons["T0.5"]
    assert (middle.a, middle.b) == ("T0.5", "Tfull")
    assert sorted(middle.diffs) == [k for k in CELLS if k != (2, 1)]  # only cells both variants have
    assert middle.diffs == pytest.approx({k: UP[k] - GAIN[k] for k in CELLS if k != (2, 1)})
    assert list(pair.comparisons) == ["gate", "T0.5"]


def test_intermediate_teachers_share_one_holm_correction():
    rows = Rows()
    design(rows, "a->b", NONE, {"Tfull": GAIN, "T0.3": DOWN, "T0.5": UP, "T0.7": MIXED, "Tstar": UP})
    pair = rows.build().pairs[0]
    raw = {v: exact_p([shift[k] - GAIN[k] for k in CELLS]) for v, shift in (("T0.3", DOWN), ("T0.5", UP),
                                                                            ("T0.7", MIXED))}
    adjusted = holm(raw)
    assert raw["T0.5"] == pytest.approx(2 / 512)
    for v in raw:
        assert pair.comparisons[v].p == pytest.approx(raw[v])
        assert pair.comparisons[v].holm == pytest.approx(adjusted[v])
    assert pair.comparisons["T0.5"].holm == pytest.approx(3 * 2 / 512)
    # T* is compared with T^full on its own: no correction
    assert pair.comparisons["Tstar"].holm is None and pair.comparisons["Tstar"].p == pytest.approx(2 / 512)
    assert list(pair.comparisons) == ["gate", "T0.3", "T0.5", "T0.7", "Tstar"]


def test_verdicts():
    rows = Rows()
    design(rows, "confirmed->x", NONE, {"Tfull": GAIN, "T0.3": DOWN, "T0.5": UP, "T0.7": MIXED, "Tstar": DOWN})
    design(rows, "refuted->x", NONE, {"Tfull": GAIN, "T0.3": DOWN, "T0.5": DOWN})
    design(rows, "open->x", NONE, {"Tfull": GAIN, "T0.3": DOWN, "T0.5": MIXED})
    small = {k: 0.003 + 0.0002 * k[1] for k in CELLS}  # KD gains 0.3 to 0.34 points: above 0, below the gate
    design(rows, "nokd->x", NONE, {"Tfull": small, "T0.5": UP})
    design(rows, "nobase->x", NONE, {"Tfull": GAIN, "T0.5": UP})
    rows.rows = [r for r in rows.rows if (r["group"]["pair"], r["group"].get("variant")) != ("nobase->x", "none")]
    rows.config["pairs"][-1]["variants"].remove("none")
    report = rows.build()
    findings = {p.name: p.finding for p in report.pairs}
    assert {name: f.verdict for name, f in findings.items()} == {
        "confirmed->x": "confirmed", "refuted->x": "refuted at this scale", "open->x": "inconclusive",
        "nokd->x": "inconclusive", "nobase->x": "inconclusive"}
    assert [f.gate for f in findings.values()] == ["passed", "passed", "passed", "failed", "missing"]
    confirmed = findings["confirmed->x"]
    assert confirmed.intermediate == ["T0.3", "T0.5", "T0.7"] and confirmed.winners == ["T0.5"]
    assert confirmed.best == "T0.5"
    assert confirmed.claims == {"T0.3": "refuted at this scale", "T0.5": "confirmed", "T0.7": "inconclusive",
                                "Tstar": "refuted at this scale"}
    assert confirmed.also == [("Tstar", "T*")]
    # a failed gate ranks nothing, whatever the intermediate teachers did
    assert findings["nokd->x"].intermediate == [] and findings["nokd->x"].claims == {}
    assert findings["open->x"].claims == {"T0.3": "refuted at this scale", "T0.5": "inconclusive"}


def test_the_gate_needs_half_a_point_with_the_interval_above_zero():
    def gate(gains):
        rows = Rows()
        design(rows, "a->b", NONE, {"Tfull": gains, "T0.5": UP})
        pair = rows.build().pairs[0]
        return pair.finding.gate, pair.comparisons["gate"]

    assert gate({k: 0.0051 + 0.0001 * k[1] for k in CELLS})[0] == "passed"    # 0.51 to 0.53 points
    assert gate({k: 0.0045 + 0.0001 * k[1] for k in CELLS})[0] == "failed"    # CI above 0, mean below 0.5
    assert gate({k: -0.01 for k in CELLS})[0] == "failed"
    # +5 points on 4 pairs, −3 on 5: a mean of +0.56 points, but an interval reaching below 0
    verdict, comparison = gate({k: 0.05 if (k[0] + k[1]) % 2 else -0.03 for k in CELLS})
    assert comparison.mean == pytest.approx(100 * (4 * 0.05 - 5 * 0.03) / 9) and comparison.ci_points[0] < 0
    assert verdict == "failed"


def test_claim_words():
    def c(mean, low, high, p, holm=None):
        return Comparison("a", "b", {(0, 0): mean / 100, (0, 1): mean / 100}, (low / 100, high / 100), p, holm)

    assert claim(c(1.0, 0.2, 1.8, 0.01)) == "confirmed"
    assert claim(c(1.0, 0.2, 1.8, 0.01, holm=0.06)) == "inconclusive"  # the adjusted p decides where there is one
    assert claim(c(1.0, -0.1, 1.8, 0.01)) == "inconclusive"
    assert claim(c(-1.0, -1.8, 0.4, 0.01)) == "refuted at this scale"
    assert claim(c(0.0, -0.6, 0.6, 0.9)) == "inconclusive"
    assert claim(Comparison("a", "b", {}, None, 1.0)) == "inconclusive"


def test_cell_counts_and_the_average_row():
    rows = Rows()
    rows.pair("a->b", ["none", "T0.5", "Tfull"])
    rows.pair("c->d", ["none", "Tfull"])
    for t in range(2):
        rows.teacher("a->b", t, 0.8 + 0.01 * t)
    for s in range(3):
        rows.student("a->b", "none", [(0, s), (1, s)], 0.7 + 0.01 * s)   # one run, two cells
        rows.student("c->d", "none", [(0, s)], 0.6)
        rows.student("c->d", "Tfull", [(0, s)], 0.62)
    rows.student("a->b", "T0.5", [(0, 0)], 0.75, flags=["loss_rising"])
    rows.student("a->b", "T0.5", [(0, 1)], 0.76)
    rows.student("a->b", "T0.5", [(0, 2)], 0.0, status="failed")
    rows.student("a->b", "T0.5", [(1, 0)], 0.0, status="pending")
    report = rows.build()
    a, c = report.pairs
    assert a.cell("none").values == pytest.approx([0.7, 0.71, 0.72]) and a.cell("none").planned == 3
    assert a.cell("T0.5").values == [0.75, 0.76] and a.cell("T0.5").planned == 4 and a.cell("T0.5").flagged == 1
    assert a.cell("Tfull").values == [] and a.cell("Tfull").planned is None
    assert a.teacher.values == [0.8, 0.81]
    assert report.table3.columns == ["none", "T0.5", "Tfull"]
    averages = report.table3.averages
    assert averages[0] is None  # pair c->d has no teacher accuracy
    assert averages[1] == pytest.approx(statistics.mean([statistics.mean([0.7, 0.71, 0.72]), 0.6]))
    assert averages[2] is None and averages[3] is None  # a column some pair lacks has no average
    assert report.header.status == {"complete": 13, "pending": 1, "running": 0, "failed": 1}
    assert [u.name for u in report.unfinished] == ["a->b-T0.5-t0s2", "a->b-T0.5-t1s0"]
    assert [(f.name, f.what) for f in report.health.flagged] == [("a->b-T0.5-t0s0", "T0.5")]


def test_selection_benchmark_regrets_and_gains():
    # student accuracy by trajectory, teacher epoch, seed (dyadic, so every mean and difference is exact)
    curve = {0: {2: [0.5, 0.5], 4: [0.625, 0.75], 6: [0.5625, 0.6875]},
             1: {2: [0.5, 0.5], 4: [0.25, 0.75], 6: [0.375, 0.5]}}   # t1: epochs 2 and 4 tie; the later wins
    best = {0: 4, 1: 4}
    rows = Rows()
    rows.pair("a->b", ["none"] + [f"epoch{e}" for e in (2, 4, 6)], epochs=6)
    picks = {0: {"info@train": 6, "nc1@train": 5}, 1: {"info@train": 2}}
    val = {0: {2: 0.4, 4: 0.6, 6: 0.6}, 1: {2: 0.7, 4: 0.5, 6: 0.6}}  # best val: 6 (the later of a tie), 2
    for t in (0, 1):
        rows.analysis("a->b", t, {"picks": {k: {"t_star": e} for k, e in picks[t].items()},
                                  "trajectory": [{"epoch": e, "val_acc": v} for e, v in val[t].items()]})
        for e, accs in curve[t].items():
            for s, acc in enumerate(accs):
                rows.student("a->b", f"epoch{e}", [(t, s)], acc)
    benchmark = rows.build().pairs[0].selection
    assert benchmark.curve == {t: {e: dict(enumerate(a)) for e, a in by_e.items()} for t, by_e in curve.items()}
    selectors = {s.key: s for s in benchmark.selectors}

    def expected(chosen):
        regrets, gains = [], []
        for t, e in chosen.items():
            if e in curve[t]:
                regrets += [100 * (curve[t][e][s] - curve[t][best[t]][s]) for s in (0, 1)]
                gains += [100 * (curve[t][e][s] - curve[t][6][s]) for s in (0, 1)]
        return regrets, gains

    for key, chosen in (("info@train", {0: 6, 1: 2}), ("nc1@train", {0: 5, 1: None}), ("best-val", {0: 6, 1: 2}),
                        ("T0.5", {0: 3, 1: 3}), ("Tfull", {0: 6, 1: 6}), ("info@val", {0: None, 1: None})):
        assert selectors[key].picks == chosen, key
        assert (selectors[key].regrets, selectors[key].gains) == expected(chosen), key
    # by hand: info@train picks T^full's epoch on t0 (6.25 points below the best, epoch 4, for both seeds) and
    # epoch 2 on t1 (best: epoch 4, tied with 2 and later)
    assert selectors["info@train"].regrets == [-6.25, -6.25, 25.0, -25.0]
    assert selectors["info@train"].gains == [0.0, 0.0, 12.5, 0.0]
    assert selectors["Tfull"].regret == (-6.25, pytest.approx(statistics.stdev([-6.25, -6.25, 12.5, -25.0]) / 2))
    assert selectors["T0.5"].regrets == [] and selectors["T0.5"].regret is None  # epoch 3 taught no student


def test_ensemble_and_cache_comparisons_keep_their_direction():
    rows = Rows()
    rows.pair("a->b", ["none", "T0.5", "snapshot", "full_ensemble"])
    for s, (snap, full, cached, online) in enumerate([(0.80, 0.78, 0.70, 0.69), (0.81, 0.79, 0.71, 0.70),
                                                      (0.79, 0.80, 0.72, 0.70)]):
        rows.student("a->b", "snapshot", [(0, s)], snap)
        rows.student("a->b", "full_ensemble", [(0, s)], full)
        rows.student("a->b", "T0.5", [(0, s)], cached)
        rows.student("a->b", "T0.5@online", [(0, s)], online)
    report = rows.build()
    pair = report.pairs[0]
    assert report.online == ["T0.5@online"] and "T0.5@online" not in pair.variants
    e = pair.ensemble
    assert e.difference == pytest.approx(statistics.mean([0.80, 0.81, 0.79]) - statistics.mean([0.78, 0.79, 0.80]))
    assert e.snapshot_wins == 2 and len(e.diffs) == 3
    assert pair.comparisons["snapshot"].a == "snapshot" and pair.comparisons["snapshot"].signs == (2, 0, 1)
    (c,) = pair.cache
    assert (c.variant, c.base) == ("T0.5@online", "T0.5")
    assert c.difference == pytest.approx(statistics.mean([0.70, 0.71, 0.72]) - statistics.mean([0.69, 0.70, 0.70]))
    pooled = ((statistics.stdev([0.70, 0.71, 0.72]) ** 2 + statistics.stdev([0.69, 0.70, 0.70]) ** 2) / 2) ** 0.5
    assert c.pooled_std == pytest.approx(pooled)
    assert c.sign_p == pytest.approx(0.25)  # 3 wins, 0 losses: 2 * (1/2)^3


def summary_metrics(selected):
    return {"selected_epoch": selected, "ties": [selected], "criterion": "info@train", "split": "train",
            "agreement": {"spearman_i_xf": 0.9, "spearman_i_yf": None, "spearman_score": 0.8},
            "trajectory": [{"epoch": e, "fraction": e / 20, "val_acc": 0.5, "train_acc": None, "test_acc": None,
                            "confidence": 0.4, "i_xf": [1.0 + e, 0.01], "i_yf": [None, None], "score": [e / 25, None]}
                           for e in (10, 20)]}


def test_trajectories_from_the_database_the_run_folders_or_carried_over(tmp_path, monkeypatch):
    rows = Rows()
    rows.pair("a->b", ["none"])
    for t in range(4):
        rows.teacher("a->b", t, 0.8)
    rows.analysis("a->b", 0, summary_metrics(10))                           # the database has the summary
    rows.analysis("a->b", 1, {"selected_epoch": 20, "analysis": "x.json"})  # an old row: only T*
    rows.analysis("a->b", 2, {"selected_epoch": 20, "analysis": "y.json"})
    rows.add("a->b-analysis-t3", "analyze", {"pair": "a->b", "pairs": ["a->b"], "role": "analysis",
                                             "teacher_seed": 3}, status="pending")
    monkeypatch.chdir(tmp_path)  # build reads no file: none is here, and opening one fails
    for where in ("builtins.open", "io.open"):
        monkeypatch.setattr(where, lambda *a, **k: pytest.fail("build opened a file"))
    report = rows.build({"a->b-analysis-t1": summary_metrics(20)})
    monkeypatch.undo()
    trajectories = report.pairs[0].trajectories
    assert [(t.number, t.path, t.carried) for t in trajectories] == [
        (0, "runs/a->b-analysis-t0", False), (1, "runs/a->b-analysis-t1", False),
        (2, "runs/a->b-analysis-t2", False), (3, None, False)]
    assert trajectories[0].summary == TrajectorySummary.from_metrics(summary_metrics(10))
    assert trajectories[1].summary.selected_epoch == 20 and trajectories[1].summary.rows[1].i_xf == (21.0, 0.01)
    assert trajectories[2].summary is None and trajectories[3].summary is None

    # the previous report's summaries fill only what could not be rebuilt, marked carried
    old = TrajectorySummary.from_metrics(summary_metrics(20))
    previous = {("a->b", t): Trajectory(t, f"runs/old-{t}", old) for t in range(4)}
    previous[("other->pair", 2)] = Trajectory(2, "runs/x", old)
    carried = report.carry_over(previous)
    assert [(t.number, t.path, t.carried) for t in carried] == [(2, "runs/old-2", True), (3, "runs/old-3", True)]
    assert trajectories[0].summary.selected_epoch == 10 and not trajectories[0].carried

    # report.json holds them as they are, and gives them back
    saved = json.loads(json.dumps(to_json(report)))
    back = [Trajectory.from_json(t) for t in saved["pairs"][0]["trajectories"]]
    assert back == trajectories


def test_report_json_reads_back_under_its_seal(tmp_path):
    """Integer keys (teacher epochs 2 and 10 sort one way as numbers, the other as strings) must not break the
    checksum when the file is read back."""
    from ckptkd.run.storage import write_sealed_json
    from ckptkd.study.report.report_json import read_trajectories

    rows = Rows()
    rows.pair("a->b", ["epoch2", "epoch10"], epochs=10)
    rows.analysis("a->b", 0, summary_metrics(10))
    for e in (2, 10):
        rows.student("a->b", f"epoch{e}", [(0, 0)], 0.5 + e / 100)
    report = rows.build()
    assert sorted(report.pairs[0].selection.curve[0]) == [2, 10]
    write_sealed_json(tmp_path / "report.json", to_json(report))
    assert read_trajectories(tmp_path / "report.json") == {("a->b", 0): report.pairs[0].trajectories[0]}
