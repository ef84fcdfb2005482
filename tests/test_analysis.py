import contextlib
import io
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from ckptkd import distill
from ckptkd.selection.analysis import (MATRIX_CLASSES, WholeSplit, analyze, estimator_subset, nc1, nontarget_entropy,
                                       p_target, read_split, select)
from ckptkd.errors import UserError
from ckptkd.run import resolve
from ckptkd.selection.criteria import CRITERIA, evaluate, ranking

from conftest import call_cli, rewrite_manifest, tiny_config

SPLIT_KEYS = {"n", "acc", "nll", "ece", "confidence", "entropy_t", "nontarget_entropy", "nontarget_entropy_t",
              "p_target_t", "nc1", "soft_matrix", "class_correlation", "seeds", "estimates", "notes"}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, teacher_run):
    run = tmp_path_factory.mktemp("analysed") / "t"
    shutil.copytree(teacher_run.path, run)
    return run, analyze(run, quiet=True, seeds=3)


def test_analysis_has_both_splits_per_checkpoint_with_seeded_estimates(analysed):
    run, analysis = analysed
    on_disk = json.loads((run / "analysis.json").read_text())
    assert on_disk["selected"] == analysis["selected"] and on_disk["format"] == 2
    records = analysis["checkpoints"]
    assert [r["epoch"] for r in records] == [2, 3, 4, 6]
    for r in records:
        for split in ("train", "val"):
            assert SPLIT_KEYS <= set(r[split])
            assert len(r[split]["seeds"]) == 3
            for quantity in ("i_xf", "i_yf", "knn_i_xf", "knn_i_yf", "p_target_t", "nc1"):
                estimate = r[split]["estimates"][quantity]
                values = [s[quantity] for s in r[split]["seeds"]]
                assert estimate["n"] == 3 and estimate["mean"] == pytest.approx(sum(values) / 3)
                # overlapping splits: Nadeau & Bengio's corrected SE, sd * sqrt(1/K + 0.3/0.7)
                assert estimate["se"] == pytest.approx(statistics.stdev(values) * math.sqrt(1 / 3 + 0.3 / 0.7))
            assert len(r[split]["soft_matrix"]) == 10 and abs(sum(r[split]["soft_matrix"][0]) - 1.0) < 1e-4
    assert analysis["split"] == "train" and analysis["splits"]["val"]["n"] == 143
    assert analysis["selected"]["criterion"] == "info@train"
    assert analysis["selected"]["epoch"] in analysis["selected"]["ties"]
    assert set(analysis["criteria"]) == {f"{c}@{s}" for c in CRITERIA for s in ("train", "val")}
    for name in ("information_plane", "trajectory", "class_correlation"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"  # beside it, for papers
        assert analysis["plots"][name] == str(png)  # the analysis names the PNG, as it always did


def test_analysis_figures_name_ties_as_the_criterion_makes_them_and_keep_the_temperature(analysed, monkeypatch):
    """Ties are checkpoints not significantly worse than T* (a paired t), no longer those within 2 SE."""
    from ckptkd.run import Run
    from ckptkd.selection import plots

    run, analysis = analysed
    drawn = {}

    def keep(fig, path):  # instead of saving: the figure as drawn, by file name
        drawn[path.stem] = fig
        return str(path)

    monkeypatch.setattr(plots, "save", keep)
    plots.plot_analysis(Run(run), analysis, Run(run).manifest)
    assert set(drawn) == {"information_plane", "trajectory", "class_correlation"}
    for fig in drawn.values():
        assert f"(tau = {analysis['temperature']:g})" in fig._suptitle.get_text()
    epochs = [r["epoch"] for r in analysis["checkpoints"]]
    plots.information_plane(analysis["checkpoints"], "train", epochs[-1], epochs, "title", run / "unused.png")
    legend = [t.get_text() for t in drawn["unused"].legends[0].get_texts()]
    assert legend == ["tied with T* (not significantly worse)", f"T* (epoch {epochs[-1]})"]


def test_the_recorded_checkpoint_accuracy_is_that_checkpoints_validation_accuracy(analysed):
    """Recording the training accuracy (or another epoch's) as a checkpoint's val_acc breaks this."""
    _, analysis = analysed
    for r in analysis["checkpoints"]:
        assert r["val_acc"] == pytest.approx(r["val"]["acc"], abs=1e-12)  # the manifest's number, re-measured


def test_second_analysis_comes_from_the_cache(analysed):
    run, first = analysed
    again = analyze(run, plots=False, quiet=True, seeds=3)
    assert again["timing_s"]["computed"] == 0 and again["timing_s"]["cached"] == 4
    assert again["checkpoints"] == first["checkpoints"]


def test_info_references_and_select_json(analysed, tmp_path):
    run, analysis = analysed
    order = [r["epoch"] for r in analysis["ranking"]]
    assert order[0] == analysis["selected"]["epoch"]
    assert [c.epoch for c in resolve(f"{run}@best-info")] == order[:1]
    assert [c.epoch for c in resolve(f"{run}@top-info:3")] == order[:3]
    result = call_cli("select", str(run), "--k", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"{run}@epoch={e}" for e in order[:3]]
    as_json = call_cli("select", str(run), "--json")
    picked = json.loads(as_json.stdout)
    assert picked["t_star"] == order[0] and picked["criterion"] == "info@train"
    assert picked["ties"] == analysis["selected"]["ties"]
    assert [c["epoch"] for c in picked["checkpoints"]] == [2, 3, 4, 6]
    assert all({"score", "se"} <= set(c) for c in picked["checkpoints"])
    student = distill(tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 1}),
                      teachers=[f"{run}@best-info"], out=tmp_path / "s", quiet=True).manifest.to_dict()
    assert student["teachers"][0]["epoch"] == order[0]


