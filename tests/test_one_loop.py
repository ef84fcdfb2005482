"""One training loop for single runs and groups: single runs come out exactly as they did from 0.3's separate
single-run stack, and a run's epoch is judged the same way alone or in a group (health, best validation)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ckptkd import config as config_mod
from ckptkd.training import loop as loop_mod
from ckptkd.training.api import make_teacher
from ckptkd.training.loop import Member, fit, fit_one

from conftest import REPO, manifest_json, tiny_config

LEGACY_COMMIT = "2cffec7"  # 0.3: the last commit whose single runs went through their own loop (trainer.fit)
RECORDED = REPO / "tests" / "data" / "legacy_runs_0.3.json"


def _fingerprints(src: Path, out: Path) -> dict:
    """tests/legacy_runs.py's scenarios trained by the ckptkd in `src`, in a fresh process on one thread."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "legacy_runs.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _legacy_sources(into: Path) -> Path | None:
    """0.3's src/ exported from this clone's git history, or None where the history is not here."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", LEGACY_COMMIT, "src"], capture_output=True)
    if archive.returncode != 0:
        return None
    into.mkdir()
    (into / "src.tar").write_bytes(archive.stdout)
    with tarfile.open(into / "src.tar") as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def test_single_runs_are_bit_identical_to_the_previous_single_run_loop(tmp_path):
    """Every scenario (a teacher; dropout with AdamW and warm-up; KD online, cached, from a snapshot ensemble by
    logit averaging, and at alpha 1) gives the same checkpoint sha256s and the same per-epoch records as 0.3's code.
    0.3 runs from git where the history is here; otherwise its fingerprints as recorded with it
    (tests/data/legacy_runs_0.3.json, same torch, one thread)."""
    now = _fingerprints(REPO / "src", tmp_path / "now")
    legacy_src = _legacy_sources(tmp_path / "legacy")
    if legacy_src is not None:
        before = _fingerprints(legacy_src, tmp_path / "before")
    else:
        import torch

        recorded = json.loads(RECORDED.read_text())
        if recorded["torch"] != torch.__version__:
            pytest.skip(f"no git history of {LEGACY_COMMIT} here, and the recorded fingerprints are of torch "
                        f"{recorded['torch']}, not {torch.__version__}")
        before = recorded["runs"]
    assert set(now) == set(before)
    for name in before:
        assert now[name]["checkpoints"] == before[name]["checkpoints"], name
        assert [_as_in_0_3(r) for r in now[name]["records"]] == before[name]["records"], name
        assert _as_in_0_3(now[name]["final"]) == before[name]["final"], name
        assert all({"val_top5", "test_top5"} <= set(r) for r in now[name]["records"])  # digits: 10 classes


# Recorded beside what 0.3 recorded, nothing else: top-5 and the paper's best-of-the-last-N (None unless asked for).
ADDED_SINCE_0_3 = {"val_top5", "test_top5", "test_top5_last_k", "test_acc_best_of_last", "best_of_last"}


def _as_in_0_3(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ADDED_SINCE_0_3}


# -- health, judged in one place --------------------------------------------------------------------------------------

# train_loss as the patched loop reports it, by epoch: it rises for 3 epochs in a row from epoch 3, by 50 %.
REPORTED_LOSS = {1: 1.0, 2: 0.8, 3: 0.9, 4: 1.0, 5: 1.2, 6: 1.1}


@pytest.fixture
def reported_losses(monkeypatch):
    """The loop's epoch routine, with each member's train_loss replaced by REPORTED_LOSS[epoch] (training itself is
    unchanged): what a run's health verdict is computed from."""
    real = loop_mod.train_epoch

    def train_epoch(*args, **kwargs):
        sums, lr, step = real(*args, **kwargs)
        epoch = kwargs["start_step"] // kwargs["steps_per_epoch"] + 1
        sums[:, 0] = sums[:, -1] * REPORTED_LOSS[epoch]
        return sums, lr, step

    monkeypatch.setattr(loop_mod, "train_epoch", train_epoch)


def _flags(run) -> list[tuple[str, int]]:
    return [(f["flag"], f["epoch"]) for f in manifest_json(run)["health"]["flags"]]


@pytest.mark.parametrize("engine", ["alone", "fused", "looped"])
def test_a_rising_loss_is_flagged_alike_alone_and_in_every_kind_of_group(reported_losses, tmp_path, engine):
    """The verdict needs the run's history, not the epoch alone (judging `[record]` flags nothing)."""
    cfg = config_mod.resolve(tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 6}))
    if engine == "alone":
        runs = [fit_one(Member(cfg, tmp_path / "alone"), quiet=True)]
    else:
        members = [Member(config_mod.resolve(cfg, {"seed": s, "name": f"s{s}"}), tmp_path / f"s{s}") for s in (0, 1)]
        runs = fit(members, quiet=True, engine=engine)
    for run in runs:
        assert _flags(run.path) == [("loss_rising", 5)]
        assert manifest_json(run.path)["health"]["ok"] is False
        assert "0.8 -> 1.2" in manifest_json(run.path)["health"]["flags"][0]["detail"]


def test_a_run_that_stops_on_a_non_finite_loss_is_unhealthy_alone_and_in_a_group(tmp_path, monkeypatch):
    real = loop_mod.train_epoch

    def nan_for_member_0_at_epoch_2(*args, **kwargs):
        sums, lr, step = real(*args, **kwargs)
        if kwargs["start_step"] == kwargs["steps_per_epoch"]:
            sums[0, 0] = float("nan")
        return sums, lr, step

    monkeypatch.setattr(loop_mod, "train_epoch", nan_for_member_0_at_epoch_2)
    cfg = config_mod.resolve(tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 3}))
    with pytest.raises(Exception, match="training loss is nan"):
        fit_one(Member(cfg, tmp_path / "alone"), quiet=True)
    members = [Member(config_mod.resolve(cfg, {"seed": s, "name": f"s{s}"}), tmp_path / f"s{s}") for s in (0, 1)]
    outcomes = fit(members, quiet=True, engine="fused")
    for folder in (tmp_path / "alone", tmp_path / "s0"):
        manifest = manifest_json(folder)
        assert manifest["status"] == "failed" and manifest["health"]["ok"] is False
        assert _flags(folder) == [("non_finite_loss", 2)]
    assert isinstance(outcomes[0], Exception) and manifest_json(tmp_path / "s1")["health"]["ok"] is True


def test_best_validation_is_tracked_alike_alone_and_in_a_group(teacher_run, tmp_path):
    """The run's recorded best validation epoch is the epoch of the highest val_acc in its own history."""
    cfg = config_mod.resolve(tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 4}))
    members = [Member(config_mod.resolve(cfg, {"seed": s, "name": f"s{s}"}), tmp_path / f"s{s}") for s in (0, 1, 2)]
    cfg_kd = config_mod.resolve(cfg, {"seed": 3, "name": "kd", "kd.teachers": [teacher_run.ref("0.5")]})
    members.append(Member(cfg_kd, tmp_path / "kd", make_teacher(cfg_kd, quiet=True), "distill"))
    runs = fit(members, quiet=True, engine="fused") + [fit_one(Member(cfg, tmp_path / "alone"), quiet=True)]
    for run in runs:
        records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        best = max(records, key=lambda r: (r["val_acc"], -r["epoch"]))  # the first epoch reaching the best
        final = manifest_json(run.path)["final"]
        assert (final["best_val_epoch"], final["best_val_acc"]) == (best["epoch"], best["val_acc"])
