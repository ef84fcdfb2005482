"""Information estimators on synthetic data whose answers are known in direction or in bound."""

import json
import math

import pytest
import torch
import torch.nn.functional as nnf

from ckptkd import UserError, info

N = 1000
CLASSES = 10


def _labels(seed):
    return torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(seed))


def _noisy_one_hot(labels, sigma, seed):
    noise = torch.randn(len(labels), CLASSES, generator=torch.Generator().manual_seed(seed))
    return 5.0 * nnf.one_hot(labels, CLASSES).float() + sigma * noise


def _images(seed, n=N):
    """Standard-normal 1x8x8 images, made spatially correlated like real ones by a 3x3 blur."""
    white = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    images = nnf.conv2d(white, torch.ones(1, 1, 3, 3) / 9, padding=1)
    return images / images.std()


def test_i_yf_falls_as_label_noise_grows_and_both_estimators_rank_alike():
    labels = _labels(0)
    sigmas = [0.05, 2.0, 4.0, 10.0]
    probe, knn = [], []
    for i, sigma in enumerate(sigmas):
        features = _noisy_one_hot(labels, sigma, seed=100 + i)
        result = info.estimate_i_yf(features, labels)
        assert 0.0 <= result["i_yf"] <= result["h_y"]
        probe.append(result["i_yf"])
        knn.append(info.knn_mi(features, features, labels)["i_yf"])
        if sigma == 0.05:
            assert result["i_yf"] >= 0.85 * result["h_y"]
    assert probe == sorted(probe, reverse=True) and len(set(probe)) == len(probe)
    assert knn == sorted(knn, reverse=True) and len(set(knn)) == len(knn)
    assert info.spearman(probe, knn) == pytest.approx(1.0)


def test_i_xf_is_larger_for_the_full_image_than_for_a_2d_projection():
    images = _images(1)
    labels = _labels(1)
    flat = images.reshape(N, -1)
    projection = flat @ torch.randn(flat.shape[1], 2, generator=torch.Generator().manual_seed(2))
    full_mi, projected_mi = info.estimate_mi(flat, images, labels), info.estimate_mi(projection, images, labels)
    full_knn, projected_knn = info.knn_mi(flat, images, labels), info.knn_mi(projection, images, labels)
    assert full_mi["i_xf"] > projected_mi["i_xf"] > 0.0
    assert full_mi["recon_mse"] < projected_mi["recon_mse"] < projected_mi["recon_mse_const"]
    assert full_knn["i_xf"] > projected_knn["i_xf"]
    assert (full_knn["dim_f"], projected_knn["dim_f"]) == (8, 2)
    assert full_mi["input_dim"] == 64


@pytest.mark.parametrize("seed", range(4))
def test_uninformative_features_give_near_zero_never_negative_i_yf(seed):
    labels = _labels(seed)
    noise = torch.randn(N, 32, generator=torch.Generator().manual_seed(50 + seed))
    result = info.estimate_i_yf(noise, labels, seed=seed)
    assert 0.0 <= result["i_yf"] < 0.1
    assert result["i_yf"] == max(0.0, result["i_yf_raw"])
    assert result["i_yf_clipped"] == (result["i_yf_raw"] < 0.0)
    knn = info.knn_mi(noise, noise, labels, seed=seed)
    assert 0.0 <= knn["i_yf"] < 0.1


def test_constant_features_carry_no_information_and_clipping_is_flagged():
    labels = _labels(3)
    images = _images(3)
    constant = torch.ones(N, 16)
    result = info.estimate_mi(constant, images, labels)
    # The probe falls back to the label prior, whose held-out cross-entropy is at least H(Y).
    assert result["probe_decay"] is None and result["i_yf"] == 0.0
    assert result["i_yf_raw"] < 0.0 and result["i_yf_clipped"] is True
    assert result["decoded_components"] == 0 and result["i_xf"] == 0.0 and result["i_xf_status"] == "ok"
    assert result["recon_mse"] == result["recon_mse_const"]
    assert result["features"]["dropped_constant"] == 16 and result["features"]["kept_components"] == 0
    knn = info.knn_mi(constant, images, labels)
    assert knn["dim_f"] == 0 and knn["i_xf"] < 0.1 and knn["i_yf"] < 0.1