def test_select_by_val_puts_the_best_validation_checkpoint_first(teacher_run):
    """Returning the worst first (a reversed sort) breaks this."""
    picked = select(teacher_run.path, k=4, by="val")
    val = {c.epoch: c.metrics["val_acc"] for c in resolve(f"{teacher_run.path}@all")}
    epochs = [int(r.rsplit("=", 1)[1]) for r in picked["references"]]
    assert [val[e] for e in epochs] == sorted(val.values(), reverse=True)
    assert epochs[0] == resolve(f"{teacher_run.path}@best-val")[0].epoch


def test_select_before_analyze_says_what_to_do(teacher_run, capsys):
    from ckptkd.cli import main

    assert main(["select", str(teacher_run.path)]) == 2
    assert "ckptkd analyze" in capsys.readouterr().err


def _checkpoints(scores: dict[int, list[float]], val: dict[int, float] | None = None) -> list[dict]:
    return [{"epoch": e, "val_acc": (val or {}).get(e, 0.5), "train": {"seeds": [{"i_xf": v, "i_yf": v}
                                                                               for v in values]}}
            for e, values in scores.items()]


def test_ties_within_two_standard_errors_are_broken_by_validation_accuracy():
    # epoch 20 is best on average; 30 is within noise of it (paired differences -0.05 +- 0.03, 1.7 SE); 10 is far
    # below.
    scores = {10: [0.0, 0.1, 0.0, 0.1], 20: [1.0, 1.2, 0.9, 1.1], 30: [0.9, 1.2, 0.8, 1.1]}
    result = evaluate(_checkpoints(scores, val={20: 0.90, 30: 0.95}), CRITERIA["info"], "train")
    assert result["best"] == 20 and result["ties"] == [20, 30]
    assert result["t_star"] == 30  # the tie set's best validation accuracy
    assert evaluate(_checkpoints(scores, val={20: 0.96, 30: 0.95}), CRITERIA["info"], "train")["t_star"] == 20
    assert ranking(result) == [30, 20, 10]


def test_a_term_whose_range_is_within_its_noise_is_not_normalised():
    # i_xf carries the signal; i_yf wanders by less than its noise and must not get equal weight.
    checkpoints = [{"epoch": e, "val_acc": 0.5, "train": {"seeds": [{"i_xf": x + d, "i_yf": 1.0 + n}
                                                                    for d, n in zip((0, .01, -.01), noise)]}}
                   for e, x, noise in ((1, 0.0, (.3, -.3, .1)), (2, 5.0, (-.2, .25, .0)), (3, 2.0, (.1, .2, -.3)))]
    result = evaluate(checkpoints, CRITERIA["info"], "train")
    assert result["terms"] == {"i_xf": "normalised", "i_yf": "flat"}
    assert result["t_star"] == 2 and result["ties"] == [2]


def test_failed_estimates_are_skipped_and_named():
    checkpoints = _checkpoints({1: [0.1, 0.2], 2: [0.9, 0.8]})
    for seed in checkpoints[1]["train"]["seeds"]:
        seed["i_xf"] = None
    result = evaluate(checkpoints, CRITERIA["info"], "train")
    assert result["t_star"] == 1 and result["skipped"] == [{"epoch": 2, "why": "no split seed gave a valid estimate"}]


def test_estimator_subset_keeps_every_class_share():
    """A plain random subset (not stratified) breaks this: the rare class would not keep its 10 %."""
    labels = torch.tensor([0] * 900 + [1] * 100)
    sub = estimator_subset(labels, 200, seed=0)
    assert len(sub) == 200 and int((labels[sub] == 1).sum()) == 20
    assert len(set(sub.tolist())) == 200


def test_t_star_is_stable_across_estimator_seeds_on_the_digits_teacher(tmp_path):
    """configs/digits_teacher.yaml's trajectory: for at least 4 of 5 estimator seeds, T* is the most common T* or
    has it in its tie set."""
    from ckptkd import train

    from conftest import REPO

    run = train(str(REPO / "configs" / "digits_teacher.yaml"), out=tmp_path / "t", quiet=True,
                overrides={"log.progress": False, "log.tensorboard": False, "device": "cpu"})
    picks = [analyze(run.path, seed=seed, plots=False, quiet=True)["selected"] for seed in range(5)]
    epochs = [p["epoch"] for p in picks]
    mode = max(set(epochs), key=epochs.count)
    # the same T* as the most common one, or that one inside the seed's tie set
    agreeing = sum(p["epoch"] == mode or mode in p["ties"] for p in picks)
    assert agreeing >= 4, [(p["epoch"], p["ties"], p["argmax"]) for p in picks]


