"""ckptkd.stats: Student's t without scipy (checked against scipy), the exact randomisation tests, and — by
simulation — that intervals made at the independent unit cover a true difference of zero as often as they claim,
where intervals over pseudo-replicated pairs do not."""

import itertools
import math
import shutil
import statistics

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ckptkd import stats
from conftest import REPO, exact_permutation_p


@pytest.mark.parametrize("df", [1, 2, 2.94, 4, 7.5, 30, 400])
def test_student_t_matches_scipy(df):
    for q in (0.6, 0.9, 0.975, 0.995):
        assert stats.t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), abs=1e-8)
        assert stats.t_quantile(1 - q, df) == pytest.approx(scipy_stats.t.ppf(1 - q, df), abs=1e-8)
    for t in (-4.0, -0.3, 0.0, 0.8, 2.5, 12.0):
        assert stats.t_sf(t, df) == pytest.approx(scipy_stats.t.sf(t, df), abs=1e-10)


def test_exact_randomisation_tests_and_the_smallest_p_they_can_reach():
    assert stats.sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)  # all one sign: the least p of 3 units
    assert stats.sign_flip_p([0.1, -0.2, 0.3]) == pytest.approx(
        np.mean([abs(np.mean(np.array(s) * [0.1, -0.2, 0.3])) >= abs(np.mean([0.1, -0.2, 0.3])) - 1e-12
                 for s in itertools.product((1, -1), repeat=3)]))
    assert stats.permutation_p([1.0, 1.1, 1.2], [0.0, 0.1, 0.2]) == pytest.approx(2 / math.comb(6, 3))
    paired = stats.paired_units([0.1, 0.2, 0.3], "trajectory")
    assert (paired.n, paired.df, paired.min_p) == (3, 2, 0.25)
    assert stats.paired_units([0.1] * 7, "trajectory").min_p == pytest.approx(2 / 128)
    two = stats.two_sample_units([1.0, 1.1, 1.2], [0.0, 0.1, 0.3], "trajectory | run")
    assert two.n == (3, 3) and two.min_p == pytest.approx(0.1)
    welch = scipy_stats.ttest_ind([1.0, 1.1, 1.2], [0.0, 0.1, 0.3], equal_var=False)
    assert two.df == pytest.approx(welch.df)
    low, high = welch.confidence_interval(0.95)
    assert two.ci == pytest.approx((low, high))
    single = stats.paired_units([0.4], "trajectory")
    assert single.ci is None and single.min_p == 1.0 and single.p == 1.0
    # Unequal sizes: the observed split can be the only one as extreme, so the least p is 1 / C(n, n_a), and it is
    # reached (2 trajectories against 1 shared run: 1/3, not 2/3).
    lopsided = stats.two_sample_units([10.0, 11.0], [0.0], "trajectory | run")
    assert lopsided.min_p == pytest.approx(1 / 3) and lopsided.p == pytest.approx(lopsided.min_p)
    assert stats.two_sample_units([10.0, 11.0, 12.0], [0.0], "t | r").min_p == pytest.approx(1 / 4)


