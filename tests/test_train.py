import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ckptkd import train
from ckptkd.errors import UserError
from ckptkd.training.schedules import lr_at
from ckptkd.run.storage import load_tensors, sha256_file
from ckptkd.training.schedules import checkpoint_epochs

from conftest import REPO, run_cli, tiny_config, manifest_json


def test_teacher_run_keeps_its_trajectory(teacher_run):
    run = teacher_run.path
    manifest = manifest_json(run)
    assert manifest["status"] == "complete" and manifest["kind"] == "train"
    # fractions 0.3/0.5/0.7/1.0 of 6 epochs -> 2, 3, 4, 6; every 2 -> 2, 4, 6
    assert [c["epoch"] for c in manifest["checkpoints"]] == [2, 3, 4, 6]
    for c in manifest["checkpoints"]:
        assert sha256_file(run / c["path"]) == c["sha256"]
        assert set(c["metrics"]) == {"train_loss", "train_acc", "val_loss", "val_acc", "test_acc", "val_top5",
                                     "test_top5"}
        assert 0.0 <= c["metrics"]["val_acc"] <= c["metrics"]["val_top5"] <= 1.0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 7))
    final = manifest["final"]
    assert final["epoch"] == 6 and final["test_acc"] == manifest["checkpoints"][-1]["metrics"]["test_acc"]
    assert final["test_top5"] == manifest["checkpoints"][-1]["metrics"]["test_top5"]
    records = [json.loads(line) for line in lines]
    assert final["test_top5_last_k"] == pytest.approx(sum(r["test_top5"] for r in records[-final["last_k"]:])
                                                      / final["last_k"])
    assert 1 <= final["best_val_epoch"] <= 6
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["val_fraction"] == 0.1 and saved["schedule"]["epochs"] == 6  # every default filled in
    assert teacher_run.config() == saved
    weights = load_tensors(run / manifest["checkpoints"][-1]["path"])
    assert any(k.endswith("running_mean") for k in weights)  # BatchNorm buffers are part of a checkpoint


def _initial_and_saved_weights(run) -> tuple[dict, list[dict]]:
    """The weights a run started from (its seed, its model) and those of each saved checkpoint."""
    from ckptkd.models import from_spec

    manifest = run.manifest
    torch.manual_seed(manifest.seed)
    initial = from_spec(manifest.model).state_dict()
    return initial, [load_tensors(run.path / c.path) for c in manifest.checkpoints]


def test_same_config_and_seed_give_bit_identical_weights(tmp_path):
    """Identical and trained: a trainer that never updated the weights would also rerun "identically"."""
    cfg = tiny_config(schedule={"epochs": 2})
    a = train(cfg, out=tmp_path / "a", quiet=True)
    b = train(cfg, out=tmp_path / "b", quiet=True)
    assert [c.sha256 for c in a.manifest.checkpoints] == [c.sha256 for c in b.manifest.checkpoints]
    initial, saved = _initial_and_saved_weights(a)
    assert len(saved) == 2
    for weights in saved:  # every checkpoint moved from the initial weights, and the second from the first
        assert not torch.equal(weights["conv1.weight"], initial["conv1.weight"])
    assert not torch.equal(saved[0]["fc.weight"], saved[1]["fc.weight"])
    c = train(tiny_config(seed=1, schedule={"epochs": 2}), out=tmp_path / "c", quiet=True).manifest.to_dict()
    assert c["checkpoints"][-1]["sha256"] != a.manifest.checkpoints[-1].sha256


def test_existing_run_folder_is_refused_without_resume(teacher_run):
    before = sha256_file(teacher_run.path / "manifest.json")
    with pytest.raises(UserError, match="already exists"):
        train(tiny_config(), out=teacher_run.path, quiet=True)
    assert sha256_file(teacher_run.path / "manifest.json") == before


def test_resume_of_a_complete_run_changes_nothing(tmp_path, monkeypatch):
    """A run interrupted after epoch 1 is continued to the end by --resume (so resuming does something), and a
    second --resume of the completed run rewrites nothing: every file keeps its bytes."""
    import ckptkd.training.loop as loop_mod

    cfg = tiny_config(schedule={"epochs": 3}, checkpoints={"every": 1})
    real = loop_mod.train_epoch

    def interrupted_in_epoch_2(*args, **kwargs):
        if kwargs["start_step"] > 0:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "train_epoch", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "r", quiet=True)
    monkeypatch.setattr(loop_mod, "train_epoch", real)
    assert [c["epoch"] for c in manifest_json(tmp_path / "r")["checkpoints"]] == [1]
    run = train(cfg, out=tmp_path / "r", resume=True, quiet=True)
    assert run.manifest.complete and [c.epoch for c in run.manifest.checkpoints] == [1, 2, 3]
    before = {p: p.read_bytes() for p in sorted((tmp_path / "r").rglob("*")) if p.is_file()}
    again = train(cfg, out=tmp_path / "r", resume=True, quiet=True)
    assert again.manifest.complete
    assert {p: p.read_bytes() for p in sorted((tmp_path / "r").rglob("*")) if p.is_file()} == before


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = tiny_config(schedule={"epochs": 2})
    train(cfg, out=tmp_path / "r", quiet=True)
    (tmp_path / "r" / "manifest.json").unlink()  # pretend it was interrupted: the state is still there
    with pytest.raises(UserError, match="schedule.epochs"):
        train(tiny_config(schedule={"epochs": 3}), out=tmp_path / "r", resume=True, quiet=True)