def test_degenerate_features_are_reported_not_fatal(tmp_path, teacher_run):
    """A checkpoint whose features are NaN: its estimates fail with a note, the others are still analysed."""
    from ckptkd.run import Run
    from ckptkd.run.storage import save_tensors

    run = tmp_path / "t"
    shutil.copytree(teacher_run.path, run)
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["checkpoints"][0]
    weights = resolve(f"{run}@epoch={entry['epoch']}")[0].state_dict()
    weights = {k: (torch.full_like(v, math.nan) if k.startswith("layer3") and v.is_floating_point() else v)
               for k, v in weights.items()}
    entry["sha256"] = save_tensors(run / entry["path"], weights)
    rewrite_manifest(run, manifest)
    analysis = analyze(run, plots=True, quiet=True, seeds=2)
    first = analysis["checkpoints"][0]["train"]
    assert first["estimates"]["i_xf"]["mean"] is None and first["estimates"]["i_xf"]["failed"] == 2
    assert any("NaN" in note for note in first["notes"])
    assert analysis["selected"]["epoch"] != entry["epoch"]
    assert {"epoch": entry["epoch"], "why": "no split seed gave a valid estimate"} in \
        analysis["criteria"]["info@train"]["skipped"]
    json.dumps(analysis, allow_nan=False)
    assert Run(run).has_analysis()


def test_a_trajectory_of_one_checkpoint_is_analysed_with_a_note(tmp_path):
    from ckptkd import train

    run = train(tiny_config(schedule={"epochs": 1}, checkpoints={"fractions": [1.0]}), out=tmp_path / "one",
                quiet=True)
    analysis = analyze(run.path, plots=True, quiet=True, seeds=2)
    assert analysis["selected"]["epoch"] == 1 and any("1 checkpoint" in n for n in analysis["notes"])


def test_measure_helpers_on_known_values():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # the confident row is right (gap 0); the 0.5/0.5 row predicts class 0, wrongly: gap 0.5, half the weight
    assert WholeSplit(2, 1.0).add(probs.log(), torch.tensor([0, 1])).measures()["ece"] == pytest.approx(0.5 * 0.5)
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    assert nontarget_entropy(logits, torch.tensor([0]), 1.0).item() == pytest.approx(math.log(2.0))
    assert p_target(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), 2.0).item() == pytest.approx(1 / (1 + math.e ** -1))
    soft = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    measured = WholeSplit(2, 1.0).add(soft.log(), torch.tensor([0, 1, 0])).measures()
    assert measured["soft_matrix"][0] == pytest.approx([0.8, 0.2]) and measured["soft_matrix"][1] == pytest.approx(
        [0.2, 0.8])
    assert measured["class_correlation"][0][1] == pytest.approx(-1.0)
    # NC1: class means at +-1 on one axis (S_B = 1 there), within-class spread 0.1 on that axis only.
    features = torch.tensor([[1.1, 0.0], [0.9, 0.0], [-1.1, 0.0], [-0.9, 0.0]])
    assert nc1(features, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.01 / 2)
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    assert nc1(collapsed, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0, abs=1e-12)


def _in_memory_measures(logits, labels, features, temperature):
    """The whole-split measures as defined, on tensors held whole (what WholeSplit must equal, batch by batch)."""
    probs, tempered = logits.softmax(1), (logits / temperature).softmax(1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, 16)
    ece = sum(((confidence > lo) & (confidence <= hi)).double().mean().item()
              * abs(confidence[(confidence > lo) & (confidence <= hi)].double().mean().item()
                    - correct[(confidence > lo) & (confidence <= hi)].mean().item())
              for lo, hi in zip(edges[:-1], edges[1:]) if ((confidence > lo) & (confidence <= hi)).any())
    f = features.double()
    classes = torch.unique(labels)
    means = torch.stack([f[labels == c].mean(0) for c in classes])
    _, s, vh = torch.linalg.svd(means - means.mean(0), full_matrices=False)
    keep = s > 1e-10 * s[0]
    within = (f - means[torch.searchsorted(classes, labels)]) @ vh[keep].T
    return {"acc": correct.mean().item(), "nll": torch.nn.functional.cross_entropy(logits.double(), labels).item(),
            "ece": ece, "confidence": confidence.double().mean().item(),
            "p_target_t": p_target(logits, labels, temperature).double().mean().item(),
            "nontarget_entropy_t": nontarget_entropy(logits, labels, temperature).double().mean().item(),
            "nc1": (within.square().mean(0) / s[keep].square()).sum().item(),
            "soft_matrix": torch.stack([tempered[labels == c].double().mean(0) for c in range(logits.shape[1])]),
            "class_correlation": torch.corrcoef(tempered.double().T)}


