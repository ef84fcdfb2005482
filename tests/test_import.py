"""`ckptkd import`: trajectories written exactly as other trainers write them become ordinary multi-checkpoint runs
on which analyze, select and distill RUN@0.5 work unchanged.

Each writer below reproduces one trainer's files (names, dict keys, prefixes, the copies it keeps beside the
per-epoch files) from that trainer's own saving code; Lightning's are written by Lightning itself."""

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptkd import distill
from ckptkd.selection.analysis import analyze, select
from ckptkd.errors import UserError
from ckptkd.training.importer import import_trajectory
from ckptkd.run import Run, resolve
from ckptkd.run.storage import sha256_file

from conftest import call_cli, tiny_config

STUDENT = {"model": {"name": "mlp", "widths": [32]}, "schedule": {"epochs": 2}, "checkpoints": {"fractions": [1.0]}}


@pytest.fixture(scope="module")
def trajectory(teacher_run):
    """(epoch, state_dict, val_acc) of every checkpoint of the shared digits resnet8 teacher (epochs 2, 3, 4, 6)."""
    run = Run(teacher_run.path)
    return [(c.epoch, resolve(f"{run.path}@epoch={c.epoch}")[0].state_dict(), c.metrics["val_acc"])
            for c in run.manifest.checkpoints]


def _optimizer_state(state):
    """What `optimizer.state_dict()` of SGD with momentum holds: integers, floats, lists and tensors."""
    names = [k for k, v in state.items() if v.is_floating_point() and "running" not in k]
    return {"state": {i: {"momentum_buffer": torch.zeros_like(state[k])} for i, k in enumerate(names)},
            "param_groups": [{"lr": 0.05, "momentum": 0.9, "dampening": 0, "weight_decay": 5e-4, "nesterov": False,
                              "params": list(range(len(names)))}]}


def _dataparallel(state):
    return {f"module.{k}": v for k, v in state.items()}