@pytest.mark.parametrize("optim, model", [("sgd", "resnet8"), ("adamw", "resnet8"), ("sgd", "dropout-mlp"),
                                          ("sgd", "resnet8, accumulate 4"), ("sgd", "mlp, fp16")])
def test_resume_from_every_epoch_is_bit_identical(tmp_path, monkeypatch, optim, model):
    """Interrupted after epoch k (for every k) and resumed, a run ends with the uninterrupted run's weights. The
    dropout MLP draws its masks from the global RNG, which the resume state must restore (batch order and
    augmentation come from per-epoch generators and would not notice)."""
    folder_module = sys.modules["ckptkd.run.folder"]
    architecture = ({"name": "mlp", "widths": [32], "dropout": 0.3} if model == "dropout-mlp" else
                    {"name": "mlp", "widths": [32]} if model.startswith("mlp") else {"name": "resnet8"})
    cfg = tiny_config(optim={"name": optim, "lr": 0.05 if optim == "sgd" else 0.003,
                             "accumulate": 4 if "accumulate" in model else 1},
                      data={"batch_size": 16 if "accumulate" in model else 64}, model=architecture,
                      precision="fp16" if "fp16" in model else "fp32",
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
        assert manifest_json(tmp_path / f"stop{stop}")["status"] == "interrupted"
        monkeypatch.setattr(folder_module, "save_state", save_state)
        # what a write killed half-way leaves behind; resuming clears it
        stale = tmp_path / f"stop{stop}" / "state" / ".last.safetensors.x1y2z3.tmp"
        stale.write_bytes(b"half a checkpoint")
        resumed = train(cfg, out=tmp_path / f"stop{stop}", resume=True, quiet=True).manifest.to_dict()
        assert not stale.exists()
        assert resumed["status"] == "complete"
        assert resumed["checkpoints"][-1]["sha256"] == full


KILL_SEED = 20240917  # the kill moments are drawn from this seed; a failure names it and the delay to replay it


@pytest.mark.slow
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
    """The resume state is safetensors: tensors, and the progress as JSON in its header holding the run's history
    exactly as metrics.jsonl has it, its checkpoints as the manifest lists them and its best validation epoch."""
    raw = (teacher_run.path / "state" / "last.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    progress = json.loads(header["__metadata__"]["ckptkd"])["progress"]
    manifest = manifest_json(teacher_run.path)
    history = [json.loads(line) for line in (teacher_run.path / "metrics.jsonl").read_text().splitlines()]
    assert progress["epoch"] == 6 and progress["history"] == history
    fields = ("epoch", "step", "lr", "path", "sha256", "metrics")
    assert [{k: c[k] for k in fields} for c in progress["checkpoints"]] == [
        {k: c[k] for k in fields} for c in manifest["checkpoints"]]
    assert progress["best_val_epoch"] == manifest["final"]["best_val_epoch"]
    assert progress["step"] == history[-1]["step"] == 6 * manifest["steps_per_epoch"]
    assert {k for k in header if k != "__metadata__"} >= {"rng.torch", "model.fc.weight"}
    assert raw[8:8 + header_len].isascii() and b"\x80\x04" not in raw[:8 + header_len]  # no pickle protocol header


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


def test_sigterm_is_an_interruption_the_run_resumes_from_bit_identical(tmp_path):
    """SIGTERM (what `kill`, `docker stop`, systemd and Slurm's preemption send) mid-run: the conventional exit 143,
    the manifest says `interrupted` with the resume command on stderr, and --resume ends bit-identical."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(schedule={"epochs": 8}, checkpoints={"every": 1})))
    reference = run_cli("train", str(cfg_path), "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "ckptkd", "train", str(cfg_path), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "state" / "last.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    manifest = manifest_json(out)
    if proc.returncode == 0:  # it finished before the signal came: nothing to resume
        assert manifest["status"] == "complete"
    else:
        assert proc.returncode == 143, err
        # the command as it was typed: here `python -m ckptkd` (the interpreter by name where the shell finds it)
        on_path = shutil.which(Path(sys.executable).name)
        same = on_path and Path(on_path).resolve() == Path(sys.executable).resolve()
        python = shlex.quote(Path(sys.executable).name if same else sys.executable)
        assert f"ckptkd: interrupted by SIGTERM; continue with: {python} -m ckptkd train" in err
        assert err.rstrip().endswith("--resume")
        assert manifest["status"] == "interrupted" and manifest["error"] == "interrupted by SIGTERM"
        resumed = run_cli("train", str(cfg_path), "--out", str(out), "--resume")
        assert resumed.returncode == 0, resumed.stderr
    assert [c["sha256"] for c in manifest_json(out)["checkpoints"]] == [
        c["sha256"] for c in manifest_json(tmp_path / "ref")["checkpoints"]]


def test_top5_counts_a_label_among_the_five_highest_logits_and_is_left_out_below_six_classes():
    """Hand-made logits: the true class ranked 1st, 4th, 5th and 8th. A top-k of the wrong k, of the lowest logits,
    or of a single member breaks this."""
    from types import SimpleNamespace

    from ckptkd.training.loop import evaluate

    y = torch.tensor([0, 1, 2, 3])
    ranks = {0: 0, 1: 3, 2: 4, 3: 7}  # position of the true class, best first
    logits = torch.zeros(4, 10)
    for i, rank in ranks.items():
        order = [c for c in range(10) if c != int(y[i])]
        order.insert(rank, int(y[i]))
        logits[i, order] = torch.arange(10, 0, -1, dtype=torch.float32)
    data = SimpleNamespace(device=torch.device("cpu"), num_classes=10, eval_batches=lambda split, b: [(None, y)])
    two = evaluate(lambda x: torch.stack([logits, -logits]), data, "val", 4, members=2)
    assert two[0]["acc"] == 0.25 and two[0]["top5"] == 0.75  # the 1st, 4th and 5th are in, the 8th out
    assert two[1]["acc"] == 0.0 and two[1]["top5"] == 0.25  # negated: 10th, 7th, 6th and 3rd
    few = SimpleNamespace(device=torch.device("cpu"), num_classes=5, eval_batches=lambda split, b: [(None, y % 5)])
    assert evaluate(lambda x: logits[None, :, :5], few, "val", 4)[0]["top5"] is None


def test_the_papers_best_of_the_last_n_epochs_is_recorded_beside_the_last_k_mean(tmp_path):
    """eval.best_of_last = 3 of 5 epochs: those 3 are tested, and final carries their best; the last-k mean is the
    last 2, as asked. A max over the wrong tail, or over untested epochs, breaks this."""
    run = train(tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 5},
                            checkpoints={"fractions": [1.0]}, eval={"last_k": 2, "best_of_last": 3}),
                out=tmp_path / "run", quiet=True)
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    tested = [r["epoch"] for r in records if "test_acc" in r]
    assert tested == [3, 4, 5]
    final = run.manifest.final
    assert final.test_acc_best_of_last == max(r["test_acc"] for r in records[-3:]) and final.best_of_last == 3
    assert final.test_acc_last_k == pytest.approx(sum(r["test_acc"] for r in records[-2:]) / 2)
    plain = train(tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 2}), out=tmp_path / "plain",
                  quiet=True)
    assert plain.manifest.final.test_acc_best_of_last is None


def test_val_fraction_0_trains_on_every_image_and_validates_on_them(tmp_path, capsys):
    """The released code's setting (all 50k CIFAR images): every training image is trained on, the "val" numbers
    are the training images' (un-augmented), the manifest and a note say so; a held-out split stays the default."""
    from ckptkd import config, data as data_mod
    from ckptkd.models import from_spec
    from ckptkd.training.loop import evaluate

    cfg = tiny_config(data={"name": "digits", "batch_size": 64, "val_fraction": 0}, schedule={"epochs": 2},
                      checkpoints={"fractions": [1.0]})
    data_mod._NOTED_NO_VALIDATION.clear()  # the note is said once per process
    run = train(cfg, out=tmp_path / "all", quiet=True)
    assert "the \"val\" numbers" in capsys.readouterr().err
    described = manifest_json(run.path)["data"]
    held_out = manifest_json(train(tiny_config(schedule={"epochs": 1}), out=tmp_path / "held", quiet=True).path)
    assert described["val_is_train"] is True and "val_is_train" not in held_out["data"]
    assert described["train"] == described["val"] == held_out["data"]["train"] + held_out["data"]["val"]
    data = data_mod.build(config.resolve(cfg)["data"])
    model = from_spec(run.manifest.model)
    model.load_state_dict(load_tensors(run.path / run.manifest.checkpoints[-1].path))
    model.eval()
    on_training_images = evaluate(lambda x: model(x)[None], data, "train", 512)[0]["acc"]
    assert run.manifest.final.val_acc == pytest.approx(on_training_images)
