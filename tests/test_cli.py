from pathlib import Path

import pytest

from ckptkd.run import resolve, split_reference
from ckptkd.cli import main
from ckptkd.errors import UserError

from conftest import REPO, manifest_json, run_cli


def one_line_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("text, needles", [
    ("model: {name: resnet8\nseed: 0\n", ["cfg.yaml", "invalid YAML", "line"]),
    ("model: {name: resnt8}\n", ["unknown model 'resnt8'", "resnet8"]),
    ("schedule: {epochs: -5}\n", ["schedule.epochs", "-5"]),
    ("data: {name: mnist-ish}\n", ["data.name", "mnist-ish"]),
    ("optim: {lr: fast}\n", ["optim.lr", "fast"]),
    ("kd: {alpha: 1.5}\n", ["kd.alpha"]),
    ("kd: {autocast: fp8}\n", ["kd.autocast", "fp8"]),
    ("schedule: {epochz: 3}\n", ["schedule.epochz"]),
    ("model: {name: resnet8, width: 3}\n", ["resnet8", "width"]),
    ("- just\n- a list\n", ["top level must be a mapping"]),
])
def test_bad_configs_are_one_line_exit_2(tmp_path, capsys, text, needles):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    one_line_error(capsys, ["train", str(cfg), "--out", str(tmp_path / "run")], *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, needle", [
    ("schedule.epochs", "key=value"),
    ("schedule.epochs=-1", "schedule.epochs"),
    ("data.root=/nonexistent/folder", "/nonexistent/folder"),
    ("model.name=wrn_41_2", "wrn_41_2"),
    # A mapping where a value belongs is checked like any other wrong value (found by the fuzz test in CI).
    ("data.batch_size={}", "data.batch_size"),
    ("data.mean={}", "data.mean"),
    ("checkpoints.epochs={a: 1}", "checkpoints.epochs"),
])
def test_bad_overrides_are_one_line_exit_2(tmp_path, capsys, override, needle):
    argv = ["train", str(REPO / "configs" / "digits_teacher.yaml"), "--out", str(tmp_path / "r"), "--set", override]
    if override.startswith("data.root"):
        argv += ["--set", "data.name=fashion-mnist"]
    one_line_error(capsys, argv, needle)


def test_numbers_in_scientific_notation_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; ckptkd reads it as the learning rate it is, in files and overrides, and a
    string that looks like one (a run named 1e3) is quoted when saved, so the saved config reads back the same."""
    from ckptkd import config as config_mod

    path = tmp_path / "cfg.yaml"
    path.write_text("name: '1e3'\noptim: {lr: 5e-4, weight_decay: 1E-8}\n")
    cfg = config_mod.resolve(path, ["schedule.min_lr=1e-6", "data.mean=[1e-1]"])
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["schedule"]["min_lr"]) == (5e-4, 1e-8, 1e-6)
    assert cfg["data"]["mean"] == [0.1] and cfg["name"] == "1e3"
    saved = tmp_path / "saved.yaml"
    saved.write_text(config_mod.dump(cfg))
    assert config_mod.resolve(saved) == cfg


@pytest.mark.parametrize("widths", ["'0'", "null", "[-1]", "[[1]]"])
def test_a_model_argument_the_constructor_cannot_use_is_one_line(tmp_path, capsys, widths):
    argv = ["train", str(REPO / "configs" / "digits_teacher.yaml"), "--out", str(tmp_path / "r"),
            "--set", "model.name=mlp", "--set", f"model.widths={widths}"]
    one_line_error(capsys, argv, "model 'mlp'", "model.widths=")
    assert not (tmp_path / "r").exists()


def test_missing_config_file(tmp_path, capsys):
    one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml")


def test_real_process_exit_code_and_single_line():
    result = run_cli("train", str(REPO / "configs" / "digits_teacher.yaml"), "--set", "schedule.epochs=-3")
    assert result.returncode == 2
    assert result.stderr.strip() == ("ckptkd: error: config: schedule.epochs must be an integer >= 1 and <= 100000, "
                                     "got -3")


def test_references(teacher_run):
    run = teacher_run.path
    epochs = lambda ref: [c.epoch for c in resolve(ref)]
    assert epochs(str(run)) == [6] and epochs(f"{run}@last") == [6]
    assert epochs(f"{run}@epoch=4") == [4]
    assert epochs(f"{run}@0.5") == [3]
    assert epochs(f"{run}@0.3,0.5,0.7") == [2, 3, 4]
    best = max(load_checkpoints(run), key=lambda c: (c["metrics"]["val_acc"], c["epoch"]))
    assert epochs(f"{run}@best-val") == [best["epoch"]]
    assert resolve(f"{run}@0.5")[0].reference == f"{run}@epoch=3"


def load_checkpoints(run):
    
    return manifest_json(run)["checkpoints"]


@pytest.mark.parametrize("selector, needle", [
    ("@epoch=5", "saved epochs: 2 (0.33), 3 (0.5), 4 (0.67), 6 (1)"),
    ("@0.9", "no checkpoint at epoch 5"),
    ("@1.5", "not a fraction"),
    ("@best-info", "ckptkd analyze"),
    ("@top-info:2", "ckptkd analyze"),
    ("@sideways", "unknown selector"),
    ("@", "unknown selector ''"),
    ("@best val", "unknown selector 'best val'"),
])
def test_bad_references_name_what_exists(teacher_run, selector, needle):
    with pytest.raises(UserError, match=None) as error:
        resolve(f"{teacher_run.path}{selector}")
    assert needle in str(error.value) and str(teacher_run.path) in str(error.value)


def test_reference_to_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a ckptkd run"):
        resolve(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        resolve(str(tmp_path / "missing@0.5"))


def test_paths_with_at_signs():
    assert split_reference("runs/a@b/t@0.5") == (Path("runs/a@b/t"), "0.5")
    assert split_reference("runs/t") == (Path("runs/t"), "last")


def test_an_unwritable_output_folder_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    one_line_error(capsys, ["train", str(REPO / "configs" / "digits_teacher.yaml"), "--out", str(blocker / "run")],
                   str(blocker))
