import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ckptkd import train
from ckptkd.errors import UserError
from ckptkd.training.schedules import lr_at
from ckptkd.run.storage import load_tensors, sha256_file
from ckptkd.engine import checkpoint_epochs

from conftest import REPO, run_cli, tiny_config, manifest_json


def test_teacher_run_keeps_its_trajectory(teacher_run):
    run = teacher_run.path
    manifest = manifest_json(run)
    assert manifest["status"] == "complete" and manifest["kind"] == "train"
    # fractions 0.3/0.5/0.7/1.0 of 6 epochs -> 2, 3, 4, 6; every 2 -> 2, 4, 6
    assert [c["epoch"] for c in manifest["checkpoints"]] == [2, 3, 4, 6]
    for c in manifest["checkpoints"]:
        assert sha256_file(run / c["path"]) == c["sha256"]
        assert set(c["metrics"]) == {"train_loss", "train_acc", "val_loss", "val_acc", "test_acc"}
        assert 0.0 <= c["metrics"]["val_acc"] <= 1.0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 7))
    final = manifest["final"]
    assert final["epoch"] == 6 and final["test_acc"] == manifest["checkpoints"][-1]["metrics"]["test_acc"]
    assert 1 <= final["best_val_epoch"] <= 6
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["val_fraction"] == 0.1 and saved["schedule"]["epochs"] == 6  # every default filled in
    weights = load_tensors(run / manifest["checkpoints"][-1]["path"])
    assert any(k.endswith("running_mean") for k in weights)  # BatchNorm buffers are part of a checkpoint


def test_same_config_and_seed_give_bit_identical_weights(tmp_path):
    cfg = tiny_config(schedule={"epochs": 2})
    a = train(cfg, out=tmp_path / "a", quiet=True).manifest.to_dict()
    b = train(cfg, out=tmp_path / "b", quiet=True).manifest.to_dict()
    assert [c["sha256"] for c in a["checkpoints"]] == [c["sha256"] for c in b["checkpoints"]]
    c = train(tiny_config(seed=1, schedule={"epochs": 2}), out=tmp_path / "c", quiet=True).manifest.to_dict()
    assert c["checkpoints"][-1]["sha256"] != a["checkpoints"][-1]["sha256"]


def test_existing_run_folder_is_refused_without_resume(teacher_run):
    before = sha256_file(teacher_run.path / "manifest.json")
    with pytest.raises(UserError, match="already exists"):
        train(tiny_config(), out=teacher_run.path, quiet=True)
    assert sha256_file(teacher_run.path / "manifest.json") == before


def test_resume_of_a_complete_run_changes_nothing(teacher_run):
    before = sha256_file(teacher_run.path / "manifest.json")
    cfg = yaml.safe_load((teacher_run.path / "config.yaml").read_text())
    train(cfg, out=teacher_run.path, resume=True, quiet=True)
    assert sha256_file(teacher_run.path / "manifest.json") == before


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = tiny_config(schedule={"epochs": 2})
    train(cfg, out=tmp_path / "r", quiet=True)
    (tmp_path / "r" / "manifest.json").unlink()  # pretend it was interrupted: the state is still there
    with pytest.raises(UserError, match="schedule.epochs"):
        train(tiny_config(schedule={"epochs": 3}), out=tmp_path / "r", resume=True, quiet=True)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_resume_from_every_epoch_is_bit_identical(tmp_path, monkeypatch, optim):
    """Interrupted after epoch k (for every k) and resumed, a run ends with the uninterrupted run's weights."""
    folder_module = sys.modules["ckptkd.run.folder"]
    cfg = tiny_config(optim={"name": optim, "lr": 0.05 if optim == "sgd" else 0.003},
                      schedule={"name": "cosine", "epochs": 3, "warmup_epochs": 1})
    full = train(cfg, out=tmp_path / "full", quiet=True).manifest.checkpoints[-1].sha256
    save_state = folder_module.save_state
    for stop in (1, 2):
        def save_then_stop(path, model, optimizer, progress):
            save_state(path, model, optimizer, progress)
            if progress.epoch == stop:
                raise KeyboardInterrupt

        monkeypatch.setattr(folder_module, "save_state", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out=tmp_path / f"stop{stop}", quiet=True)
        assert manifest_json(tmp_path / f"stop{stop}")["status"] == "failed"
        monkeypatch.setattr(folder_module, "save_state", save_state)
        # what a write killed half-way leaves behind; resuming clears it
        stale = tmp_path / f"stop{stop}" / "state" / ".last.safetensors.x1y2z3.tmp"
        stale.write_bytes(b"half a checkpoint")
        resumed = train(cfg, out=tmp_path / f"stop{stop}", resume=True, quiet=True).manifest.to_dict()
        assert not stale.exists()
        assert resumed["status"] == "complete"
        assert resumed["checkpoints"][-1]["sha256"] == full


KILL_SEED = 20240917  # the kill moments are drawn from this seed; a failure names it and the delay to replay it


