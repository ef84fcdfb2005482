"""The run folder's contract, end to end: crash windows, refusals, the loss the loop runs, what is recorded, the
health verdict, permissions, provenance, the CLI's messages, and study workers' failures.

Every test here is meant to fail on a broken implementation; the docstrings say which break each one catches.
"""

import json
import math
import os
import re
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

import ckptkd
from ckptkd import config as config_mod
from ckptkd import data as data_mod
from ckptkd import train
from ckptkd.training import health
from ckptkd.training.loop import evaluate
from ckptkd.training.objective import Objective
from ckptkd.training.recipe import cache_settings
from ckptkd.cli import main
from ckptkd.errors import UserError
from ckptkd.study.queue import ResultsDB
from ckptkd.run import resolve
from ckptkd.run.storage import read_tensors, sha256_file

from conftest import REPO, manifest_json, rewrite_manifest, run_cli, tiny_config

STUDENT = {"model": {"name": "mlp", "widths": [16]}, "schedule": {"epochs": 1}, "checkpoints": {"fractions": [1.0]}}


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def one_line_error(capsys, argv, *needles) -> str:
    """`ckptkd ARGV` in this process: exit 2 and exactly one line on stderr holding every needle."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def history(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- 1. the crash window before the first resume state -------------------------------------------------------------

def test_a_kill_before_the_first_state_resumes_to_the_uninterrupted_weights(tmp_path, capsys):
    """What a kill at start-up leaves (config, empty metrics, a manifest temporary) is continued by --resume."""
    cfg = tiny_config(schedule={"epochs": 2})
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    reference = train(cfg, out=tmp_path / "ref", quiet=True).manifest.checkpoints

    out = tmp_path / "killed"
    out.mkdir()
    (out / "config.yaml").write_text(config_mod.dump(config_mod.resolve(cfg)))
    (out / "metrics.jsonl").write_text("")
    temporary = out / ".manifest.json.k3j9x1.tmp"
    temporary.write_text('{"format": 1, "kind": "tra')  # half a manifest
    for half_written in ("checkpoints/.epoch-0001.safetensors.k3j9x1.tmp", "state/.last.safetensors.k3j9x1.tmp"):
        (out / half_written).parent.mkdir()
        (out / half_written).write_bytes(b"\0" * 10)  # killed writing the first checkpoint, the first state

    # Without --resume the folder is somebody's run: refused, and nothing in it changes.
    one_line_error(capsys, ["train", cfg_path, "--out", str(out)], "already exists", "--resume")
    assert temporary.exists() and sorted(p.name for p in out.iterdir()) == sorted(
        [".manifest.json.k3j9x1.tmp", "checkpoints", "config.yaml", "metrics.jsonl", "state"])

    assert main(["train", cfg_path, "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    manifest = manifest_json(out)
    assert manifest["status"] == "complete"
    assert [c["sha256"] for c in manifest["checkpoints"]] == [c.sha256 for c in reference]
    for c in manifest["checkpoints"]:
        assert sha256_file(out / c["path"]) == c["sha256"]
    assert not temporary.exists() and not list(out.rglob("*.tmp"))
    assert [h["epoch"] for h in history(out)] == [1, 2]
    assert config_mod.read_yaml(out / "config.yaml") == config_mod.resolve(cfg)


def test_resume_of_a_folder_not_there_yet_starts_the_run(tmp_path):
    """A script that always passes --resume: the first time there is nothing to continue, and the run is written
    as a fresh one (its config included)."""
    cfg = tiny_config(model={"name": "mlp", "widths": [8]}, schedule={"epochs": 1}, checkpoints={"fractions": [1.0]})
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        run = train(cfg, out=out, resume=True, quiet=True)
        assert run.manifest.complete and [c.epoch for c in run.manifest.checkpoints] == [1]
        assert config_mod.read_yaml(out / "config.yaml") == config_mod.resolve(cfg)


def test_each_checkpoint_records_its_fraction_of_the_run_and_names_itself(tmp_path):
    """The manifest's fraction (what `@0.5` selectors match) is epoch / epochs; each checkpoint file's own metadata
    names its epoch and model. (This test trains its own run: mutmut maps a test only to the code it runs itself, and
    the shared `teacher_run` is trained by whichever test asks for it first.)"""
    cfg = tiny_config(model={"name": "mlp", "widths": [8]}, schedule={"epochs": 3},
                      checkpoints={"fractions": [], "every": 1})
    run = train(cfg, out=tmp_path / "r", quiet=True)
    entries = manifest_json(run.path)["checkpoints"]
    assert [(c["epoch"], c["fraction"]) for c in entries] == [(1, pytest.approx(1 / 3, abs=1e-6)),
                                                             (2, pytest.approx(2 / 3, abs=1e-6)), (3, 1.0)]
    for c in entries:
        assert read_tensors(run.path / c["path"], what="checkpoint")[1] == {"epoch": c["epoch"], "model": "mlp"}


def test_an_out_that_is_a_file_is_refused_by_name(tmp_path):
    from ckptkd.run import RunWriter

    a_file = tmp_path / "results.csv"
    a_file.write_text("mine")
    for resume in (False, True):
        with pytest.raises(UserError, match=re.escape(str(a_file))):
            RunWriter.open(a_file, config_mod.resolve(tiny_config()), resume=resume)
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("name", ["notes.txt", "draft.tmp", ".notes"])
def test_resume_refuses_a_folder_holding_someone_elses_file(tmp_path, capsys, name):
    """--resume on a folder with no run state and a file that is not a run's: refused, the file untouched. A run's
    temporaries are hidden `.NAME....tmp` files: a visible .tmp file or a hidden non-.tmp one is somebody else's."""
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(schedule={"epochs": 1}))
    out = tmp_path / "mine"
    out.mkdir()
    notes = out / name
    notes.write_text("my thesis draft\n")
    one_line_error(capsys, ["train", cfg_path, "--out", str(out), "--resume"], str(out), "no ckptkd run state")
    assert notes.read_text() == "my thesis draft\n"
    assert [p.name for p in out.iterdir()] == [name]