def test_whole_split_measures_summed_batch_by_batch_equal_the_definitions_on_the_whole_split():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (700,), generator=gen)
    logits = 2 * torch.randn(700, 5, generator=gen) + 3 * torch.nn.functional.one_hot(labels, 5)
    # features far from 0 beside a small class signal
    features = 100 + torch.randn(700, 6, generator=gen) + torch.nn.functional.one_hot(labels, 6)[:, :6]
    whole = WholeSplit(5, 4.0)
    for start in range(0, 700, 128):  # batches of an odd split
        whole.add(logits[start:start + 128], labels[start:start + 128], features[start:start + 128])
    measured, expected = whole.measures(), _in_memory_measures(logits, labels, features, 4.0)
    assert measured["n"] == 700
    for key in ("acc", "nll", "ece", "confidence", "p_target_t", "nontarget_entropy_t"):
        assert measured[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert measured["nc1"] == pytest.approx(expected["nc1"], rel=1e-4)
    for key in ("soft_matrix", "class_correlation"):
        assert torch.tensor(measured[key]).double() == pytest.approx(expected[key], abs=2e-6), key


def test_a_split_is_read_in_one_pass_holding_only_the_estimator_subset(teacher_run):
    from ckptkd import data as data_mod
    from ckptkd.run import resolve

    ckpt = resolve(teacher_run.ref("last"))[0]
    data = data_mod.build(teacher_run.config()["data"], "cpu")
    subset = estimator_subset(data.train_y, 300, seed=0)
    model = ckpt.build_model("cpu")
    whole, (logits, features, labels) = read_split(model, data, "train", subset, temperature=4.0)
    assert len(logits) == len(features) == len(labels) == len(subset) < len(data.train_y) == whole.n
    assert torch.equal(labels, data.train_y[subset])
    with torch.inference_mode():  # the rows kept are the subset's, in its order
        x = data.inputs("train", subset[:5])
        assert torch.allclose(logits[:5], model.eval()(x), atol=1e-5)


def test_class_matrices_are_left_out_beyond_their_bound_and_the_figure_with_them():
    many = MATRIX_CLASSES + 1
    measured = WholeSplit(many, 1.0).add(torch.randn(4, many), torch.tensor([0, 1, 2, 3])).measures()
    assert measured["soft_matrix"] is None and measured["class_correlation"] is None
    assert measured["acc"] is not None and WholeSplit(2, 1.0).measures()["acc"] is None  # an empty split: null


# The documented direction of every criterion: (criterion, split, per-seed quantity, whether higher is better).
DIRECTIONS = [("info", "train", ("i_xf", "i_yf"), True), ("knn-info", "train", ("knn_i_xf", "knn_i_yf"), True),
              ("val", "val", ("acc",), True), ("p_target", "train", ("p_target_t",), False),
              ("nontarget_entropy", "train", ("nontarget_entropy_t",), True), ("nc1", "train", ("nc1",), True)]


@pytest.mark.parametrize("name, split, quantities, higher", DIRECTIONS, ids=[d[0] for d in DIRECTIONS])
def test_every_criterion_picks_in_its_documented_direction(name, split, quantities, higher):
    """p_target picks the softest teacher (the lowest tempered true-class probability), the others the highest
    value: flipping a criterion's direction makes it pick the opposite end of the trajectory."""
    values = {1: 0.2, 2: 0.5, 3: 0.9}  # well apart: 4 seeds, noise 0.01
    checkpoints = [{"epoch": e, "val_acc": 0.5, split: {"seeds": [{q: v + 0.01 * k for q in quantities}
                                                                  for k in (-1, 1, 0, 0)]}}
                   for e, v in values.items()]
    result = evaluate(checkpoints, CRITERIA[name], split)
    assert result["t_star"] == (3 if higher else 1) and result["ties"] == [result["t_star"]]
    assert ranking(result) == ([3, 2, 1] if higher else [1, 2, 3])


def test_the_probe_strength_shared_by_split_seeds_is_chosen_on_images_none_of_them_holds_out(monkeypatch):
    """Choosing it once per checkpoint and split (most of the estimators' cost) must not look at any seed's held-out
    images, where that seed's estimate is scored."""
    from ckptkd import info
    from ckptkd.selection import analysis as analysis_mod

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 4
    features = torch.randn(600, 12, generator=gen) + labels[:, None].float()
    inputs = torch.randn(600, 1, 4, 4, generator=gen)
    plans = [info.plan_split(inputs, labels, seed=k) for k in range(5)]
    seen = {}
    real = info.choose_probe_decay

    def spy(z, codes, fit, seed, probe_epochs):
        seen["fit"] = fit
        return real(z, codes, fit, seed, probe_epochs)

    monkeypatch.setattr(analysis_mod.info, "choose_probe_decay", spy)
    decay = analysis_mod.shared_probe_decay(features, plans, 20)
    assert decay is not None and len(seen["fit"]) > 60  # about 0.7^5 of the 600 images
    for plan in plans:
        assert not set(seen["fit"].tolist()) & set(plan.held.tolist())
        assert set(seen["fit"].tolist()) <= set(plan.fit.tolist())


def test_select_by_proxy_picks_the_checkpoint_whose_short_student_validates_best(teacher_run, tmp_path, monkeypatch):
    """Every checkpoint teaches a short proxy of the real student; the pick is the proxy with the best validation
    accuracy (never test), its runs are ordinary run folders under RUN/proxy/, and a second call reads proxy.json."""
    import json as json_mod

    from ckptkd.run import Run
    from ckptkd.selection import proxy as proxy_mod
    from ckptkd.selection.analysis import select

    run = tmp_path / "t"
    shutil.copytree(teacher_run.path, run)
    student = {"model": {"name": "mlp", "widths": [16]}, "data": {"name": "digits", "batch_size": 64},
               "device": "cpu", "schedule": {"epochs": 20, "warmup_epochs": 10, "milestones": [0.5, 15]},
               "log": {"progress": False, "tensorboard": False}}
    result = select(run, by="proxy", student=student)
    assert result["proxy_epochs"] == 2 and result["cost_s"] > 0  # 10 % of 20 epochs
    folders = sorted((run / "proxy").glob("*/epoch-*"))
    assert [f.name for f in folders] == [f"epoch-{e:04d}" for e in (2, 3, 4, 6)]
    val = {}
    for f in folders:
        manifest = Run(f).manifest
        assert manifest.epochs == 2 and [t["epoch"] for t in manifest.teachers] == [int(f.name[6:])]
        val[int(f.name[6:])] = manifest.final.val_acc
    cfg = Run(folders[0]).config()
    assert cfg["schedule"]["warmup_epochs"] == 1 and cfg["schedule"]["milestones"] == [0.5, 2]  # scaled to 2
    assert result["t_star"] == max(val, key=lambda e: (val[e], e))
    assert {c["epoch"]: c["score"] for c in result["checkpoints"]} == val
    assert result["references"] == [f"{run}@epoch={result['t_star']}"]
    saved = json_mod.loads(next((run / "proxy").glob("*/proxy.json")).read_text())
    assert saved["t_star"] == result["t_star"] and saved["folder"].startswith("proxy/")
    monkeypatch.setattr("ckptkd.training.loop.fit", lambda *a, **k: pytest.fail("trained again"))
    assert select(run, by="proxy", student=student)["t_star"] == result["t_star"]
    with pytest.raises(UserError, match="--student"):
        select(run, by="proxy")
    assert proxy_mod.proxy_config(Run(folders[0]).config(), 1)["schedule"]["warmup_epochs"] == 0

# --- the criteria's arithmetic on hand-made per-seed values (tests/test_stats.py does the same for the report) ---

def _seeds(split: str, per_epoch: dict[int, list[dict]], val: dict | None = None) -> list[dict]:
    """Checkpoints with the given per-seed values on `split`; val_acc 0.5 unless given (a missing key: left out)."""
    out = []
    for epoch, seeds in per_epoch.items():
        c = {"epoch": epoch, split: {"seeds": seeds}}
        if val is None or epoch in val:
            c["val_acc"] = 0.5 if val is None else val[epoch]
        out.append(c)
    return out


def test_criterion_key_takes_the_given_split_then_the_criterions_own_then_the_analysis_split():
    from ckptkd.selection.criteria import criterion_key

    assert criterion_key("info", None, "val") == "info@val"
    assert criterion_key("info", "train", "val") == "info@train"
    assert criterion_key("val", None, "train") == "val@val"
    assert criterion_key("val", "train", "val") == "val@train"
    with pytest.raises(UserError) as refused:
        criterion_key("bogus", None, "train")
    assert "bogus" in str(refused.value) and "knn-info" in str(refused.value)  # names what would have been known


def test_each_rows_score_standard_error_and_paired_difference():
    """A raw criterion's score is the mean over seeds; its SE is the corrected resampled SE of overlapping splits,
    stdev * sqrt(1/n + h/(1-h)) with h the held-out fraction (none for one seed); each row's difference to the best
    is paired on the seeds both have (a failed seed drops out of the pair)."""
    from ckptkd.selection.info.estimators import HOLDOUT

    def se(values):
        return statistics.stdev(values) * math.sqrt(1 / len(values) + HOLDOUT / (1 - HOLDOUT))

    acc = {1: [0.5, 0.6, 0.7, 0.6], 2: [0.8, 0.8, 0.9, 0.9], 3: [0.7, None, 0.8, 0.75], 4: [0.83]}
    result = evaluate(_seeds("val", {e: [{"acc": a} for a in v] for e, v in acc.items()}), CRITERIA["val"], "val")
    assert result["terms"] == {"acc": "raw"} and result["flat"] is False and result["best"] == 2
    rows = {r["epoch"]: r for r in result["scores"]}
    assert rows[1]["score"] == pytest.approx(0.6) and rows[1]["se"] == pytest.approx(se([0.5, 0.6, 0.7, 0.6]))
    assert rows[4]["score"] == pytest.approx(0.83) and rows[4]["se"] is None
    assert rows[3]["se"] == pytest.approx(se([0.7, 0.8, 0.75]))
    # epoch 3 against 2 on seeds 0, 2, 3: -0.1, -0.1, -0.15
    assert rows[3]["diff"] == pytest.approx(-0.35 / 3)
    assert rows[3]["diff_se"] == pytest.approx(se([-0.1, -0.1, -0.15]))
    assert rows[2] == {"epoch": 2, "score": pytest.approx(0.85), "diff": 0.0, "diff_se": 0.0, "tied": True,
                       "se": pytest.approx(se([0.8, 0.8, 0.9, 0.9]))}
    two = evaluate(_seeds("val", {1: [{"acc": 0.2}, {"acc": 0.4}], 2: [{"acc": 0.9}, {"acc": 0.8}]}),
                   CRITERIA["val"], "val")
    assert [r["se"] for r in two["scores"]] == pytest.approx([se([0.2, 0.4]), se([0.9, 0.8])])


def test_checkpoints_without_a_common_seed_compare_their_means_and_single_seeds_tie_only_when_equal():
    # epoch 1's valid seeds (0, 1) and the best's (2, 3) share none: the difference of means, no SE, not tied.
    disjoint = {1: [{"acc": 0.6}, {"acc": 0.7}, {"acc": None}, {"acc": None}],
                2: [{"acc": None}, {"acc": None}, {"acc": 0.9}, {"acc": 0.8}]}
    rows = evaluate(_seeds("val", disjoint), CRITERIA["val"], "val")["scores"]
    assert rows[0]["diff"] == pytest.approx(0.65 - 0.85) and rows[0]["diff_se"] is None and not rows[0]["tied"]
    # One seed each: no SE, so tied only at the best's score; T* is then the better validation accuracy.
    single = _seeds("val", {1: [{"acc": 0.5}], 2: [{"acc": 0.9}], 3: [{"acc": 0.9}]}, val={1: 0.9, 2: 0.8, 3: 0.7})
    result = evaluate(single, CRITERIA["val"], "val")
    assert result["best"] == 3 and result["ties"] == [2, 3] and result["t_star"] == 2


def test_a_tie_without_a_validation_accuracy_loses_to_one_with_it():
    """Checkpoints saved without validation (no val_acc, or null) are T* only when no tied checkpoint has one."""
    tied = {e: [{"acc": 0.7}] for e in (1, 2, 3)}
    checkpoints = _seeds("val", tied, val={1: 0.6, 3: None})  # 2 has no val_acc at all
    assert evaluate(checkpoints, CRITERIA["val"], "val")["t_star"] == 1
    assert evaluate(_seeds("val", tied, val={3: None}), CRITERIA["val"], "val")["t_star"] == 3  # the later one


def test_normalised_terms_weigh_equally_whatever_their_scale():
    """i_xf spans 10..110 and i_yf 2..3: normalised, each term contributes 0..1, so the checkpoint that is good on
    both (0.6 + 0.6) beats the ones that are best on one; raw sums would pick the largest i_xf."""
    values = {1: (110.0, 2.0), 2: (10.0, 3.0), 3: (70.0, 2.6)}
    checkpoints = _seeds("train", {e: [{"i_xf": x + d, "i_yf": y + d / 100} for d in (-0.01, 0.0, 0.01)]
                                   for e, (x, y) in values.items()})
    result = evaluate(checkpoints, CRITERIA["info"], "train")
    assert result["terms"] == {"i_xf": "normalised", "i_yf": "normalised"} and result["flat"] is False
    assert [r["score"] for r in result["scores"]] == pytest.approx([1.0, 1.0, 1.2])
    assert result["t_star"] == 3 and result["ties"] == [3]


def test_a_flat_first_term_is_left_out_and_the_second_still_counts():
    # i_xf wanders within its noise; i_yf separates the checkpoints (0, 0.5, 1 once normalised).
    noise = {1: (0.3, -0.3, 0.1), 2: (-0.2, 0.25, 0.0), 3: (0.1, 0.2, -0.3)}
    checkpoints = _seeds("train", {e: [{"i_xf": 1.0 + n, "i_yf": y + d} for n, d in zip(noise[e], (0, .01, -.01))]
                                   for e, y in ((1, 0.0), (2, 2.0), (3, 1.0))})
    result = evaluate(checkpoints, CRITERIA["info"], "train")
    assert result["terms"] == {"i_xf": "flat", "i_yf": "normalised"}
    assert [r["score"] for r in result["scores"]] == pytest.approx([0.0, 1.0, 0.5])
    assert result["t_star"] == 2


def test_one_seed_per_checkpoint_has_no_noise_to_flatten_a_term():
    checkpoints = _seeds("train", {e: [{"i_xf": v, "i_yf": v}] for e, v in ((1, 0.0), (2, 0.5), (3, 1.0))})
    result = evaluate(checkpoints, CRITERIA["info"], "train")
    assert result["terms"] == {"i_xf": "normalised", "i_yf": "normalised"} and result["t_star"] == 3


def test_a_criterion_whose_every_term_is_flat_says_so_and_scores_zero():
    noise = (0.3, -0.3, 0.1)
    checkpoints = _seeds("train", {e: [{"i_xf": 1.0 + n, "i_yf": 2.0 - n} for n in noise] for e in (1, 2, 3)},
                         val={1: 0.5, 2: 0.9, 3: 0.7})
    result = evaluate(checkpoints, CRITERIA["info"], "train")
    assert result["flat"] is True and result["terms"] == {"i_xf": "flat", "i_yf": "flat"}
    assert [r["score"] for r in result["scores"]] == [0.0, 0.0, 0.0]
    assert result["ties"] == [1, 2, 3] and result["t_star"] == 2


def test_a_criterion_no_checkpoint_could_be_scored_on():
    """Every estimate failed, or the split was never measured: no T*, every checkpoint skipped with the reason, and
    the ranking is the skipped checkpoints."""
    checkpoints = _seeds("train", {1: [{"i_xf": None, "i_yf": 0.4}], 2: [{"i_xf": None, "i_yf": 0.5}]})
    checkpoints.append({"epoch": 3, "val_acc": 0.9})  # not measured on train
    result = evaluate(checkpoints, CRITERIA["info"], "train")
    assert result == {"criterion": "info", "split": "train", "t_star": None, "ties": [], "best": None, "scores": [],
                      "terms": {"i_xf": "flat", "i_yf": "normalised"}, "flat": True,
                      "skipped": [{"epoch": 1, "why": "no split seed gave a valid estimate"},
                                  {"epoch": 2, "why": "no split seed gave a valid estimate"},
                                  {"epoch": 3, "why": "not measured on this split"}]}
    assert ranking(result) == [1, 2, 3]


def test_a_note_on_failed_estimates_says_which_failed_how_far_and_on_how_many_images():
    from types import SimpleNamespace

    from ckptkd.selection.analysis import _why_failed

    seeds = [{"status": {"i_yf": "failed", "i_xf": "ok"}, "raw": {"i_yf": -0.4, "i_xf": 1.0}},
             {"status": {"i_yf": "failed", "i_xf": "failed"}, "raw": {"i_yf": -0.2, "i_xf": None}},
             {"status": {"i_yf": "ok", "i_xf": "ok"}, "raw": {"i_yf": 0.3, "i_xf": 2.0}}]
    plans = [SimpleNamespace(held=torch.arange(n)) for n in (30, 28, 31)]
    assert _why_failed(seeds, plans) == ("I(Y;F) raw down to -0.4 nats, below -0.1 H(Y) in 2; I(X;F) not finite "
                                         "in 1; 28 held-out images per seed, a larger split makes the estimators "
                                         "steadier")


def test_an_analysis_stopped_while_plotting_keeps_the_previous_analysis_and_its_own_plots(analysed, tmp_path,
                                                                                          monkeypatch):
    """Plots are drawn into a hidden folder and published with analysis.json: stopped after one new figure, the run
    holds the previous analysis and the plots drawn from it, byte for byte, and no hidden folder."""
    from ckptkd.selection import plots

    run = tmp_path / "t"
    shutil.copytree(analysed[0], run)
    before = {p.relative_to(run): p.read_bytes() for p in [run / "analysis.json", *(run / "plots").iterdir()]}
    real = plots.trajectory

    def stopped(*args, **kwargs):  # information_plane is drawn (into the hidden folder) before this
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "trajectory", stopped)
    with pytest.raises(KeyboardInterrupt):
        analyze(run, quiet=True, seeds=3, temperature=2.0)  # another temperature: other numbers and figures
    assert {p.relative_to(run): p.read_bytes() for p in [run / "analysis.json", *(run / "plots").iterdir()]} == before
    assert not [p for p in run.iterdir() if p.name.startswith(".plots")]
    monkeypatch.setattr(plots, "trajectory", real)
    analysis = analyze(run, quiet=True, seeds=3, temperature=2.0)
    assert analysis["temperature"] == 2.0 and (run / "plots" / "trajectory.png").read_bytes() != before[
        Path("plots/trajectory.png")]
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(p.name for p in before if p.parent.name)


