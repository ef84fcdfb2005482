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


def design(rows, pair, none, shifts, trajectories=3):
    """Students of a pair: no KD by seed (one run serving every trajectory), each other variant by (t, s) as
    none[s] + shifts[variant][(t, s)] (in fractions)."""
    rows.pair(pair, ["none"] + list(shifts))
    for t in range(trajectories):
        rows.teacher(pair, t, 0.75)
    for s in range(3):
        rows.student(pair, "none", [(t, s) for t in range(trajectories)], none[s])
    for variant, shift in shifts.items():
        for t in range(trajectories):
            for s in range(3):
                rows.student(pair, variant, [(t, s)], none[s] + shift(t, s))


def t975(df: float) -> float:
    from scipy import stats as scipy_stats

    return float(scipy_stats.t.ppf(0.975, df))


def welch(a, b):
    """mean(a) - mean(b) with its Welch interval, computed here (scipy's t quantile)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    mean = statistics.mean(a) - statistics.mean(b)
    half = t975(df) * (va + vb) ** 0.5
    return mean, (mean - half, mean + half)


def exact_permutation_p(a, b) -> float:
    pooled, observed = list(a) + list(b), abs(statistics.mean(a) - statistics.mean(b))
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    extreme = sum(abs(statistics.mean([pooled[i] for i in g]) - statistics.mean(
        [pooled[i] for i in range(len(pooled)) if i not in g])) >= observed - 1e-12 for g in splits)
    return extreme / len(splits)


NONE = [0.700, 0.701, 0.699]                                        # no KD: three runs within 0.1 points
GAIN = lambda t, s: 0.02 + 0.001 * t - 0.0005 * s                     # T^full − no KD: about +2 points
UP = lambda t, s: GAIN(t, s) + 0.01 + 0.0002 * (t + s)               # 1.0 to 1.2 points above T^full
DOWN = lambda t, s: GAIN(t, s) - 0.008 - 0.0003 * s                  # 0.8 to 0.86 points below
MIXED = lambda t, s: GAIN(t, s) + (0.03 if (t + s) % 2 else -0.025)  # +3 or −2.5 points: nothing settled


def test_comparisons_are_made_at_the_independent_unit():
    """A variant of the trajectory against one that serves every trajectory (no KD): its trajectory means against
    the runs, each counted once; two variants of the trajectory: one difference per trajectory. The paired students
    are kept for wins and losses, never as units."""
    rows = Rows()
    design(rows, "a->b", NONE, {"Tfull": GAIN, "T0.5": UP})
    rows.rows = [r for r in rows.rows if r["run_id"] != "a->b-T0.5-t2s1"]  # one cell missing
    pair = rows.build().pairs[0]
    gate = pair.comparisons["gate"]
    assert (gate.a, gate.b) == ("Tfull", "none")
    assert gate.diffs == pytest.approx({(t, s): GAIN(t, s) for t, s in CELLS}) and gate.signs == (9, 0, 0)
    means = [statistics.mean(NONE[s] + GAIN(t, s) for s in range(3)) for t in range(3)]
    mean, ci = welch(means, NONE)
    e = gate.estimate
    assert (e.design, e.unit, e.n) == ("two-sample", "trajectory | run", (3, 3))
    assert e.mean == pytest.approx(mean) and e.ci == pytest.approx(ci)
    assert e.p == pytest.approx(exact_permutation_p(means, NONE)) and e.min_p == pytest.approx(2 / 20)
    middle = pair.comparisons["T0.5"]
    assert (middle.a, middle.b) == ("T0.5", "Tfull")
    assert sorted(middle.diffs) == [k for k in CELLS if k != (2, 1)]  # only cells both variants have
    units = [statistics.mean(UP(t, s) - GAIN(t, s) for s in range(3) if (t, s) != (2, 1)) for t in range(3)]
    e = middle.estimate
    assert (e.design, e.unit, e.n, e.df) == ("paired", "trajectory", 3, 2)
    assert e.mean == pytest.approx(statistics.mean(units))
    half = t975(2) * statistics.stdev(units) / 3 ** 0.5
    assert e.ci == pytest.approx((e.mean - half, e.mean + half))
    assert e.p == pytest.approx(exact_p(units)) == 0.25 and e.min_p == 0.25  # 3 units: 2 / 2^3 at best
    assert list(pair.comparisons) == ["gate", "T0.5"]


def test_a_variant_of_one_trajectory_is_compared_within_it_too():
    rows = Rows()
    design(rows, "a->b", NONE, {"Tfull": GAIN, "T0.5": UP}, trajectories=1)
    c = rows.build().pairs[0].comparisons["T0.5"]
    assert c.estimate.n == 1 and c.estimate.ci is None and c.min_p == 1.0
    within = [UP(0, s) - GAIN(0, s) for s in range(3)]
    assert c.within.unit == "seed within trajectory 0" and c.within.n == 3
    assert c.within.mean == pytest.approx(statistics.mean(within)) and c.within.p == pytest.approx(exact_p(within))


def test_intermediate_teachers_share_one_holm_correction():
    rows = Rows()
    design(rows, "a->b", NONE, {"Tfull": GAIN, "T0.3": DOWN, "T0.5": UP, "T0.7": MIXED, "Tstar": UP},
           trajectories=7)
    pair = rows.build().pairs[0]
    units = lambda shift: [statistics.mean(shift(t, s) - GAIN(t, s) for s in range(3)) for t in range(7)]
    raw = {v: exact_p(units(shift)) for v, shift in (("T0.3", DOWN), ("T0.5", UP), ("T0.7", MIXED))}
    adjusted = holm(raw)
    assert raw["T0.5"] == pytest.approx(2 / 128)
    for v in raw:
        assert pair.comparisons[v].p == pytest.approx(raw[v])
        assert pair.comparisons[v].holm == pytest.approx(adjusted[v])
        assert pair.comparisons[v].min_p == pytest.approx(3 * 2 / 128)  # Holm's first step: 3 times the least p
    assert pair.comparisons["T0.5"].holm == pytest.approx(3 * 2 / 128)
    # T* is compared with T^full on its own: no correction
    assert pair.comparisons["Tstar"].holm is None and pair.comparisons["Tstar"].p == pytest.approx(2 / 128)
    assert list(pair.comparisons) == ["gate", "T0.3", "T0.5", "T0.7", "Tstar"]


def test_verdicts():
    rows = Rows()
    design(rows, "confirmed->x", NONE, {"Tfull": GAIN, "T0.3": DOWN, "T0.5": UP, "T0.7": MIXED, "Tstar": DOWN},
           trajectories=7)
    design(rows, "equivalent->x", NONE, {"Tfull": GAIN, "T0.3": DOWN, "T0.5": DOWN}, trajectories=7)
    design(rows, "open->x", NONE, {"Tfull": GAIN, "T0.3": DOWN, "T0.5": MIXED}, trajectories=7)
    design(rows, "unresolvable->x", NONE, {"Tfull": GAIN, "T0.3": UP, "T0.5": UP})  # 3 trajectories
    small = lambda t, s: 0.003 + 0.0002 * s  # KD gains 0.3 to 0.34 points: interval above 0, below the gate
    design(rows, "below->x", NONE, {"Tfull": small, "T0.5": UP}, trajectories=7)
    design(rows, "nobase->x", NONE, {"Tfull": GAIN, "T0.5": UP})
    rows.rows = [r for r in rows.rows if (r["group"]["pair"], r["group"].get("variant")) != ("nobase->x", "none")]
    rows.config["pairs"][-1]["variants"].remove("none")
    report = rows.build()
    findings = {p.name: p.finding for p in report.pairs}
    cannot = "design cannot resolve: 3 trajectories, smallest attainable p = 0.5 after Holm's correction over 2"
    assert {name: str(f.verdict) for name, f in findings.items()} == {
        "confirmed->x": "confirmed", "equivalent->x": "no gain larger than 0.3 points",
        "open->x": "inconclusive (no intermediate teacher is confirmed, and a gain of 0.3 points is not ruled out "
                   "for all)",
        "unresolvable->x": f"inconclusive ({cannot})",
        "below->x": "inconclusive (KD helped by less than the 0.5-point gate)",
        "nobase->x": "inconclusive (no no-KD and T^full students to compare)"}
    assert [f.gate for f in findings.values()] == ["passed", "passed", "passed", "passed", "below", "missing"]
    confirmed = findings["confirmed->x"]
    assert confirmed.intermediate == ["T0.3", "T0.5", "T0.7"] and confirmed.winners == ["T0.5"]
    assert confirmed.best == "T0.5"
    assert {k: str(c) for k, c in confirmed.claims.items()} == {
        "T0.3": "worse", "T0.5": "confirmed",
        "T0.7": "inconclusive (the interval holds both 0 and a gain of 0.3 points)", "Tstar": "worse"}
    assert confirmed.also == [("Tstar", "T*")]
    # a gate below its bar ranks nothing, but every comparison's own claim is still made
    assert str(findings["below->x"].claims["T0.5"]) == "confirmed"
    assert str(findings["unresolvable->x"].claims["T0.5"]) == f"inconclusive ({cannot})"


def test_the_gate_needs_half_a_point_with_the_interval_above_zero():
    def gate(gains, trajectories=7):
        rows = Rows()
        design(rows, "a->b", NONE, {"Tfull": gains, "T0.5": UP}, trajectories)
        pair = rows.build().pairs[0]
        return pair.finding.gate, pair.comparisons["gate"]

    assert gate(lambda t, s: 0.0051 + 0.0001 * s)[0] == "passed"    # 0.51 to 0.53 points
    assert gate(lambda t, s: 0.0045 + 0.0001 * s)[0] == "below"     # interval above 0, mean below 0.5
    assert gate(lambda t, s: -0.01)[0] == "failed"
    assert gate(lambda t, s: 0.03, trajectories=1)[0] == "unresolved"  # one trajectory: no interval
    # +5 points on some students, −3 on others: a mean above 0.5 points, but an interval reaching below 0
    state, comparison = gate(lambda t, s: 0.05 if (t + s) % 2 else -0.03)
    assert comparison.mean > 0.5 and comparison.ci_points[0] < 0
    assert state == "failed"


def test_claim_words():
    from ckptkd.stats import UnitEstimate

    def c(mean, low, high, p, holm=None, n=8, family=1):
        estimate = UnitEstimate("paired", "trajectory", n, mean / 100, (low / 100, high / 100), n - 1, p,
                                2 / 2 ** n)
        return Comparison("a", "b", {(0, 0): mean / 100}, estimate, holm=holm, family=family, trajectories=n)

    assert str(claim(c(1.0, 0.2, 1.8, 0.01))) == "confirmed"
    assert str(claim(c(-1.0, -1.8, -0.2, 0.01))) == "worse"
    assert str(claim(c(1.0, 0.2, 1.8, 0.01, holm=0.06))) == (  # the adjusted p decides where there is one
        "inconclusive (the interval holds both 0 and a gain of 0.3 points)")
    assert str(claim(c(1.0, -0.1, 1.8, 0.01))) == "inconclusive (the interval holds both 0 and a gain of 0.3 points)"
    assert str(claim(c(-0.5, -0.9, 0.2, 0.2))) == "no gain larger than 0.3 points"
    assert str(claim(c(-0.5, -0.9, 0.2, 0.2), margin=0.1)) == (
        "inconclusive (the interval holds both 0 and a gain of 0.1 points)")
    # three units cannot reach p < 0.05: a clear interval above 0 is still no confirmation
    assert str(claim(c(1.0, 0.2, 1.8, 0.25, n=3))) == (
        "inconclusive (design cannot resolve: 3 trajectories, smallest attainable p = 0.25)")
    assert str(claim(c(1.0, 0.2, 1.8, 0.03, n=6, family=3))).startswith(
        "inconclusive (design cannot resolve: 6 trajectories, smallest attainable p = 0.0938 after Holm")
    assert str(claim(Comparison("a", "b", {}, None))) == "inconclusive (no students of both variants)"
    same = Comparison("Tstar", "Tfull", {(0, 0): 0.0}, c(0, 0, 0, 1).estimate, same_runs=3, trajectories=3)
    assert str(claim(same)) == "the same runs"


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
        """Cross-fitted regrets and gains by trajectory: seed s's best epoch is the best of the other seed."""
        regrets, gains = {}, {}
        for t, e in chosen.items():
            if e in curve[t]:
                for s in (0, 1):
                    best = max(curve[t], key=lambda x: (curve[t][x][1 - s], x))
                    regrets.setdefault(t, []).append(100 * (curve[t][e][s] - curve[t][best][s]))
                    gains.setdefault(t, []).append(100 * (curve[t][e][s] - curve[t][6][s]))
        return regrets, gains

    for key, chosen in (("info@train", {0: 6, 1: 2}), ("nc1@train", {0: 5, 1: None}), ("best-val", {0: 6, 1: 2}),
                        ("T0.5", {0: 3, 1: 3}), ("Tfull", {0: 6, 1: 6}), ("info@val", {0: None, 1: None})):
        assert selectors[key].picks == chosen, key
        assert (selectors[key].regrets, selectors[key].gains) == expected(chosen), key
    # by hand: on t0 seed 0's best is seed 1's best, epoch 4 (0.75), and seed 1's is seed 0's, epoch 4 (0.625);
    # on t1 seed 0's best is epoch 4 (0.75 on seed 1) and seed 1's epoch 2 (0.5 on seed 0, against 0.25 and 0.375)
    assert benchmark.best == {0: {0: 4, 1: 4}, 1: {0: 4, 1: 2}}
    assert selectors["info@train"].regrets == {0: [-6.25, -6.25], 1: [25.0, 0.0]}
    assert selectors["info@train"].gains == {0: [0.0, 0.0], 1: [12.5, 0.0]}
    t0, t1 = statistics.mean([-6.25, -6.25]), statistics.mean([12.5, 0.0])  # T^full's regrets by trajectory
    assert selectors["Tfull"].regret == pytest.approx((statistics.mean([t0, t1]), statistics.stdev([t0, t1]) / 2 ** 0.5))
    assert selectors["T0.5"].regrets == {} and selectors["T0.5"].regret is None  # epoch 3 taught no student
    assert selectors["info@train"].trajectories == 2 and selectors["nc1@train"].trajectories == 0


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