def test_resume_refuses_a_config_that_adds_or_drops_a_setting(tmp_path):
    """The resume state's config against the one given: a key on one side only is a change too (a model argument
    given to one run and left to its default in the other)."""
    from ckptkd.run import RunWriter

    saved = config_mod.resolve(tiny_config(model={"name": "cnn", "dropout": 0.1}))
    out = tmp_path / "r"
    (out / "state").mkdir(parents=True)
    (out / "state" / "last.safetensors").write_bytes(b"")  # there is a resume state (open does not read it)
    (out / "config.yaml").write_text(config_mod.dump(saved))
    writer = RunWriter.open(out, saved, resume=True)
    assert writer.resumable
    writer.close()  # the folder's one-writer lock
    for cfg, changed in ((tiny_config(model={"name": "cnn"}), "model.dropout"),
                         (tiny_config(model={"name": "cnn", "dropout": 0.1, "hidden": 32}), "model.hidden")):
        with pytest.raises(UserError, match=re.escape(changed)):
            RunWriter.open(out, config_mod.resolve(cfg), resume=True)


# --- 2a. the loss the loop runs ------------------------------------------------------------------------------------

class FakeTeacher:
    """What `Objective.member_loss` needs of a teacher: `.logits(batch)` -> [M, B, C], and no view bank."""
    view_bank = None

    def __init__(self, logits: torch.Tensor):
        self._logits = logits

    def logits(self, batch):
        return self._logits


def reference_kd_loss(student, teachers, y, *, alpha, tau) -> tuple[float, float, float]:
    """alpha * CE + (1 - alpha) * tau^2 * KL(mean_m softmax(t_m / tau) || softmax(s / tau)), in float64."""
    s, t = student.double(), teachers.double()
    ce = -F.log_softmax(s, dim=1)[torch.arange(len(y)), y].mean()
    p = F.softmax(t / tau, dim=-1).mean(dim=0)
    log_q = F.log_softmax(s / tau, dim=1)
    kl = (p * (p.log() - log_q)).sum(dim=1).mean()
    kd = tau ** 2 * kl
    return float(alpha * ce + (1 - alpha) * kd), float(ce), float(kd)


def test_the_objective_is_alpha_ce_plus_one_minus_alpha_tau2_kl():
    """Swapping alpha and 1 - alpha (in the Objective or in kd_loss) breaks this: alpha weighs the CE term."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=gen) * 2
    teachers = torch.randn(3, 6, 5, generator=gen) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    kd = {"alpha": 0.1, "temperature": 4.0, "ensemble": "probs"}
    loss, terms = Objective([FakeTeacher(teachers)], [kd], 5, "cpu").member_loss(0, student, SimpleNamespace(y=y))
    want, ce, kd_term = reference_kd_loss(student, teachers, y, alpha=0.1, tau=4.0)
    assert abs(ce - kd_term) > 0.1  # so that weighting them the other way round gives another loss
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-5) and float(terms["kd"]) == pytest.approx(kd_term, rel=1e-5)
    # no teacher: plain cross-entropy
    plain, named = Objective([None], [kd], 5, "cpu").member_loss(0, student, SimpleNamespace(y=y))
    assert float(plain) == pytest.approx(ce, rel=1e-5) and named == {}


def test_a_distillation_records_the_loss_it_minimised(tmp_path, teacher_run):
    """train_loss in metrics.jsonl is alpha * train_ce + (1 - alpha) * train_kd with the config's alpha."""
    from ckptkd import distill

    alpha = 0.1
    distill(tiny_config(**STUDENT, kd={"alpha": alpha}), teachers=[teacher_run.ref("0.5")], out=tmp_path / "s",
            quiet=True)
    (record,) = history(tmp_path / "s")
    assert abs(record["train_ce"] - record["train_kd"]) > 0.05, record
    assert record["train_loss"] == pytest.approx(alpha * record["train_ce"] + (1 - alpha) * record["train_kd"],
                                                 rel=1e-5)