# --- an analysis kept apart from its run (`analyze --out`, `select --analysis`): a teacher one cannot write to ---

def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_analyze_out_writes_the_analysis_elsewhere_and_leaves_the_run_untouched(analysed, teacher_run, tmp_path):
    """The run folder stays byte for byte as it was; select and references read the analysis from --out; proxies
    are kept there too; the analysis of another run is refused by its checkpoints' sha256."""
    run = tmp_path / "shared" / "t"
    shutil.copytree(teacher_run.path, run)
    before = _tree(run)
    result = call_cli("analyze", str(run), "--seeds", "3", "--out", str(tmp_path / "mine"))
    assert result.returncode == 0, result.stderr
    assert _tree(run) == before and not (run / "analysis.json").exists()
    home = tmp_path / "mine"
    assert (home / "analysis.json").is_file() and (home / "analysis-cache").is_dir()
    assert sorted(p.name for p in (home / "plots").iterdir())  # the figures, beside their analysis
    saved = json.loads((home / "analysis.json").read_text())
    assert all(Path(p).parent == home / "plots" for p in saved["plots"].values())
    # the same measurements as an analysis inside the run (the settings are the same)
    assert [c["sha256"] for c in saved["checkpoints"]] == [c["sha256"] for c in analysed[1]["checkpoints"]]
    assert saved["selected"]["epoch"] == analysed[1]["selected"]["epoch"]
    as_json = call_cli("select", str(run), "--json", "--analysis", str(home))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["t_star"] == saved["selected"]["epoch"]
    assert _tree(run) == before
    unanalysed = call_cli("select", str(run))
    assert unanalysed.returncode == 2 and "has not been analysed" in unanalysed.stderr
    # another run's analysis (a copy whose checkpoint at one epoch differs) is not read as this run's
    other = tmp_path / "other"
    shutil.copytree(teacher_run.path, other)
    tampered = json.loads((home / "analysis.json").read_text())
    tampered["checkpoints"][1]["sha256"] = "0" * 64
    tampered.pop("checksum", None)
    from ckptkd.run.storage import write_sealed_json

    write_sealed_json(tmp_path / "foreign" / "analysis.json", tampered)
    refused = call_cli("select", str(other), "--analysis", str(tmp_path / "foreign"))
    assert refused.returncode == 2, refused.stderr
    assert "analysis of another run" in refused.stderr and "epoch 3" in refused.stderr