class _Payload:
    """Runs a shell command when unpickled: the files below carry one where a trainer keeps arbitrary pickles."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def write_repdistiller(folder: Path, trajectory):
    # train_teacher.py: every save_freq epochs ckpt_epoch_{epoch}.pth, the best as {model}_best.pth and, at the end,
    # {model}_last.pth holding the argparse options.
    for epoch, state, acc in trajectory:
        torch.save({"epoch": epoch, "model": _dataparallel(state), "accuracy": 100 * acc,
                    "optimizer": _optimizer_state(state)}, folder / f"ckpt_epoch_{epoch}.pth")
    epoch, state, acc = trajectory[-1]
    torch.save({"epoch": epoch, "model": state, "best_acc": 100 * acc, "optimizer": _optimizer_state(state)},
               folder / "resnet8_best.pth")
    torch.save({"opt": argparse.Namespace(model="resnet8", epochs=epoch), "model": state}, folder / "resnet8_last.pth")
    return {}


def write_mdistiller(folder: Path, trajectory):
    # mdistiller/engine/trainer.py: extension-less epoch_{N} (the DataParallel distiller: module.student.*) and
    # student_{N} (the student alone) every SAVE_CHECKPOINT_FREQ epochs, plus latest/best copies of both.
    for epoch, state, acc in trajectory:
        whole = {"epoch": epoch, "model": {f"module.student.{k}": v for k, v in state.items()},
                 "optimizer": _optimizer_state(state), "best_acc": 100 * acc}
        for name in (f"epoch_{epoch}", "latest", "best"):
            torch.save(whole, folder / name)
        for name in (f"student_{epoch}", "student_latest", "student_best"):
            torch.save({"model": state}, folder / name)
    return {}


def write_checkpointkd(folder: Path, trajectory):
    # The paper's released teacher.py: {save}desemble_epoch/teacher_ckpt/{arch}{i+1}_teacher{epoch // epo}_ckpt.pth.tar
    # with the DataParallel model's state under "model_state" and the 1-based epoch.
    for k, (epoch, state, acc) in enumerate(trajectory, start=1):
        torch.save({"epoch": epoch, "model_state": _dataparallel(state), "optim_state": _optimizer_state(state),
                    "best_valid_acc": 100 * acc}, folder / f"resnet81_teacher{k}_ckpt.pth.tar")
    return {}


def write_timm(folder: Path, trajectory):
    # timm's CheckpointSaver: checkpoint-{epoch}.pth.tar with the 0-based epoch index, the arguments as an
    # argparse.Namespace, version 2, the eval metric; last.pth.tar and model_best.pth.tar beside them.
    args = argparse.Namespace(model="resnet8", epochs=6, lr=0.05, batch_size=64, sched="step")
    for epoch, state, acc in trajectory:
        save = {"epoch": epoch - 1, "arch": "resnet8", "state_dict": state, "optimizer": _optimizer_state(state),
                "version": 2, "args": args, "metric": 100 * acc}
        torch.save(save, folder / f"checkpoint-{epoch - 1}.pth.tar")
        torch.save(save, folder / "last.pth.tar")
    torch.save(save, folder / "model_best.pth.tar")
    return {}


def write_hf(folder: Path, trajectory):
    # transformers.Trainer: checkpoint-{global_step}/ with model.safetensors (metadata format=pt), trainer_state.json
    # (epoch as a float, the log history so far), optimizer.pt and training_args.bin, a pickle of the arguments that
    # an importer must never open (this one runs a command if it is).
    steps_per_epoch = 24
    history = []
    for epoch, state, acc in trajectory:
        step = epoch * steps_per_epoch
        history += [{"epoch": float(epoch), "grad_norm": 1.0, "learning_rate": 0.05, "loss": 0.5, "step": step},
                    {"epoch": float(epoch), "eval_accuracy": acc, "eval_loss": 0.3, "eval_runtime": 0.1,
                     "step": step}]
        ckpt = folder / f"checkpoint-{step}"
        ckpt.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, ckpt / "model.safetensors", metadata={"format": "pt"})
        (ckpt / "trainer_state.json").write_text(json.dumps({
            "best_metric": None, "best_model_checkpoint": None, "epoch": float(epoch), "eval_steps": steps_per_epoch,
            "global_step": step, "is_hyper_param_search": False, "is_local_process_zero": True,
            "is_world_process_zero": True, "log_history": list(history), "logging_steps": steps_per_epoch,
            "max_steps": 6 * steps_per_epoch, "num_train_epochs": 6, "save_steps": steps_per_epoch,
            "total_flos": 0.0, "train_batch_size": 64, "trial_name": None, "trial_params": None}, indent=2))
        torch.save(_optimizer_state(state), ckpt / "optimizer.pt")
        with open(ckpt / "training_args.bin", "wb") as f:
            pickle.dump(_Payload(folder / "pwned"), f)
    return {}


def write_state_dict(folder: Path, trajectory):
    for epoch, state, _ in trajectory:
        torch.save(state, folder / f"resnet8_epoch{epoch}.pt")
    return {"epochs": 6}


def write_lightning(folder: Path, trajectory):
    """Lightning writes these itself: ModelCheckpoint keeps every epoch's epoch=E-step=S.ckpt (plus last.ckpt), the
    weights named by the module's attribute (`model.`), the hyper-parameters in an AttributeDict."""
    lightning = pytest.importorskip("lightning")
    from ckptkd import config as config_mod, data as data_mod
    from ckptkd.models import create

    digits = data_mod.build(config_mod.resolve(tiny_config())["data"])
    images, labels = digits.train_x.float(), digits.train_y

    class Module(lightning.LightningModule):
        def __init__(self, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.model = create("resnet8", num_classes=10, in_channels=1)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:256], labels[:256]), batch_size=64)
    saver = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1,
                                                        save_last=True)
    trainer = lightning.Trainer(max_epochs=4, accelerator="cpu", devices=1, callbacks=[saver], logger=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder)
    trainer.fit(Module(), loader)
    return {"strip_prefix": "model.", "epochs": 4}


LAYOUTS = {"repdistiller": write_repdistiller, "mdistiller": write_mdistiller, "checkpointkd": write_checkpointkd,
           "timm": write_timm, "hf": write_hf, "state_dict": write_state_dict, "lightning": write_lightning}


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # a deprecation inside Lightning itself
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_trajectory_from_each_trainer_imports_and_analyze_select_distill_work_on_it(tmp_path, trajectory, layout):
    source = tmp_path / "source"
    source.mkdir()
    options = LAYOUTS[layout](source, trajectory)
    run = import_trajectory(source, model="resnet8", out=tmp_path / "run", quiet=True, overrides=tiny_config_items(),
                            **options)
    manifest = run.manifest
    assert manifest.kind == "import" and manifest.status == "complete"
    assert manifest.source["format"] == layout  # told apart by the files' contents, not by --format
    epochs = [c.epoch for c in manifest.checkpoints]
    assert len(epochs) >= 4 and epochs == sorted(epochs)
    assert manifest.epochs == options.get("epochs", 6)
    for c in manifest.checkpoints:
        assert Path(c.source["file"]).is_file() and c.source["sha256"] == sha256_file(c.source["file"])
        assert len(c.sha256) == 64
    if layout != "lightning":  # the same weights, at the same epochs: nothing renamed, nothing lost
        assert epochs == [e for e, _, _ in trajectory]
        imported = resolve(f"{run.path}@epoch={epochs[1]}")[0].state_dict()
        assert all(torch.equal(imported[k], v) for k, v in trajectory[1][1].items())
        assert manifest.checkpoints[1].metrics["val_acc"] == pytest.approx(trajectory[1][2])
    else:
        assert epochs == [1, 2, 3, 4]
    recorded = {"repdistiller": "accuracy", "mdistiller": "best_acc", "checkpointkd": "best_valid_acc",
                "timm": "metric", "hf": "eval_accuracy"}.get(layout)
    if recorded:  # what the trainer measured travels with each checkpoint
        assert recorded in manifest.checkpoints[0].source["metrics"]
    assert not (source / "pwned").exists()  # HF's training_args.bin is never unpickled

    analyze(run.path, seeds=1, plots=False, quiet=True)
    chosen = select(run.path)
    assert chosen["t_star"] in epochs
    student = distill(tiny_config(**STUDENT), teachers=[f"{run.path}@0.5"], out=tmp_path / "student", quiet=True)
    half = min(epochs, key=lambda e: (abs(e / manifest.epochs - 0.5), e))
    assert [t["epoch"] for t in student.manifest.to_dict()["teachers"]] == [half]