def _simulated_studies(n: int = 1000, trajectories: int = 3, seeds: int = 3, seed: int = 7):
    """Studies with no true difference between the variants: a trajectory (teacher) effect, a seed effect that a
    seed's students share (initial weights, batch order), run noise; b either of the trajectory too (its own
    checkpoint of the same teacher) or one run per seed serving every trajectory (no KD)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        tau = rng.normal(0, 0.3, trajectories)
        zeta = rng.normal(0, 0.2, seeds)
        a = 85 + tau[:, None] + zeta[None, :] + rng.normal(0, 0.15, (trajectories, seeds))
        b_paired = (85 + 0.8 * tau[:, None] + rng.normal(0, 0.15, trajectories)[:, None] + zeta[None, :]
                    + rng.normal(0, 0.15, (trajectories, seeds)))
        b_shared = 85 + zeta + rng.normal(0, 0.3, seeds)
        yield a, b_paired, b_shared


def test_unit_level_intervals_cover_zero_as_often_as_they_claim_and_pseudo_replicated_ones_do_not():
    """1,000 simulated studies of 3 trajectories x 3 seeds with no true effect: the 95 % intervals at the
    independent unit cover 0 in at least 93 % of them, for both designs; an interval that counts the 9 (trajectory,
    seed) pairs as independent (what 0.3 reported) covers it far less often."""
    covered = {"paired": 0, "shared": 0, "pairs as units (paired)": 0, "pairs as units (shared)": 0}
    n = 0
    for a, b_paired, b_shared in _simulated_studies():
        n += 1
        paired = stats.paired_units(list((a - b_paired).mean(axis=1)), "trajectory")
        shared = stats.two_sample_units(list(a.mean(axis=1)), list(b_shared), "trajectory | run")
        covered["paired"] += paired.ci[0] <= 0 <= paired.ci[1]
        covered["shared"] += shared.ci[0] <= 0 <= shared.ci[1]
        for name, diffs in (("pairs as units (paired)", (a - b_paired).ravel()),
                            ("pairs as units (shared)", (a - b_shared[None, :]).ravel())):
            naive = stats.paired_units(list(diffs), "pair")
            covered[name] += naive.ci[0] <= 0 <= naive.ci[1]
    rates = {k: v / n for k, v in covered.items()}
    assert rates["paired"] >= 0.93 and rates["shared"] >= 0.93, rates
    assert rates["pairs as units (paired)"] < 0.90 and rates["pairs as units (shared)"] < 0.90, rates


def test_the_pseudo_replicated_gate_of_the_committed_fashion_study_is_tested_at_its_units(tmp_path):
    """results/fashion-kd-0.3 (the study 0.3 committed): its no-KD runs (3, one per seed) each serve all 3 trajectories. 0.3 counted 9 pairs and
    reported the KD gate at p = 0.004; at the units that are independent (3 trajectory means against 3 runs) the
    smallest p the design can reach is 0.1."""
    from ckptkd.study.report import write_report

    study = tmp_path / "fashion-kd"
    shutil.copytree(REPO / "results" / "fashion-kd-0.3", study, ignore=shutil.ignore_patterns("plots"))
    write_report(study, quiet=True)
    import json

    report = json.loads((study / "report.json").read_text())
    gate = {p["name"]: p["comparisons"]["gate"] for p in report["pairs"]}["cnn->cnn"]
    old_p = stats.sign_flip_p([d for *_k, d in gate["diffs"]])
    assert old_p == pytest.approx(2 / 512) and len(gate["diffs"]) == 9  # the 9 pairs 0.3 tested
    e = gate["estimate"]
    assert (e["design"], e["unit"], e["n"]) == ("two-sample", "trajectory | run", [3, 3])
    assert e["min_p"] == pytest.approx(0.1) and e["p"] >= 0.1
    assert statistics.mean(d for *_k, d in gate["diffs"]) == pytest.approx(e["mean"])


# -- the small helpers, against values worked out by hand or by enumeration (never with the module's own helpers) --

def _exact_sign_flip_p(diffs) -> float:
    observed = abs(statistics.mean(diffs))
    flips = [abs(statistics.mean(sign * d for sign, d in zip(signs, diffs)))
             for signs in itertools.product((1, -1), repeat=len(diffs))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def test_sign_flip_p_is_exact_while_the_flips_are_few_enough_to_enumerate():
    diffs = [0.3, -0.1, 0.25, 0.05, -0.2, 0.4, 0.15, -0.05, 0.1, 0.35, -0.3, 0.2, 0.12, -0.08]
    assert 2 ** len(diffs) <= stats.EXACT_LIMIT
    assert stats.sign_flip_p(diffs) == pytest.approx(_exact_sign_flip_p(diffs), abs=1e-12)
    assert stats.sign_flip_p(diffs[:5]) == pytest.approx(_exact_sign_flip_p(diffs[:5]), abs=1e-12)
    assert stats.sign_flip_p([]) == 1.0 and stats.sign_flip_p([0.0, 0.0, 0.0]) == 1.0


def test_sign_flip_p_beyond_enumeration_is_a_deterministic_monte_carlo_estimate():
    """20 differences of size 1, 13 positive: observed |mean| 0.3, and the signed sum of 20 fair coins reaches
    |6| with probability 2 P(Bin(20, 1/2) >= 13) = 0.263."""
    diffs = [1.0] * 13 + [-1.0] * 7
    exact = 2 * sum(math.comb(20, k) for k in range(13, 21)) / 2 ** 20
    p = stats.sign_flip_p(diffs)
    assert p == pytest.approx(exact, abs=0.015)
    assert stats.sign_flip_p(diffs) == p  # fixed seed: a rebuilt report is the same file
    assert stats.sign_flip_p([1.0] * 20) < 0.001


def test_holm_adjusts_in_p_value_order_and_caps_at_one():
    # Sorted by p: c (0.01) x3, a (0.02) x2, b (0.04) x1; running maximum; capped at 1.
    assert stats.holm({"a": 0.02, "b": 0.04, "c": 0.01}) == pytest.approx({"c": 0.03, "a": 0.04, "b": 0.04})
    assert stats.holm({"x": 0.6, "y": 0.7}) == pytest.approx({"x": 1.0, "y": 1.0})
    assert stats.holm({}) == {}


def test_sign_counts_keep_ties_apart_and_the_sign_test_is_the_binomial():
    assert stats.sign_counts([0.2, 0.0, -0.1, 0.0, 0.3, 1.0]) == (3, 2, 1)
    assert stats.sign_test(0, 0) == 1.0
    assert stats.sign_test(3, 1) == pytest.approx(2 * (1 + 4) / 16)        # n = 4, P(X <= 1) = 5/16
    assert stats.sign_test(1, 3) == pytest.approx(2 * (1 + 4) / 16)
    assert stats.sign_test(9, 0) == pytest.approx(2 / 2 ** 9)
    assert stats.sign_test(2, 2) == 1.0                                    # 2 * 11/16 capped at 1


def test_mean_se_mean_std_and_paired_differences():
    assert stats.mean_se([0.5]) == (0.5, None) and stats.mean_std([0.5]) == (0.5, None)
    mean, se = stats.mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and se == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]) / math.sqrt(3))
    mean, std = stats.mean_std([1.0, 2.0, 4.0])
    assert std == pytest.approx(math.sqrt(((4 / 3) ** 2 + (1 / 3) ** 2 + (5 / 3) ** 2) / 2))
    a = {(0, 0): 0.7, (0, 1): 0.8, (1, 0): 0.6}
    b = {(0, 1): 0.5, (1, 0): 0.65, (2, 0): 0.9}
    assert stats.paired_differences(a, b) == pytest.approx({(0, 1): 0.3, (1, 0): -0.05})


def test_permutation_p_is_exact_up_to_its_limit_and_an_add_one_monte_carlo_estimate_beyond():
    a, b = [0.3, 1.2, -0.4, 0.9, 0.5], [0.1, -0.6, 0.2, -0.3]
    assert stats.permutation_p(a, b) == pytest.approx(exact_permutation_p(a, b), abs=1e-12)
    three, other = [0.5, 0.9, 0.1], [0.0, -0.2, 0.4]  # C(6, 3) = 20 splits: with draws == 20, still enumerated
    assert stats.permutation_p(three, other, draws=20) == pytest.approx(exact_permutation_p(three, other))
    assert stats.permutation_p([], [1.0]) == 1.0 and stats.permutation_p([1.0], []) == 1.0
    # 10 + 10 units: C(20, 10) = 184,756 splits, beyond EXACT_LIMIT. Completely separated samples: only the observed
    # split and its mirror are as extreme (exact p 2 / 184,756), so the estimate is (1 + k) / (draws + 1) with k the
    # draws that hit one of them: with the fixed seed none of the first 60 draws does, so 60 draws give p = 1/61 —
    # never 0, never a plain fraction of the draws.
    high, low = [10.0 + i for i in range(10)], [float(i) for i in range(10)]
    assert math.comb(20, 10) > stats.EXACT_LIMIT
    assert stats.permutation_p(high, low, draws=60) == pytest.approx(1 / 61)
    hits = stats.permutation_p(high, low) * (stats.EXACT_LIMIT + 1)  # the default: 20,000 draws
    assert abs(hits - round(hits)) < 1e-6 and 1 <= round(hits) <= 6
    # Overlapping samples: close to the exact p, and the same on every call (a rebuilt report is the same file).
    rng = np.random.default_rng(5)
    x, y = list(rng.normal(0.3, 1, 10)), list(rng.normal(0, 1, 10))
    p = stats.permutation_p(x, y)
    assert p == stats.permutation_p(x, y) and p == pytest.approx(exact_permutation_p(x, y), abs=0.015)


def test_two_sample_units_welch_interval_constant_samples_and_what_it_carries():
    a, b = [1.0, 2.0, 4.0], [0.0, 1.0]
    est = stats.two_sample_units(a, b, "run", level=0.9)
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 2
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
    half = scipy_stats.t.ppf(0.95, df) * math.sqrt(va + vb)
    assert est.mean == pytest.approx(7 / 3 - 0.5) and est.df == pytest.approx(df)
    assert est.ci == pytest.approx((est.mean - half, est.mean + half)) and est.level == 0.9
    assert (est.design, est.unit, est.n, est.units) == ("two-sample", "run", (3, 2), 5)
    assert est.p == pytest.approx(exact_permutation_p(a, b)) and est.min_p == pytest.approx(1 / math.comb(5, 3))
    # Two units a side is enough for an interval; one is not.
    assert stats.two_sample_units([1.0, 2.0], [0.0, 0.5], "run").ci is not None
    assert stats.two_sample_units([1.0], [0.0, 0.5], "run").ci is None
    # No spread on either side: a zero-width interval at the pooled degrees of freedom, not a division by zero.
    flat = stats.two_sample_units([1.0, 1.0, 1.0], [0.5, 0.5], "run")
    assert flat.ci == (0.5, 0.5) and flat.df == 3.0
    assert stats.two_sample_units([1.0, 3.0], [0.0, 2.0], "run").min_p == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="each side needs at least one unit"):
        stats.two_sample_units([], [1.0], "run")
    with pytest.raises(ValueError, match="each side needs at least one unit"):
        stats.two_sample_units([1.0], [], "run")
