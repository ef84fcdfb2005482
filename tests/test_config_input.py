"""Config text that YAML allows but no config needs, refused before anything reads what it says (issue 25): keys
given twice, aliases that expand into gigabytes or into themselves, nesting thousands of levels deep, integers of
64 bits or more, numbers that are not finite — in a config file, in a study file and in `--set`. And `--set`'s two
structural forms: `null` removes a key, a mapping replaces a section."""

import pytest
import yaml

from ckptkd import config as config_mod
from ckptkd.cli import main
from ckptkd.errors import UserError
from conftest import REPO


def _laughs() -> str:
    """A flow list of nine levels of ten-fold aliases: a few hundred bytes, 10^9 strings once expanded."""
    levels = [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10 if i else ["lol"] * 10) + "]" for i in range(9)]
    return "[" + ", ".join(levels) + "]"


BAD_TEXTS = [
    ("model: {name: mlp}\nseed: 0\nseed: 1\n", ["duplicate key 'seed'", "line 3", "first at line 2"]),
    ("data: {name: digits, batch_size: 64, batch_size: 32}\n", ["duplicate key 'batch_size'"]),
    ("model: {name: mlp, widths: " + _laughs() + "}\n", ["expands to more than 100,000 values"]),
    ("log: {report_to: " + _laughs() + "}\n", ["expands to more than 100,000 values"]),
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", ["nested deeper than 64 levels"]),
    ("seed: " + "9" * 5000 + "\n", ["integer of 5000 digits"]),
    ("seed: 18446744073709551616\n", ["does not fit in 64 bits"]),
    ("optim: {lr: .inf}\n", ["'.inf' is not a finite number"]),
    ("optim: {lr: 1e400}\n", ["'1e400' is not a finite number"]),
    ("model: &m {name: mlp, widths: *m}\n", ["an alias refers to the node that contains it"]),
]