def tiny_config_items():
    """The data the shared teacher was trained on, as `--set` overrides."""
    return {"data.name": "digits", "data.batch_size": 64, "device": "cpu", "log.progress": False,
            "log.tensorboard": False}


def test_the_cli_imports_a_folder_and_prints_its_trajectory(tmp_path, trajectory):
    source = tmp_path / "source"
    source.mkdir()
    write_timm(source, trajectory)
    result = call_cli("import", str(source), "--model", "resnet8", "--out", str(tmp_path / "run"), "--set",
                     "data.name=digits", "--set", "log.progress=false")
    assert result.returncode == 0, result.stderr
    assert "epoch 6" in result.stdout or "6" in result.stdout
    assert Run(tmp_path / "run").manifest.source["format"] == "timm"


def _bad(tmp_path, source, *extra, model="resnet8"):
    result = call_cli("import", str(source), "--model", model, "--out", str(tmp_path / "run"), "--set",
                     "data.name=digits", *extra)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no half-written folder either
    return lines[0]


def test_bad_sources_are_one_line_errors_naming_the_file_and_nothing_is_left_behind(tmp_path, trajectory):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no checkpoints" in _bad(tmp_path, empty)

    junk = tmp_path / "junk"
    junk.mkdir()
    write_repdistiller(junk, trajectory[:2])
    (junk / "ckpt_epoch_9.pth").write_bytes(b"not a checkpoint at all")
    assert "ckpt_epoch_9.pth" in _bad(tmp_path, junk)

    twice = tmp_path / "twice"
    twice.mkdir()
    epoch, state, acc = trajectory[0]
    torch.save({"epoch": epoch, "model": state}, twice / "a.pth")
    torch.save({"epoch": epoch, "model": state}, twice / "b.pth")
    line = _bad(tmp_path, twice)
    assert "a.pth" in line and "b.pth" in line and f"epoch {epoch}" in line

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_repdistiller(mixed, trajectory[:2])
    from ckptkd.models import create

    torch.save({"epoch": 9, "model": create("resnet14", num_classes=10, in_channels=1).state_dict()},
               mixed / "ckpt_epoch_9.pth")
    line = _bad(tmp_path, mixed)
    assert "ckpt_epoch_9.pth" in line and "resnet8" in line

    classes = tmp_path / "classes"
    classes.mkdir()
    torch.save({"epoch": 1, "model": create("resnet8", num_classes=100, in_channels=1).state_dict()},
               classes / "ckpt_epoch_1.pth")
    line = _bad(tmp_path, classes)
    assert "ckpt_epoch_1.pth" in line and "num_classes=10" in line and "shapes differ" in line

    evil = tmp_path / "evil"
    evil.mkdir()
    with open(evil / "ckpt_epoch_1.pth", "wb") as f:
        pickle.dump({"epoch": 1, "model": {"w": _Payload(tmp_path / "pwned")}}, f)
    assert "refuses" in _bad(tmp_path, evil) and not (tmp_path / "pwned").exists()