# --- 2b. kd.cache: auto --------------------------------------------------------------------------------------------

class FakeData:
    def __init__(self, distinct: int):
        self._distinct = distinct

    def distinct_views(self) -> int:
        return self._distinct


def test_cache_auto_caches_when_the_bank_costs_no_more_than_one_online_run():
    """Inverting the auto rule (caching when views > epochs) breaks this; on/off are forced either way."""
    def settings(cache, views, epochs, distinct=1000):
        cfg = config_mod.resolve(tiny_config(kd={"cache": cache, "views": views}, schedule={"epochs": epochs}))
        return cache_settings(cfg, FakeData(distinct))

    assert settings("auto", 4, 4) == {"views": 4, "cache_dir": None}
    assert settings("auto", 3, 4) == {"views": 3, "cache_dir": None}
    assert settings("auto", 5, 4) is None
    assert settings("auto", 32, 4, distinct=1000) is None
    assert settings("auto", 32, 4, distinct=3) == {"views": 32, "cache_dir": None}  # every view fits in the bank
    assert settings("auto", 32, 4, distinct=5) is None
    assert settings("on", 32, 4) == {"views": 32, "cache_dir": None}
    assert settings("off", 2, 4) is None


# --- 2c. a checkpoint's recorded accuracy ----------------------------------------------------------------------------

def test_a_checkpoints_recorded_val_acc_is_its_weights_validation_accuracy(teacher_run):
    """Recording the training accuracy (or another model's) as a checkpoint's val_acc breaks this."""
    cfg = teacher_run.config()
    data = data_mod.build(cfg["data"])
    checkpoints = resolve(f"{teacher_run.path}@all")
    assert len(checkpoints) == 4
    for c in checkpoints:
        model = c.build_model().eval()
        measured = evaluate(lambda x: model(x)[None], data, "val", cfg["data"]["eval_batch_size"])[0]
        assert measured["acc"] == c.metrics["val_acc"], c.reference
        assert measured["loss"] == pytest.approx(c.metrics["val_loss"], rel=1e-6)
        assert c.metrics["val_acc"] != c.metrics["train_acc"], c.reference
        test = evaluate(lambda x: model(x)[None], data, "test", cfg["data"]["eval_batch_size"])[0]
        assert test["acc"] == c.metrics["test_acc"], c.reference


# --- 3. runs that did not complete ---------------------------------------------------------------------------------

@pytest.fixture
def failed_teacher(tmp_path, teacher_run):
    run = tmp_path / "failed-teacher"
    shutil.copytree(teacher_run.path, run)
    manifest = manifest_json(run)
    manifest.update(status="failed", error="interrupted", final=None)
    rewrite_manifest(run, manifest)
    return run


def test_a_failed_teacher_is_refused_unless_allowed_and_then_recorded(tmp_path, capsys, failed_teacher):
    cfg_path = write_config(tmp_path / "student.yaml", tiny_config(**STUDENT))
    argv = ["distill", cfg_path, "--teacher", str(failed_teacher), "--out", str(tmp_path / "s")]
    one_line_error(capsys, argv, str(failed_teacher), "failed", "interrupted", "--allow-incomplete")
    assert not (tmp_path / "s").exists()

    assert main([*argv, "--allow-incomplete"]) == 0, capsys.readouterr().err
    student = manifest_json(tmp_path / "s")
    assert student["status"] == "complete" and student["allow_incomplete"] is True
    (teacher,) = student["teachers"]
    assert teacher["status"] == "failed" and teacher["epoch"] == 6