def test_analyze_refuses_an_out_that_is_a_file_or_a_run_and_says_where_to_write_when_the_run_is_read_only(
        teacher_run, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    result = call_cli("analyze", str(teacher_run.path), "--out", str(tmp_path / "file"))
    assert result.returncode == 2 and "is a file" in result.stderr, result.stderr
    other = tmp_path / "other"
    shutil.copytree(teacher_run.path, other)
    from ckptkd.cli import main

    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "results.sqlite").write_bytes(b"")
    (tmp_path / "mine").mkdir()
    shutil.copy(tmp_path / "file", tmp_path / "mine" / "keep")
    for out, why in ((other, "is a run folder"), (other / "checkpoints", f"is inside the run folder {other}"),
                     (teacher_run.path / "state", "is inside the run folder"), (tmp_path, "holds a study or run"),
                     (tmp_path / "study", "holds a study"), ("", "names no folder")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["analyze", str(teacher_run.path), "--out", str(out), "--no-plots"]) == 2, out
        assert why in err.getvalue(), (out, err.getvalue())
    assert not (other / "analysis-cache").exists() and not (other / "checkpoints" / "analysis-cache").exists()
    # a folder holding another run's analysis is not overwritten
    analyze(other, quiet=True, seeds=1, plots=False, out=tmp_path / "mine")
    manifest = json.loads((teacher_run.path / "manifest.json").read_text())
    foreign = json.loads((tmp_path / "mine" / "analysis.json").read_text())
    foreign.pop("checksum")
    foreign["checkpoints"][0]["sha256"] = "f" * 64  # as if of another run
    from ckptkd.run.storage import write_sealed_json

    write_sealed_json(tmp_path / "mine" / "analysis.json", foreign)
    with pytest.raises(UserError, match=r"--out .*mine holds another analysis .*name a new folder"):
        analyze(teacher_run.path, quiet=True, seeds=1, plots=False, out=tmp_path / "mine")
    assert manifest == json.loads((teacher_run.path / "manifest.json").read_text())
    with pytest.raises(UserError, match=r"select: --analysis .*other is a run folder; name the folder"):
        select(teacher_run.path, analysis=other)

    # root may write anywhere, so a read-only file system is what the test plays: the first write says no
    import tempfile as tempfile_mod

    run = tmp_path / "ro"
    shutil.copytree(teacher_run.path, run)
    real = tempfile_mod.NamedTemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if Path(dir).is_relative_to(run):
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile_mod, "NamedTemporaryFile", read_only)
    with pytest.raises(UserError, match=r"cannot write to .*ro/analysis-cache \(Permission denied\); write the "
                                        r"analysis elsewhere with --out DIR"):
        analyze(run, quiet=True, seeds=1, plots=False)
    assert analyze(run, quiet=True, seeds=1, plots=False, out=tmp_path / "elsewhere")["selected"]["epoch"] in (2, 3, 4, 6)