def test_same_seed_same_result_and_global_rng_untouched():
    labels = _labels(4)
    images = _images(4)
    features = _noisy_one_hot(labels, 3.0, seed=4)
    rng_before = torch.random.get_rng_state()
    first = info.estimate_mi(features, images, labels, seed=7)
    again = info.estimate_mi(features, images, labels, seed=7)
    other = info.estimate_mi(features, images, labels, seed=8)
    knn_first, knn_again = info.knn_mi(features, images, labels, seed=7), info.knn_mi(features, images, labels, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert first == again and knn_first == knn_again
    assert first["i_yf"] != other["i_yf"]
    assert first["i_yf"] == info.estimate_i_yf(features, labels, seed=7)["i_yf"]


def test_results_are_plain_json_values_and_splits_hold_out_data():
    labels = torch.arange(180) % CLASSES
    images = _images(5, n=180)
    features = torch.relu(images.reshape(180, -1) @ torch.randn(64, 64, generator=torch.Generator().manual_seed(5)))
    results = [
        info.estimate_mi(features, images, labels),
        info.estimate_i_yf(features, labels, holdout=0.5),
        info.estimate_i_xf(features, images),
        info.knn_mi(features, images, labels),
    ]
    for result in results:
        json.dumps(result, allow_nan=False)
        assert all(type(result[key]) is float for key in ("i_xf", "i_yf") if key in result)
    mi = results[0]
    assert mi["n_fit"] + mi["n_eval"] == 180 and mi["n_eval"] == 54
    assert results[1]["n_eval"] == 90
    for key in ("h_y", "probe_ce", "recon_mse_const", "recon_mse"):
        assert type(mi[key]) is float


def test_invalid_input_is_rejected_with_a_message():
    labels = _labels(6)[:100]
    features = torch.randn(100, 4)
    with pytest.raises(UserError, match="NaN"):
        info.estimate_i_yf(torch.full((100, 4), math.nan), labels)
    with pytest.raises(UserError, match="holdout"):
        info.estimate_i_yf(features, labels, holdout=1.0)
    with pytest.raises(ValueError, match="labels"):
        info.estimate_i_yf(features, labels[:50])
    with pytest.raises(ValueError, match="samples"):
        info.estimate_mi(features, torch.randn(99, 1, 8, 8), labels)


def test_spearman():
    assert info.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert info.spearman([0.1, 5.0, 2.0], [1.0, 30.0, 4.0]) == pytest.approx(1.0)
    # Ties get average ranks: [1.5, 1.5, 3] against [1, 2, 3].
    assert info.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(info.spearman([2, 2, 2], [1, 2, 3]))
    assert math.isnan(info.spearman([1, math.nan, 3], [1, 2, 3]))
    assert math.isnan(info.spearman([1], [1]))
    assert type(info.spearman([1, 2], [1, 2])) is float
    with pytest.raises(ValueError):
        info.spearman([1, 2, 3], [1, 2])


@pytest.mark.parametrize("where", ["fit", "held-out"])
def test_a_unit_active_on_a_single_image_neither_blows_up_nor_is_silently_clipped(where):
    """A ReLU unit that fires on one image once scaled a held-out image to |z| ~ 10^4 and sent I(X;F) to a large
    negative raw value that was then reported as 0. Now the unit is dropped and both estimates are unchanged."""
    images = _images(7)
    flat = images.reshape(N, -1)
    gen = torch.Generator().manual_seed(8)
    labels = (flat @ torch.randn(64, CLASSES, generator=gen)).argmax(1)   # labels that the image determines
    features = torch.relu(flat @ torch.randn(64, 24, generator=gen))      # features that see the image
    clean = info.estimate_mi(features, images, labels, seed=0)
    plan = info.plan_split(None, labels, seed=0)
    rogue = torch.zeros(N, 1)
    rogue[(plan.fit if where == "fit" else plan.held)[0]] = 1000.0
    spiked = info.estimate_mi(torch.cat([features, rogue], 1), images, labels, seed=0)
    dropped = spiked["features"]
    # On the fit side it is a rarely-active unit; held out, it never varies where the estimators fit.
    assert (dropped["dropped_rare"], dropped["dropped_constant"]) == ((1, 0) if where == "fit" else (0, 1))
    for key in ("i_xf", "i_yf"):
        assert clean[f"{key}_status"] == spiked[f"{key}_status"] == "ok"
        assert spiked[key] == pytest.approx(clean[key], rel=1e-9)
    assert spiked["i_xf"] > 1.0 and spiked["i_yf"] > 0.5


def test_an_estimate_far_outside_its_range_is_failed_not_a_number():
    from ckptkd.selection.info.estimators import judged

    assert judged("i_yf", -5.0, -0.2) == {"i_yf": None, "i_yf_raw": -5.0, "i_yf_status": "failed",
                                          "i_yf_clipped": False}
    assert judged("i_yf", -0.01, -0.2)["i_yf"] == 0.0 and judged("i_yf", -0.01, -0.2)["i_yf_status"] == "clipped"
    assert judged("i_xf", math.nan, -1.0)["i_xf_status"] == "failed"
    assert judged("i_xf", 3.0, -1.0) == {"i_xf": 3.0, "i_xf_raw": 3.0, "i_xf_status": "ok", "i_xf_clipped": False}


def test_i_yf_is_scored_on_held_out_images_a_lower_bound_that_overfitting_cannot_inflate():
    """One feature carries the label (two classes at -+0.5 with unit variance: I(Y;F) = 0.1114 nats, computed here
    by quadrature), 250 more are noise. The probe can fit noise on the images it is fitted on; scored on held-out
    images its estimate is a lower bound, so no seed exceeds the truth by more than sampling noise. (Scored on its
    own fit part, 3 of these 5 seeds come out above 0.25.)"""
    import numpy as np

    xs = np.linspace(-10, 10, 20001)
    p0, p1 = np.exp(-(xs - 0.5) ** 2 / 2), np.exp(-(xs + 0.5) ** 2 / 2)
    posterior = p0 / (p0 + p1)
    conditional = -(posterior * np.log(posterior) + (1 - posterior) * np.log(1 - posterior))
    truth = math.log(2) - float(((p0 + p1) / 2 / math.sqrt(2 * math.pi) * conditional).sum() * (xs[1] - xs[0]))
    assert truth == pytest.approx(0.1114, abs=1e-4)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (400,), generator=gen)
        f = torch.randn(400, 251, generator=gen, dtype=torch.float64)
        f[:, 0] += (1 - 2 * y.double()) * 0.5
        assert info.estimate_i_yf(f, y, seed=seed)["i_yf_raw"] <= truth + 0.05, seed