def test_analyze_and_select_refuse_a_failed_run(capsys, failed_teacher):
    for argv in (["analyze", str(failed_teacher), "--no-plots"], ["select", str(failed_teacher), "--by", "val"]):
        one_line_error(capsys, argv, str(failed_teacher), "failed", "--allow-incomplete")
    assert not (failed_teacher / "analysis.json").exists()
    assert main(["select", str(failed_teacher), "--by", "val", "--allow-incomplete"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{failed_teacher}@epoch=")


# --- 4. a data set with one class ----------------------------------------------------------------------------------

def test_a_one_class_folder_data_set_is_refused_before_any_run_folder_exists(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        folder = root / split / "only_class"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(data={"name": "folder", "root": str(root)}))
    one_line_error(capsys, ["train", cfg_path, "--out", str(tmp_path / "run")], str(root), "at least 2")
    assert not (tmp_path / "run").exists()


# --- 5. --help without torch ---------------------------------------------------------------------------------------

def test_help_and_argument_errors_do_not_import_torch():
    script = textwrap.dedent("""
        import sys
        from ckptkd.cli import main
        codes = []
        for argv in (["--help"], ["train"], ["train", "--help"], ["--version"]):
            try:
                main(argv)
            except SystemExit as e:
                codes.append(e.code)
        loaded = sorted(m for m in ("torch", "numpy", "safetensors") if m in sys.modules)
        print(codes, loaded, file=sys.stderr)
        assert "torch" not in sys.modules, loaded
        assert codes == [0, 2, 0, 0], codes
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: ckptkd" in result.stdout and "the following arguments are required: config" in result.stderr


# --- 6. no warnings -------------------------------------------------------------------------------------------------

def test_a_normal_run_prints_no_warning_even_with_a_progress_bar(tmp_path):
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(schedule={"epochs": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "-W", "default", "-m", "ckptkd", "train", cfg_path, "--out",
                             str(tmp_path / "run"), "--set", "log.progress=true"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "epoch 1/2" in result.stderr  # the bar was drawn
    assert "Warning" not in result.stderr and "warning:" not in result.stderr, result.stderr


# --- 7. interrupted, and resumed -----------------------------------------------------------------------------------

def test_an_interrupt_says_how_to_continue(tmp_path, capsys, monkeypatch):
    import ckptkd.training.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckptkd.training.api, "fit_one", interrupted)
    cfg_path = write_config(tmp_path / "my cfg.yaml", tiny_config())
    argv = ["train", cfg_path, "--out", str(tmp_path / "run"), "--set", "schedule.epochs=3"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == "ckptkd: interrupted; continue with: " + shlex.join(["ckptkd", *argv, "--resume"])
    assert main([*argv, "--resume"]) == 130  # interrupted again while resuming: --resume is not repeated
    assert capsys.readouterr().err.strip().endswith(shlex.join([*argv, "--resume"]))


def test_a_resumed_run_says_after_which_epoch(tmp_path, capsys, monkeypatch):
    folder_module = sys.modules["ckptkd.run.folder"]
    save_state = folder_module.save_state

    def save_then_stop(path, model, optimizer, progress):
        save_state(path, model, optimizer, progress)
        if progress.epoch == 2:
            raise KeyboardInterrupt

    cfg = tiny_config(schedule={"epochs": 3})
    monkeypatch.setattr(folder_module, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "run", quiet=True)
    monkeypatch.setattr(folder_module, "save_state", save_state)
    assert manifest_json(tmp_path / "run")["error"] == "interrupted"
    capsys.readouterr()
    train(cfg, out=tmp_path / "run", resume=True, quiet=False)
    err = capsys.readouterr().err
    assert f"resuming {tmp_path / 'run'} after epoch 2 of 3" in err, err
    assert manifest_json(tmp_path / "run")["status"] == "complete"


# --- 8. permissions -------------------------------------------------------------------------------------------------

def test_artefacts_get_the_umasks_ordinary_permissions(tmp_path):
    """Files written through mkstemp are 0600 unless fchmod'ed; an imported run's mkdtemp folder is 0700."""
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(schedule={"epochs": 2}))
    run, imported, pth = tmp_path / "run", tmp_path / "imported", tmp_path / "weights.pth"
    script = textwrap.dedent(f"""
        import os, sys
        os.umask(0o022)  # before anything of ckptkd is imported: storage reads the umask once
        import torch
        torch.set_num_threads(1)
        from ckptkd.cli import main
        assert main(["train", {cfg_path!r}, "--out", {str(run)!r}]) == 0
        from ckptkd.run.storage import load_tensors
        torch.save(load_tensors({str(run / "checkpoints" / "epoch-0002.safetensors")!r}), {str(pth)!r})
        assert main(["import", {str(pth)!r}, "--model", "resnet8", "--out", {str(imported)!r}]) == 0
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    files = [run / "config.yaml", run / "manifest.json", run / "metrics.jsonl", run / "state" / "last.safetensors",
             *sorted((run / "checkpoints").iterdir())]
    assert len(files) == 6
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in files} == {
        str(p.relative_to(tmp_path)): "0o644" for p in files}
    for folder in (run, run / "checkpoints", run / "state", imported, imported / "checkpoints"):
        assert mode(folder) == 0o755, (folder, oct(mode(folder)))
    imported_files = [p for p in imported.rglob("*") if p.is_file()]
    assert len(imported_files) == 4
    assert all(mode(p) == 0o644 for p in imported_files), [(str(p), oct(mode(p))) for p in imported_files]


# --- 9. provenance and health ---------------------------------------------------------------------------------------

def test_the_manifest_records_version_commit_and_a_healthy_verdict(teacher_run):
    manifest = manifest_json(teacher_run.path)
    assert manifest["ckptkd"]["version"] == ckptkd.__version__
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                         text=True)
    top, _, commit = git.stdout.strip().partition("\n")
    # this checkout (not a copy inside another repository's tree, such as mutmut's mutants/): its commit is recorded
    if git.returncode == 0 and Path(top).resolve() == REPO.resolve() and (REPO / "src" / "ckptkd").is_dir():
        assert manifest["ckptkd"]["commit"] == commit
        assert re.fullmatch(r"[0-9a-f]{40}", manifest["ckptkd"]["commit"])
        assert isinstance(manifest["ckptkd"]["dirty"], bool)
    assert manifest["health"] == {"ok": True, "flags": []}


def test_a_diverging_run_is_flagged(tmp_path):
    """A learning rate warmed up to 3.0 drives this run off after epoch 3 (deterministic at seed 0, 1 thread)."""
    cfg = tiny_config(optim={"lr": 3.0}, schedule={"name": "constant", "warmup_epochs": 5, "epochs": 6})
    run = train(cfg, out=tmp_path / "run", quiet=True)
    verdict = manifest_json(run.path)["health"]
    assert verdict["ok"] is False
    # Here both (loss 0.48 -> 2.16 over epochs 3-6, train accuracy 85% -> 41%); either alone would be a verdict.
    names = [f["flag"] for f in verdict["flags"]]
    assert names and set(names) <= {"loss_rising", "accuracy_collapse"}, verdict
    assert verdict == health.assess(history(run.path))  # the manifest's verdict is that of its own history
    assert manifest_json(run.path)["status"] == "complete"  # flagged, not stopped: the loss stayed finite


def _records(losses, accs=None):
    accs = accs or [0.5] * len(losses)
    return [{"epoch": i + 1, "train_loss": loss, "train_acc": acc} for i, (loss, acc) in enumerate(zip(losses, accs))]


def test_health_assess_on_synthetic_histories():
    assert health.assess([]) == {"ok": True, "flags": []}
    rising = health.assess(_records([2.0, 1.0, 1.05, 1.1, 1.2, 1.0]))
    assert not rising["ok"] and [(f["flag"], f["epoch"]) for f in rising["flags"]] == [("loss_rising", 5)]
    # noisy but falling: never three rises in a row
    assert health.assess(_records([2.0, 1.8, 1.9, 1.6, 1.7, 1.4, 1.5, 1.2, 1.3, 1.0]))["ok"]
    # three rises in a row, but by less than RISING_TOTAL in all: noise on a plateau
    assert health.assess(_records([1.0, 1.01, 1.02, 1.03, 1.02]))["ok"]
    collapse = health.assess(_records([2.0, 1.0, 0.9, 0.8], accs=[0.5, 0.8, 0.55, 0.9]))
    assert [(f["flag"], f["epoch"]) for f in collapse["flags"]] == [("accuracy_collapse", 3)]
    assert "80.0%" in collapse["flags"][0]["detail"] and "epoch 2" in collapse["flags"][0]["detail"]
    assert health.assess(_records([2.0, 1.0, 0.9], accs=[0.5, 0.8, 0.65]))["ok"]  # a 15-point dip is no collapse
    assert health.describe(collapse).startswith("accuracy_collapse at epoch 3: ")


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_epoch(tmp_path, capsys, monkeypatch):
    import ckptkd.training.loop

    real = ckptkd.training.loop.train_epoch

    def nan_at_epoch_2(*args, **kwargs):
        sums, lr, step = real(*args, **kwargs)
        if kwargs["start_step"] == kwargs["steps_per_epoch"]:  # the epoch being trained is 2
            sums[:, 0] = math.nan
        return sums, lr, step

    monkeypatch.setattr(ckptkd.training.loop, "train_epoch", nan_at_epoch_2)
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(schedule={"epochs": 3}, checkpoints={"every": 1}))
    out = tmp_path / "run"
    assert main(["train", cfg_path, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("epoch    1/3") and len(err) == 2, err  # epoch 1's log line, then the error
    assert err[1].startswith("ckptkd: error: epoch 2: the training loss is nan") and "Traceback" not in err[1]
    assert "the last good state is epoch 1" in err[1]
    manifest = manifest_json(out)
    assert manifest["status"] == "failed" and "nan" in manifest["error"]
    assert [c["epoch"] for c in manifest["checkpoints"]] == [1]
    assert sha256_file(out / manifest["checkpoints"][0]["path"]) == manifest["checkpoints"][0]["sha256"]
    assert not (out / "checkpoints" / "epoch-0002.safetensors").exists()
    assert read_tensors(out / "state" / "last.safetensors", what="resume state")[1]["progress"]["epoch"] == 1
    assert [h["epoch"] for h in history(out)] == [1]
    with pytest.raises(UserError, match="allow-incomplete"):
        resolve(str(out))


# --- 10. study workers ----------------------------------------------------------------------------------------------

def test_a_study_task_raising_a_plain_error_is_recorded_and_retried_up_to_max_attempts(tmp_path, monkeypatch):
    import ckptkd.study.execution
    from ckptkd.errors import RunsFailed
    from ckptkd.study.runner import run_study

    run = {"data": {"name": "digits", "batch_size": 64}, "device": "cpu",
           "log": {"progress": False, "tensorboard": False}}
    study = {"name": "oom", "seeds": 1, "variants": ["none"], "max_attempts": 3,
             "pairs": [{"teacher": {**run, "model": {"name": "resnet8"}, "schedule": {"epochs": 2}},
                        "student": {**run, **STUDENT}}]}
    real, calls = ckptkd.study.execution._execute, []

    def execute(task, study_dir, db):
        calls.append(task["kind"])
        if task["kind"] == "train":
            raise RuntimeError("out of memory")
        return real(task, study_dir, db)

    monkeypatch.setattr(ckptkd.study.execution, "_execute", execute)
    out = tmp_path / "s"
    with pytest.raises(RunsFailed, match="1 runs failed for good"):  # after the student: the study went on
        run_study(study, out=out, quiet=True, report=False)
    # three attempts (the study key, not the database default of 2), then the independent student
    assert calls == ["train", "train", "train", "distill"]
    rows = {r["kind"]: r for r in ResultsDB(out / "results.sqlite").rows()}
    assert (rows["train"]["status"], rows["train"]["attempts"]) == ("failed", 3)
    assert rows["train"]["error"] == "RuntimeError: out of memory"
    assert rows["analyze"]["status"] == "pending" and rows["distill"]["status"] == "complete"
    with ResultsDB(out / "results.sqlite", max_attempts=3) as db:
        assert [r["kind"] for r in db.blocked()] == ["analyze"] and db.pending_count() == 0


def test_a_stale_claim_on_the_last_attempt_is_marked_failed_on_the_next_claim(tmp_path):
    path = tmp_path / "results.sqlite"
    first = ResultsDB(path, max_attempts=2)
    first.add("t0", kind="teacher", name="t0", config={}, path="runs/t0")
    first.add("s0", kind="student", name="s0", config={}, path="runs/s0", depends_on=["t0"])
    first.claim()
    first.fail("t0", error="flaky")
    assert first.claim()["attempts"] == 2  # the last allowed attempt, now running

    other = ResultsDB(path, max_attempts=2, stale_after_s=60.0)
    assert other.claim() is None  # fresh heartbeat, live pid: the claim stands
    assert other.rows(run_id="t0")[0]["status"] == "running"

    with sqlite3.connect(path) as forge:  # its worker went silent two minutes ago
        forge.execute("UPDATE runs SET heartbeat = heartbeat - 120 WHERE run_id = 't0'")
    assert other.claim() is None  # nothing to take: t0 has used its attempts, s0 waits for it
    (row,) = other.rows(run_id="t0")
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert "died during attempt 2 of 2" in row["error"] and row["claimer"] in row["error"]
    assert [r["run_id"] for r in other.blocked()] == ["s0"] and other.pending_count() == 0
    first.close()
    other.close()


def test_a_shared_folder_loses_only_the_temporaries_of_dead_ckptkd_writers(tmp_path):
    """Teacher caches, analyses and study folders are shared, and may be the user's own folders (`kd.cache_dir`,
    a study's --out): only ckptkd's own temporaries whose writer is gone are removed, never another program's."""
    import time

    from ckptkd.run.storage import _HOST, remove_stale_temporaries

    hours_ago = time.time() - 2 * 3600
    files = {
        "dead": f".logits.safetensors.{_HOST}-{2**22 + 12345}.ab12cd34.tmp",  # no such pid
        "old-elsewhere": ".logits.safetensors.otherhost-77.ab12cd34.tmp",
        "alive": f".logits.safetensors.{_HOST}-{os.getpid()}.ab12cd34.tmp",
        "elsewhere": ".logits.safetensors.otherhost-77.ef56ab78.tmp",
        "editor": ".notes.txt.tmp",
        "old-editor": ".draft.tmp",
    }
    for key, name in files.items():
        (tmp_path / name).write_text(key)
        if key.startswith("old"):
            os.utime(tmp_path / name, (hours_ago, hours_ago))
    removed = {p.name for p in remove_stale_temporaries(tmp_path, shared=True)}
    assert removed == {files["dead"], files["old-elsewhere"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files[k] for k in
                                                                ("alive", "elsewhere", "editor", "old-editor"))


# --- 11. one writer per run folder ---------------------------------------------------------------------------------

def test_a_run_folder_has_one_writer_a_live_holder_is_named_and_a_dead_ones_lock_taken_over(tmp_path):
    """--resume into a folder another live process is training is refused, naming its host and pid; once that
    process is gone its lock is taken over; a finished run leaves no lock behind."""
    import socket

    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(schedule={"epochs": 40}))
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "ckptkd", "train", cfg_path, "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "state" / "last.safetensors").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = run_cli("train", cfg_path, "--out", str(out), "--resume")
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert (f"is being written by another process (host {socket.gethostname()}, pid {first.pid})"
                in second.stderr)
    finally:
        first.kill()
        first.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid  # killed: its lock stays behind
    resumed = run_cli("train", cfg_path, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert manifest_json(out)["status"] == "complete" and not (out / ".lock").exists()


def test_two_processes_starting_one_run_folder_at_once_one_trains_and_the_other_is_refused(tmp_path):
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(schedule={"epochs": 2}))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "ckptkd", "train", cfg_path, "--out", str(out)]
    procs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "Traceback" not in refused and ("being written by another process" in refused
                                           or "already exists" in refused), refused
    assert manifest_json(out)["status"] == "complete"


def test_a_lock_of_a_dead_process_or_of_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    import socket

    from ckptkd.run import RunWriter
    from ckptkd.run.lock import LOCK

    cfg = config_mod.resolve(tiny_config())
    folder = tmp_path / "run"
    folder.mkdir()
    dead = {"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "job": None}
    (folder / LOCK).write_text(json.dumps(dead))
    writer = RunWriter.open(folder, cfg, resume=True)
    assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    writer.close()
    assert list(folder.iterdir()) == []  # the lock is given back
    alive = {"host": socket.gethostname(), "pid": os.getppid(), "job": None}
    (folder / LOCK).write_text(json.dumps(alive))
    with pytest.raises(UserError, match=f"pid {os.getppid()}"):
        RunWriter.open(folder, cfg, resume=True)
    assert json.loads((folder / LOCK).read_text()) == alive  # a live holder's lock is left alone
    elsewhere = {"host": "node-17", "pid": os.getppid(), "job": "4242"}
    (folder / LOCK).write_text(json.dumps(elsewhere))
    with pytest.raises(UserError, match="host node-17, pid .*Slurm job 4242"):
        RunWriter.open(folder, cfg, resume=True)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued onto this node
    RunWriter.open(folder, cfg, resume=True).close()

# --- 12. a whole run written at once (imports, benchmarks), folders of runs, which files carry seals --------------

def _whole_run(tmp_path, out, checkpoints=None, history=None):
    from ckptkd.run import Manifest, write_run

    cfg = config_mod.resolve(tiny_config(model={"name": "mlp", "widths": [4]}))
    manifest = Manifest(kind="import", name="imported", model={"name": "mlp", "widths": [4]}, data={"name": "digits"},
                        seed=None, epochs=4, status="complete")
    if checkpoints is None:
        checkpoints = [({"epoch": e, "step": 10 * e, "fraction": e / 4, "lr": 0.1, "metrics": {"val_acc": e / 10}},
                        {"w": torch.full((2, 3), float(e)), "b": torch.arange(3.0) * e}) for e in (2, 4)]
    return cfg, write_run(out, cfg, manifest, checkpoints, history=history)


def test_the_folder_a_killed_import_was_building_is_removed_by_the_next_write_beside_it(tmp_path):
    """An import SIGKILLed while building its hidden folder leaves it behind; the next whole-run write into the same
    parent removes it (its writer is gone), and leaves alone one whose writer is alive (this process's)."""
    import subprocess
    import sys

    parent = tmp_path / "runs"
    parent.mkdir()
    child = subprocess.run([sys.executable, "-c", (
        "import os, sys, tempfile; from pathlib import Path\n"
        "from ckptkd.run.storage import temporary_name\n"
        "d = Path(tempfile.mkdtemp(prefix=temporary_name(Path(sys.argv[1])), suffix='.tmp', dir=sys.argv[2]))\n"
        "(d / 'checkpoints').mkdir(); (d / 'checkpoints' / 'epoch-0001.safetensors').write_bytes(b'half')\n"
        "print(d.name); os.kill(os.getpid(), 9)"), str(parent / "imported"), str(parent)],
        capture_output=True, text=True)
    left = parent / child.stdout.strip()
    assert child.returncode == -9 and left.is_dir()
    from ckptkd.run.storage import temporary_name

    live = parent / (temporary_name(parent / "other") + "x.tmp")
    live.mkdir()
    _whole_run(tmp_path, parent / "second")
    assert sorted(p.name for p in parent.iterdir()) == sorted(["second", live.name])


def test_write_run_writes_a_whole_run_that_reads_back(tmp_path):
    out = tmp_path / "deep" / "er" / "imported"  # its parents are made too
    history = [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.5}]
    cfg, run = _whole_run(tmp_path, out, history=history)
    assert run.path == out and sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml",
                                                                        "manifest.json", "metrics.jsonl"]
    assert [p.name for p in out.parent.iterdir()] == ["imported"]  # no temporary folder left beside it
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's private 0700
    manifest = run.manifest
    assert manifest.name == "imported" and manifest.complete
    assert [(c.epoch, c.step, c.fraction, c.lr, c.metrics, c.path) for c in manifest.checkpoints] == [
        (2, 20, 0.5, 0.1, {"val_acc": 0.2}, "checkpoints/epoch-0002.safetensors"),
        (4, 40, 1.0, 0.1, {"val_acc": 0.4}, "checkpoints/epoch-0004.safetensors")]
    for c in manifest.checkpoints:
        assert sha256_file(out / c.path) == c.sha256
        tensors, metadata = read_tensors(out / c.path, what="checkpoint")
        assert torch.equal(tensors["w"], torch.full((2, 3), float(c.epoch))) and metadata == {"epoch": c.epoch,
                                                                                            "model": "mlp"}
    assert config_mod.read_yaml(out / "config.yaml") == cfg and run.config() == cfg
    assert history_of(out) == history
    _, bare = _whole_run(tmp_path, tmp_path / "bare")
    assert (bare.path / "metrics.jsonl").read_text() == ""


