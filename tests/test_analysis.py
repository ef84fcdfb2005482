import json
import shutil

import pytest
import torch

from ckptkd import distill
from ckptkd.analysis import analyze, class_matrices, expected_calibration_error, nontarget_entropy, select
from ckptkd.run import resolve
from ckptkd.errors import UserError

from conftest import run_cli, tiny_config

REQUIRED = {"epoch", "fraction", "val_acc", "val_nll", "ece", "confidence", "entropy_t", "nontarget_entropy",
            "nontarget_entropy_t", "i_xf", "i_yf", "i_xf_norm", "i_yf_norm", "score", "knn_i_xf", "knn_i_yf",
            "soft_matrix", "class_correlation"}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, teacher_run):
    run = tmp_path_factory.mktemp("analysed") / "t"
    shutil.copytree(teacher_run.path, run)
    return run, analyze(run, quiet=True)


def test_analysis_has_a_record_per_checkpoint_and_selects_the_max_score(analysed):
    run, analysis = analysed
    on_disk = json.loads((run / "analysis.json").read_text())
    assert on_disk["selected"] == analysis["selected"]
    records = analysis["checkpoints"]
    assert [r["epoch"] for r in records] == [2, 3, 4, 6]
    for r in records:
        assert REQUIRED <= set(r)
        assert r["i_yf"] >= 0.0 and r["i_xf"] >= 0.0
        assert 0.0 <= r["i_xf_norm"] <= 1.0 and 0.0 <= r["i_yf_norm"] <= 1.0
        assert len(r["soft_matrix"]) == 10 and abs(sum(r["soft_matrix"][0]) - 1.0) < 1e-4
    best = max(records, key=lambda r: (r["score"], r["epoch"]))
    assert analysis["selected"]["epoch"] == best["epoch"]
    assert analysis["selected"]["reference"] == f"{run}@epoch={best['epoch']}"
    assert analysis["split"] == "val" and analysis["n_val"] == 143
    assert set(analysis["agreement"]) == {"spearman_i_xf", "spearman_i_yf", "spearman_score"}
    for name in ("information_plane", "trajectory", "class_correlation"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_analysis_comes_from_the_cache(analysed):
    run, first = analysed
    again = analyze(run, plots=False, quiet=True)
    assert again["timing_s"]["computed"] == 0 and again["timing_s"]["cached"] == 4
    assert again["checkpoints"] == first["checkpoints"]


def test_info_references_and_select(analysed, tmp_path):
    run, analysis = analysed
    ranking = [r["epoch"] for r in analysis["ranking"]]
    assert [c.epoch for c in resolve(f"{run}@best-info")] == ranking[:1]
    assert [c.epoch for c in resolve(f"{run}@top-info:3")] == ranking[:3]
    result = run_cli("select", str(run), "--k", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"{run}@epoch={e}" for e in ranking[:3]]
    by_val = select(run, k=2, by="val")
    assert len(by_val) == 2
    student = distill(tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 1}),
                      teachers=[f"{run}@best-info"], out=tmp_path / "s", quiet=True).manifest.to_dict()
    assert student["teachers"][0]["epoch"] == ranking[0]


def test_select_before_analyze_says_what_to_do(teacher_run):
    result = run_cli("select", str(teacher_run.path))
    assert result.returncode == 2 and "ckptkd analyze" in result.stderr


def test_calibration_and_entropy_helpers_on_known_values():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # the confident row is right (gap 0); the 0.5/0.5 row predicts class 0, wrongly: gap 0.5, half the weight
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.5)
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    assert nontarget_entropy(logits, torch.tensor([0]), 1.0).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    mean, corr = class_matrices(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]), torch.tensor([0, 1, 0]), 2)
    assert mean[0] == pytest.approx([0.8, 0.2]) and mean[1] == pytest.approx([0.2, 0.8])
    assert corr[0][1] == pytest.approx(-1.0)