def test_kill_9_at_a_random_moment_then_resume_is_bit_identical(tmp_path):
    """A real subprocess, killed with SIGKILL mid-run (possibly mid-write), resumed with --resume."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(schedule={"epochs": 8}, checkpoints={"every": 1})))
    reference = run_cli("train", str(cfg_path), "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    ref_manifest = manifest_json(tmp_path / "ref")
    rng = random.Random(KILL_SEED)
    for attempt in range(2):
        delay = rng.uniform(0.0, 1.5)
        replay = f"(KILL_SEED={KILL_SEED}, attempt {attempt}: SIGKILL {delay:.3f} s after the first resume state)"
        out = tmp_path / f"killed{attempt}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "ckptkd", "train", str(cfg_path), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while not (out / "state" / "last.safetensors").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = run_cli("train", str(cfg_path), "--out", str(out), "--resume")
        assert resumed.returncode == 0, f"{replay}\n{resumed.stderr}"
        manifest = manifest_json(out)
        assert manifest["status"] == "complete", replay
        assert [c["sha256"] for c in manifest["checkpoints"]] == [c["sha256"] for c in ref_manifest["checkpoints"]], \
            replay
        for c in manifest["checkpoints"]:
            assert sha256_file(out / c["path"]) == c["sha256"], replay
        assert not list(out.rglob("*.tmp")), replay
        epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, 9)), replay


def test_checkpoint_epochs_mix_fractions_every_epochs_and_cycle_ends():
    from ckptkd import config

    cfg = config.resolve(tiny_config(schedule={"name": "snapshot", "epochs": 20, "cycles": 4},
                                     checkpoints={"fractions": [0.3], "every": 8, "epochs": [3]}))
    assert checkpoint_epochs(cfg) == [3, 5, 6, 8, 10, 15, 16, 20]


def test_learning_rate_schedules():
    base = {"epochs": 10, "milestones": [0.5, 8], "step_size": 3, "gamma": 0.1, "cycles": 2, "min_lr": 0.0,
            "warmup_epochs": 0}
    spe = 4
    lrs = lambda name, **kw: [lr_at({**base, "name": name, **kw}, 1.0, s, spe) for s in range(40)]
    step = lrs("step")
    assert step[0] == 1.0 and step[11] == 1.0 and step[12] == pytest.approx(0.1) and step[39] == pytest.approx(1e-3)
    multi = lrs("multistep")
    assert multi[19] == 1.0 and multi[20] == pytest.approx(0.1) and multi[32] == pytest.approx(0.01)
    cos = lrs("cosine")
    assert cos[0] == 1.0 and cos[20] == pytest.approx(0.5) and all(a >= b for a, b in zip(cos, cos[1:]))
    snap = lrs("snapshot")
    assert snap[0] == 1.0 and snap[20] == 1.0 and snap[19] < 0.01 and snap[39] < 0.01  # restart at the cycle end
    warm = lrs("cosine", warmup_epochs=2)
    assert warm[0] == pytest.approx(1 / 8) and warm[7] == pytest.approx(1.0) and warm[8] == pytest.approx(1.0)


def test_progress_state_is_not_pickle(teacher_run):
    raw = (teacher_run.path / "state" / "last.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert "progress" in json.loads(header["__metadata__"]["ckptkd"])


def test_the_same_config_trains_on_another_data_set(tmp_path):
    """`--set data.name=... --set data.root=...` is all it takes to move a config to other data."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(120, 16, 16, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 30)
    x[np.arange(120), :, :, y % 3] = 255  # a learnable signal: the class lights up a channel
    np.savez(tmp_path / "mine.npz", x_train=x, y_train=y, x_test=x[:40], y_test=y[:40])
    result = run_cli("train", str(REPO / "configs" / "digits_teacher.yaml"), "--out", str(tmp_path / "run"),
                     "--set", "data.name=npz", "--set", f"data.root={tmp_path / 'mine.npz'}",
                     "--set", "schedule.epochs=2", "--set", "data.batch_size=32")
    assert result.returncode == 0, result.stderr
    manifest = manifest_json(tmp_path / "run")
    assert manifest["model"]["in_channels"] == 3 and manifest["model"]["num_classes"] == 4
    assert manifest["data"]["image_shape"] == [3, 16, 16]


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_digits_config_trains_on_fashion_mnist(tmp_path):
    result = run_cli("train", str(REPO / "configs" / "digits_teacher.yaml"), "--out", str(tmp_path / "run"),
                     "--set", "data.name=fashion-mnist", "--set", "data.root=/usr/share/datasets/fashion-mnist",
                     "--set", "data.subset=256", "--set", "schedule.epochs=1", "--set", "data.val_fraction=0.01")
    assert result.returncode == 0, result.stderr
    manifest = manifest_json(tmp_path / "run")
    assert manifest["data"]["image_shape"] == [1, 28, 28] and manifest["data"]["train"] == 256


def test_bf16_precision_trains_and_records_itself(tmp_path):
    cfg = tiny_config(model={"name": "mlp", "widths": [32]}, schedule={"epochs": 2}, checkpoints={"fractions": [1.0]})
    fp32 = train(cfg, out=tmp_path / "fp32", quiet=True).manifest.to_dict()
    bf16 = train({**cfg, "precision": "bf16"}, out=tmp_path / "bf16", quiet=True).manifest.to_dict()
    assert bf16["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert bf16["checkpoints"][-1]["sha256"] != fp32["checkpoints"][-1]["sha256"]  # autocast really ran
    assert bf16["final"]["val_acc"] > 0.5 and math.isfinite(bf16["checkpoints"][-1]["metrics"]["train_loss"])