def history_of(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_run_refuses_an_existing_run_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    from ckptkd.run import folder as folder_mod

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    for out in (taken, a_file):
        with pytest.raises(UserError, match="already exists"):
            _whole_run(tmp_path, out)
    assert (taken / "mine.txt").read_text() == "keep" and a_file.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _whole_run(tmp_path, empty)[1].manifest.complete  # an empty folder is no run: it is filled
    before = sorted(p.name for p in tmp_path.iterdir())
    broken = [({"epoch": 1, "step": 1, "fraction": 0.5, "lr": 0.1, "metrics": {}}, {"w": torch.zeros(2)}),
              ({"epoch": 2, "step": 2, "fraction": 1.0, "lr": 0.1, "metrics": {}}, {"w": "not a tensor"})]
    building, real_save = [], folder_mod.save_tensors

    def save_tensors(path, *args, **kwargs):
        building.append(Path(path))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(folder_mod, "save_tensors", save_tensors)
    with pytest.raises(AttributeError):
        _whole_run(tmp_path, tmp_path / "half", checkpoints=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # neither the run nor its temporary folder
    # It was built beside --out under a hidden .tmp name: what a kill leaves is no run to `runs_under`, and is
    # recognisably ckptkd's temporary.
    folder = building[0].parent.parent
    assert folder.parent == tmp_path and folder.name.startswith(".half.") and folder.name.endswith(".tmp")


def test_runs_under_finds_the_outermost_runs_and_skips_hidden_folders(tmp_path):
    from ckptkd.run import runs_under

    root = tmp_path / ".cache" / "students"  # a hidden folder above the one searched does not hide its runs
    for run in ("s0", "grid/s1", "s0/inner", ".trash/s2", "grid/.old/s3"):
        (root / run).mkdir(parents=True)
        (root / run / "manifest.json").write_text("{}")
    assert runs_under(root) == [root / "grid" / "s1", root / "s0"]
    assert runs_under(root / "s0") == [root / "s0"]


def test_a_run_reads_as_its_path(tmp_path):
    from ckptkd.run import Run

    run = Run(tmp_path / "r")
    assert str(run) == os.fspath(run) == str(tmp_path / "r") and repr(run) == f"Run({str(tmp_path / 'r')!r})"
    assert run.ref() == f"{tmp_path / 'r'}@last" and run.ref("0.5") == f"{tmp_path / 'r'}@0.5"


@pytest.mark.parametrize("written, sealed", [
    ({"ckptkd": {"version": "0.2.9"}}, False), ({"ckptkd": {"version": "0.3"}}, True),
    ({"ckptkd": {"version": "0.3.0"}}, True), ({"ckptkd": {"version": "0.10.1"}}, True),
    ({"ckptkd": {"version": "1.0"}}, True), ({"ckptkd": {}}, False), ({}, False), ({"ckptkd": "0.4"}, False),
    ({"ckptkd": {"version": "0.4.dev1+g1234"}}, True), ({"ckptkd": {"version": "garbage"}}, True),
])
def test_manifests_and_analyses_carry_a_seal_from_ckptkd_0_3_on(written, sealed):
    """A file without a checksum is damaged if its version says ckptkd 0.3 or later wrote it (or is no version
    ckptkd wrote); a 0.2 file, or one that names no version, never had one."""
    from ckptkd.run.folder import sealed_since_0_3

    assert sealed_since_0_3(written) is sealed