@pytest.mark.parametrize("text, needles", BAD_TEXTS)
def test_yaml_that_no_config_needs_is_refused_in_one_line_naming_file_and_line(tmp_path, capsys, text, needles):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    code = main(["train", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "cfg.yaml" in err and "line" in err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "run").exists()


def test_a_billion_laughs_in_a_study_description_is_refused_before_anything_is_planned(tmp_path, capsys):
    study = yaml.safe_load((REPO / "configs" / "fashion_kd_study.yaml").read_text())
    text = yaml.safe_dump({k: v for k, v in study.items() if k != "description"}) + "description: " + _laughs() + "\n"
    (tmp_path / "s.yaml").write_text(text)
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s.yaml" in err and "expands to more than" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, needle", [
    ("seed=18446744073709551616", "does not fit in 64 bits"),
    ("optim.lr=.nan", "is not a finite number"),
    ("model={a: 1, a: 2}", "duplicate key 'a'"),
    ("model.widths=" + "[" * 200 + "]" * 200, "nested deeper than 64 levels"),
    ("seed=77777777777777", "seed must be an integer >= 0 and <= 2147483647"),  # a derived seed overflowed torch's
    ("data.split_seed=2147483648", "data.split_seed must be an integer"),          # 64 bits (found by the fuzz test)
    ("optim.lr=1e308", "within float32's range"),        # finite, but the first SGD step overflowed (RuntimeError)
    ("optim.weight_decay=-1e300", "optim.weight_decay"),
    # 12.7 M outputs: weights that fit, logits that do not (26 GB per evaluation batch; the fuzz test's worker was
    # killed for it)
    ("model.num_classes=12775306", "model.num_classes must be an integer >= 2 and <= 100000"),
])
def test_the_same_bounds_hold_for_set(tmp_path, capsys, override, needle):
    assert main(["train", str(REPO / "configs" / "digits_student.yaml"), "--out", str(tmp_path / "r"),
                 "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and override.split("=")[0] in err, err


@pytest.mark.parametrize("epochs, hint", [(1, "warmup_epochs=0)"), (3, "warmup_epochs=2 or 0)")])
def test_a_warm_up_as_long_as_the_run_is_refused_with_what_fits(tmp_path, capsys, epochs, hint):
    assert main(["train", str(REPO / "configs" / "digits_student.yaml"), "--out", str(tmp_path / "r"),
                 "--set", f"schedule.epochs={epochs}", "--set", f"schedule.warmup_epochs={epochs}"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"(for a run this short, --set schedule.{hint}")


def test_what_yaml_allows_and_configs_use_still_reads():
    """A merge key that overrides one of the merged keys is not a duplicate; 2**63 - 1 and 1e-300 are numbers."""
    text = "base: &b {lr: 0.1, momentum: 0.9}\noptim:\n  <<: *b\n  lr: 0.05\nseed: 9223372036854775807\nx: 1e-300\n"
    assert config_mod.load_yaml(text) == {"base": {"lr": 0.1, "momentum": 0.9}, "optim": {"lr": 0.05, "momentum": 0.9},
                                          "seed": 2 ** 63 - 1, "x": 1e-300}
    # a config that repeats one small anchor many times stays well inside the bound
    many = "a: &a [1, 2, 3]\nb: [" + ", ".join(["*a"] * 1000) + "]\n"
    assert len(config_mod.load_yaml(many)["b"]) == 1000


def test_set_null_removes_a_key_and_a_mapping_replaces_a_section(tmp_path, capsys):
    student = REPO / "configs" / "digits_student.yaml"
    # The digits student is an MLP with widths: naming another model alone keeps widths, which it cannot take...
    assert main(["train", str(student), "--out", str(tmp_path / "r"), "--set", "model.name=resnet8"]) == 2
    err = capsys.readouterr().err
    assert "does not take 'widths'" in err and "--set model.widths=null removes it" in err, err
    # ...removing the argument, or replacing the whole section, can.
    for overrides in (["model.name=resnet8", "model.widths=null"], ["model={name: resnet8}"]):
        cfg = config_mod.resolve(student, overrides)
        assert cfg["model"] == {"name": "resnet8", "num_classes": None, "in_channels": None}
    # null puts a setting back to its default; a replaced section is refilled from the defaults
    assert config_mod.resolve(student)["schedule"]["warmup_epochs"] == 2
    assert config_mod.resolve(student, ["schedule.warmup_epochs=null"])["schedule"]["warmup_epochs"] == 0
    cfg = config_mod.resolve(student, ["schedule={epochs: 3}"])
    assert cfg["schedule"] == {**config_mod.DEFAULTS["schedule"], "epochs": 3}
    # a mapping for a plain value is still refused, and an unknown key is unknown whatever its value
    with pytest.raises(UserError, match="optim.lr must be a number"):
        config_mod.resolve(student, ["optim.lr={x: 1}"])
    with pytest.raises(UserError, match="unknown key 'nosuch'"):
        config_mod.resolve(student, ["nosuch=null"])


def test_a_checkpoint_named_twice_in_an_ensemble_is_refused_naming_both_references(teacher_run, tmp_path, capsys):
    from ckptkd.run import resolve_all

    run = teacher_run.path
    with pytest.raises(UserError, match=r"@0.5,0.5: names checkpoint .*@epoch=3 twice"):
        resolve_all([f"{run}@0.5,0.5"])
    with pytest.raises(UserError, match=r"@epoch=3: names checkpoint .*twice \(also named by .*@0.5\)"):
        resolve_all([f"{run}@0.5", f"{run}@epoch=3"])
    assert [c.epoch for c in resolve_all([f"{run}@0.5", f"{run}@epoch=4"])] == [3, 4]
    student = REPO / "configs" / "digits_student.yaml"
    assert main(["distill", str(student), "--teacher", f"{run}@0.5,0.7,0.5", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "twice" in err and not (tmp_path / "s").exists()


def test_resume_into_a_folder_that_does_not_exist_says_so_and_starts_a_new_run(tmp_path, capsys):
    """A job script may pass --resume from its first launch on (so a requeue continues): a note, not a refusal."""
    out = tmp_path / "typo"
    assert main(["train", str(REPO / "configs" / "digits_student.yaml"), "--out", str(out), "--resume",
                 "--set", "schedule.epochs=1", "--set", "schedule.warmup_epochs=0", "--set", "device=cpu",
                 "--set", "log.progress=false"]) == 0
    assert f"--resume: {out} does not exist; starting a new run there" in capsys.readouterr().err
    assert (out / "manifest.json").is_file()
    assert main(["train", str(REPO / "configs" / "digits_student.yaml"), "--out", str(out), "--resume",
                 "--set", "schedule.epochs=1", "--set", "schedule.warmup_epochs=0", "--set", "device=cpu",
                 "--set", "log.progress=false"]) == 0
    assert "does not exist" not in capsys.readouterr().err  # the folder is there now: an ordinary resume


def test_the_resume_hint_repeats_the_program_as_it_was_started(tmp_path, monkeypatch):
    import sys

    import importlib

    cli_main = importlib.import_module("ckptkd.cli.main")  # the module (the package exports its function `main`)

    script = tmp_path / "bin" / "ckptkd"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "train"])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli_main.program() == [str(script)]                 # not on PATH: its path, as typed
    monkeypatch.setenv("PATH", str(script.parent))
    assert cli_main.program() == ["ckptkd"]                    # found by name
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "ckptkd" / "__main__.py"), "train"])
    assert cli_main.program()[1:] == ["-m", "ckptkd"]          # python -m ckptkd


def test_a_bad_item_of_a_list_is_named_by_its_position(tmp_path, capsys):
    study = yaml.safe_load((REPO / "configs" / "fashion_kd_study.yaml").read_text())
    study["variants"] = ["none", "T0.5", "T1.5", "Tfull"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "variants[2]: 'T1.5' is not a variant" in err and "'none'" not in err, err
    study["variants"] = ["none"]
    study["pairs"][0]["variants"] = ["T0.5", "bogus"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "pairs[0].variants[1]: 'bogus' is not a variant" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"item 1 \(1.5\) is not"):
        config_mod.resolve(REPO / "configs" / "digits_student.yaml", ["checkpoints.fractions=[0.5, 1.5]"])


def test_a_snapshot_of_a_short_teacher_names_each_checkpoint_once_and_a_long_ones_references_are_unchanged():
    """Fractions 0.3, 0.5, 0.7 of a 2-epoch teacher all round to epoch 1: the snapshot is epochs 1 and 2 (an ensemble
    refuses a checkpoint named twice); of a 60-epoch teacher they are four checkpoints, named as before."""
    from ckptkd.study import variants as variants_mod

    def members(epochs):
        ctx = variants_mod.Context(lead="runs/t", members=["runs/t"], lead_id="t", member_ids=["t"], analysis_id="a",
                                   snapshot=[0.3, 0.5, 0.7, 1.0], ensemble_size=3, epochs=epochs)
        return variants_mod.parse("snapshot").teachers(ctx)[0]

    assert members(2) == ["runs/t@epoch=1", "runs/t@epoch=2"]
    assert members(60) == ["runs/t@epoch=18", "runs/t@epoch=30", "runs/t@epoch=42", "runs/t@epoch=60"]