def test_a_wrapper_prefix_is_named_with_the_option_that_removes_it(tmp_path, trajectory):
    epoch, state, _ = trajectory[0]
    torch.save({"epoch": epoch, "state_dict": {f"net.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"--strip-prefix net\."):
        import_trajectory(tmp_path / "w.pth", model="resnet8", out=tmp_path / "run", quiet=True,
                          overrides=tiny_config_items())
    run = import_trajectory(tmp_path / "w.pth", model="resnet8", out=tmp_path / "run", quiet=True,
                            overrides=tiny_config_items(), strip_prefix="net.")
    assert [c.epoch for c in run.manifest.checkpoints] == [epoch]


def test_epochs_are_given_or_refused_when_they_cannot_be_told(tmp_path, trajectory):
    source = tmp_path / "source"
    source.mkdir()
    for name, (_, state, _) in zip(("alpha", "beta"), trajectory):
        torch.save(state, source / f"{name}.pt")
    with pytest.raises(UserError, match="cannot tell the epoch"):
        import_trajectory(source, model="resnet8", out=tmp_path / "run", quiet=True, overrides=tiny_config_items())
    write_state_dict(source, trajectory)
    with pytest.raises(UserError, match="less than the last checkpoint"):
        import_trajectory(f"{source}/resnet8_epoch*.pt", model="resnet8", out=tmp_path / "run", quiet=True,
                          overrides=tiny_config_items(), epochs=4)


def _import(source, tmp_path, **kw):
    return import_trajectory(source, model="resnet8", out=tmp_path / "run", quiet=True,
                             overrides=tiny_config_items(), **kw)


@pytest.mark.parametrize("edit, needle", [
    (lambda s: {**s, "epoch": float("nan")}, "'epoch' is nan"),
    (lambda s: {**s, "epoch": float("inf")}, "'epoch' is inf"),
    (lambda s: {**s, "epoch": 1e12}, "'epoch' is 1000000000000.0"),
    (lambda s: {**s, "log_history": {"eval_accuracy": 0.5}}, "'log_history' is a dict, not a list"),
    (lambda s: {**s, "log_history": 7}, "'log_history' is a int, not a list"),
    (lambda s: {**s, "num_train_epochs": 10 ** 9}, "at most 100,000 (schedule.epochs)"),
])
def test_trainer_state_metadata_beyond_reason_is_one_line_naming_the_file(tmp_path, trajectory, edit, needle):
    source = tmp_path / "hf"
    source.mkdir()
    write_hf(source, trajectory[:2])
    state_file = next(source.glob("checkpoint-*/trainer_state.json"))
    state_file.write_text(json.dumps(edit(json.loads(state_file.read_text()))))  # NaN/Infinity: as Python writes
    with pytest.raises(UserError) as refused:
        _import(source, tmp_path)
    message = str(refused.value)
    assert needle in message and ("trainer_state.json" in message or str(source) in message), message
    assert not (tmp_path / "run").exists()


def test_trainer_state_numbers_beyond_a_float_are_left_out_with_a_note(tmp_path, trajectory, capsys):
    source = tmp_path / "hf"
    source.mkdir()
    write_hf(source, trajectory[:1])
    state_file = next(source.glob("checkpoint-*/trainer_state.json"))
    state_file.write_text(state_file.read_text().replace('"eval_loss": 0.3', '"eval_loss": ' + "9" * 400))
    run = _import(source, tmp_path)
    assert run.manifest.complete and "'eval_loss' is too large; left out" in capsys.readouterr().err
    huge = tmp_path / "huge"
    huge.mkdir()
    epoch, state, _ = trajectory[0]
    torch.save({"epoch": epoch, "model": state, "best_acc": 10 ** 400}, huge / "ckpt_epoch_2.pth")
    assert _import(huge, tmp_path / "again").manifest.complete


@pytest.mark.parametrize("damage, needle", [
    (lambda v: torch.full_like(v, float("nan")), "holds NaN or infinite values"),
    (lambda v: v.to(torch.complex64), "(complex)"),
    (lambda v: v.to(torch.int64), "is int64 where model 'resnet8' has float32"),
    (lambda v: v.to_sparse(), "is a sparse_coo tensor"),
    (lambda v: torch.empty(v.shape, device="meta"), "on the meta device"),
])
def test_weights_that_are_not_real_finite_tensors_are_refused_by_name(tmp_path, trajectory, damage, needle):
    epoch, state, _ = trajectory[0]
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)  # a linear layer
    torch.save({"epoch": epoch, "model": {**state, name: damage(state[name])}}, tmp_path / "ckpt_epoch_2.pth")
    with pytest.raises(UserError) as refused:
        _import(tmp_path / "ckpt_epoch_2.pth", tmp_path)
    assert needle in str(refused.value) and name in str(refused.value), str(refused.value)


def test_a_text_file_named_like_a_checkpoint_and_an_epoch_train_would_refuse(tmp_path, trajectory):
    (tmp_path / "ckpt_epoch_1.pth").write_text("hello, this is text\n")
    with pytest.raises(UserError, match="ckpt_epoch_1.pth is not a readable checkpoint \\(not a file torch.save"):
        _import(tmp_path / "ckpt_epoch_1.pth", tmp_path)
    _, state, _ = trajectory[0]
    torch.save({"epoch": 10 ** 7, "model": state}, tmp_path / "late.pth")
    with pytest.raises(UserError, match=r"late.pth says 10000000 epochs; at most 100,000"):
        _import(tmp_path / "late.pth", tmp_path)