def test_select_by_proxy_keeps_its_proxies_in_the_analysis_home(teacher_run, tmp_path):
    run = tmp_path / "t"
    shutil.copytree(teacher_run.path, run)
    before = _tree(run)
    student = tiny_config(model={"name": "mlp", "widths": [8]}, schedule={"epochs": 2})
    result = select(run, by="proxy", student=student, proxy_epochs=1, analysis=tmp_path / "mine")
    assert _tree(run) == before
    assert len(list((tmp_path / "mine" / "proxy").glob("*/epoch-*"))) == 4
    assert result["references"] == [f"{run}@epoch={result['t_star']}"]


def test_analyze_refuses_a_run_whose_data_changed_under_it(tmp_path):
    """Rebuilt from the run's config, the data must be what the run was trained on: other images would be measured,
    and classes renamed or reordered would be misread (a class of more crashed the analysis). In one process, too:
    the data read for training is not reused once its file changed."""
    import os

    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (60, 6, 6), dtype=np.uint8), np.arange(60) % 3
    path = tmp_path / "d.npz"

    def write(names, labels, images=x):
        np.savez(path, x_train=images, y_train=labels, x_test=images[:12], y_test=labels[:12],
                 class_names=np.array(names))
        write.saved += 1  # as a file saved a second later would be (some file systems keep coarse times)
        os.utime(path, ns=(write.saved * 10**9, write.saved * 10**9))

    write.saved = 0

    write(["cat", "dog", "fox"], y)
    run = tmp_path / "t"
    from ckptkd import train

    train(tiny_config(data={"name": "npz", "root": str(path), "batch_size": 16, "val_fraction": 0.25},
                      model={"name": "mlp", "widths": [8]}, schedule={"epochs": 2}, checkpoints={"fractions": [1.0]}),
          out=run, quiet=True)
    for names, labels, images, needle in (
            (["dog", "cat", "fox"], y, x, "class 0 'cat' → 'dog'"),                 # the same arrays, renamed
            (["cat", "dog", "fox", "ant"], np.arange(60) % 4, x, "3 classes → 4"),  # a class added
            (["cat", "dog", "fox"], y, 255 - x, "the images changed")):              # other pixels
        write(names, labels, images)
        with pytest.raises(UserError, match=rf"analyze: {run} was trained on data \w+ but its data config gives .*"
                                            rf"{needle}.*analyse it on the data it was trained on"):
            analyze(run, plots=False, quiet=True, seeds=1)
    assert not (run / "analysis.json").exists()


def test_analyze_given_a_checkpoint_reference_says_it_takes_the_run_folder(teacher_run):
    result = call_cli("analyze", f"{teacher_run.path}@epoch=2")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"ckptkd: error: run folder not found: {teacher_run.path}@epoch=2 (this command takes a run folder; did you "
        f"mean {teacher_run.path}?)")
