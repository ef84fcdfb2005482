import os
import pickle

import pytest
import torch
import yaml

from ckptkd import distill, train
from ckptkd.run import resolve
from ckptkd.errors import UserError
from ckptkd.teachers import Teacher

from conftest import call_cli, manifest_json, tiny_config

STUDENT = {"model": {"name": "mlp", "widths": [32]}, "schedule": {"epochs": 3}, "checkpoints": {"fractions": [1.0]}}


def student_config(**extra):
    return tiny_config(**{**STUDENT, **extra})


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher2") / "t"
    return train(tiny_config(seed=1, schedule={"epochs": 6}), out=out, quiet=True)


@pytest.mark.parametrize("selector", ["none", "@0.5", "@last", "@0.3,0.5,0.7", "full"])
def test_students_from_every_kind_of_teacher(tmp_path, teacher_run, second_teacher, selector):
    refs = {"none": [], "full": [teacher_run.ref("last"), second_teacher.ref("last")]}.get(
        selector, [f"{teacher_run.path}{selector}"])
    manifest = distill(student_config(), teachers=refs, out=tmp_path / "s", quiet=True).manifest.to_dict()
    assert manifest["kind"] == "distill" and manifest["status"] == "complete"
    expected_count = {"none": 0, "full": 2, "@0.3,0.5,0.7": 3}.get(selector, 1)
    assert len(manifest["teachers"]) == expected_count
    for t in manifest["teachers"]:
        assert len(t["sha256"]) == 64 and 0.0 <= t["val_acc"] <= 1.0
    final = manifest["final"]
    assert 0.0 < final["test_acc"] <= 1.0 and 1 <= final["best_val_epoch"] <= 3
    assert "train_kd" in manifest_history(tmp_path / "s")[-1] or selector == "none"


def manifest_history(run):
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_distillation_is_deterministic_and_teacher_matters(tmp_path, teacher_run):
    a = distill(student_config(), teachers=[teacher_run.ref("0.5")], out=tmp_path / "a", quiet=True).manifest.to_dict()
    b = distill(student_config(), teachers=[teacher_run.ref("0.5")], out=tmp_path / "b", quiet=True).manifest.to_dict()
    c = distill(student_config(), teachers=[teacher_run.ref("last")], out=tmp_path / "c", quiet=True).manifest.to_dict()
    assert a["checkpoints"][-1]["sha256"] == b["checkpoints"][-1]["sha256"]
    assert a["checkpoints"][-1]["sha256"] != c["checkpoints"][-1]["sha256"]


def test_teacher_batchnorm_buffers_are_untouched_by_a_distillation_epoch(tmp_path, teacher_run, monkeypatch):
    import ckptkd.teachers.loading

    # BatchNorm that cannot be folded (e.g. a WRN's pre-activation) must stay frozen too: keep this one unfolded.
    monkeypatch.setattr(ckptkd.teachers.loading, "fold_batchnorm", lambda model: 0)
    teacher = Teacher.from_references([teacher_run.ref("0.5")], quiet=True)
    before = {k: v.clone() for k, v in teacher.models[0].state_dict().items()}
    monkeypatch.setattr(Teacher, "from_references", classmethod(lambda cls, refs, **kwargs: teacher))
    distill(student_config(schedule={"epochs": 1}), teachers=["ignored"], out=tmp_path / "s", quiet=True)
    after = teacher.models[0].state_dict()
    assert any("running_mean" in k for k in before)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert not teacher.models[0].training
    assert all(not p.requires_grad for p in teacher.models[0].parameters())


def test_teacher_outputs_are_plain_tensors_without_grad(teacher_run):
    teacher = Teacher.from_references([teacher_run.ref("0.3,0.5")], quiet=True)
    x = torch.randn(5, 1, 8, 8)
    out = teacher.logits(x)
    assert out.shape == (2, 5, 10) and not out.requires_grad and not out.is_inference()


def test_teacher_renormalises_inputs_for_other_data_statistics(tmp_path, teacher_run):
    """A teacher trained with other normalisation sees its own statistics: same outputs on the same pixels."""
    from ckptkd import config, data as data_mod

    teacher = Teacher.from_references([teacher_run.ref("last")], quiet=True)
    cfg = config.resolve(tiny_config(data={"mean": [0.5], "std": [0.25]}))
    other = data_mod.build(cfg["data"])
    teacher.prepare(other)
    x_other, _ = next(other.eval_batches("val", 16))
    own = config.resolve(tiny_config())
    x_own, _ = next(data_mod.build(own["data"]).eval_batches("val", 16))
    direct = teacher.models[0](x_own)
    assert torch.allclose(teacher.logits(x_other)[0], direct, atol=1e-4)


def _write_cfg(tmp_path, cfg) -> str:
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_checkpoint_reference_lists_what_exists(tmp_path, teacher_run):
    result = call_cli("distill", _write_cfg(tmp_path, student_config()), "--teacher", f"{teacher_run.path}@epoch=5",
                     "--out", str(tmp_path / "s"))
    _one_line_error(result, "epoch=5", "saved epochs: 2 (0.33), 3 (0.5), 4 (0.67), 6 (1)")
    assert not (tmp_path / "s").exists()


def test_tampered_checkpoint_is_refused(tmp_path, teacher_run):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(teacher_run.path, run)
    ckpt = run / manifest_json(run)["checkpoints"][1]["path"]
    raw = bytearray(ckpt.read_bytes())
    raw[-3] ^= 0x01
    ckpt.write_bytes(bytes(raw))
    result = call_cli("distill", _write_cfg(tmp_path, student_config()), "--teacher", f"{run}@0.5",
                     "--out", str(tmp_path / "s"))
    _one_line_error(result, str(ckpt), "does not match its manifest")


def test_teacher_with_the_wrong_class_count_is_refused(tmp_path, teacher_run):
    import numpy as np

    # a model of more outputs than its data has classes is refused (nothing would teach or read them) ...
    with pytest.raises(UserError, match="model.num_classes=12 but digits has 10 classes"):
        train(tiny_config(model={"name": "resnet8", "num_classes": 12}), out=tmp_path / "refused", quiet=True)
    # ... so a 12-class teacher is one trained on 12 classes of digits' size
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "twelve.npz", x_train=rng.integers(0, 256, (48, 8, 8), dtype=np.uint8),
             y_train=np.arange(48) % 12, x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), y_test=np.arange(12))
    wide = train(tiny_config(data={"name": "npz", "root": str(tmp_path / "twelve.npz"), "batch_size": 16,
                                   "val_fraction": 0.25},
                             schedule={"epochs": 1}), out=tmp_path / "wide", quiet=True)
    result = call_cli("distill", _write_cfg(tmp_path, student_config()), "--teacher", wide.ref("last"),
                     "--out", str(tmp_path / "s"))
    _one_line_error(result, str(wide.path), "12 classes")


def test_a_teacher_whose_classes_are_in_another_order_is_refused_and_other_names_noted(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8), np.arange(40) % 2

    def npz(name, names, labels):
        np.savez(tmp_path / name, x_train=x, y_train=labels, x_test=x[:10], y_test=labels[:10],
                 class_names=np.array(names))
        return {"data": {"name": "npz", "root": str(tmp_path / name), "batch_size": 16}}

    small = {"model": {"name": "mlp", "widths": [4]}, "schedule": {"epochs": 1}, "checkpoints": {"fractions": [1.0]}}
    teacher = train(tiny_config(**small, **npz("cd.npz", ["cat", "dog"], y)), out=tmp_path / "t", quiet=True)
    # the same images with the names listed the other way round (labels swapped with them): the same task, but the
    # teacher's output 0 (cat) would be taught as class 0 (dog)
    with pytest.raises(UserError, match="orders its classes otherwise .* output 0 is 'cat', which is the data's class 1"):
        distill(tiny_config(**small, **npz("dc.npz", ["dog", "cat"], 1 - y)), teachers=[teacher.ref("last")],
                out=tmp_path / "refused", quiet=True)
    assert not (tmp_path / "refused" / "manifest.json").exists()
    # one name shared at another position is enough to misplace that class's soft labels
    with pytest.raises(UserError, match="output 0 is 'cat', which is the data's class 1"):
        distill(tiny_config(**small, **npz("dc2.npz", ["wolf", "cat"], y)), teachers=[teacher.ref("last")],
                out=tmp_path / "refused2", quiet=True)
    distill(tiny_config(**small, **npz("ab.npz", ["a", "b"], y)), teachers=[teacher.ref("last")],
            out=tmp_path / "noted", quiet=True)
    assert "other class names than npz's (class 0: 'cat' there, 'a' here)" in capsys.readouterr().err
    with pytest.raises(UserError, match="class name 'cat' is given twice"):
        train(tiny_config(**small, **npz("cc.npz", ["cat", "cat"], y)), out=tmp_path / "twice", quiet=True)


def test_import_a_dataparallel_state_dict_and_distill_from_an_ensemble_of_imports(tmp_path, teacher_run):
    state = resolve(teacher_run.ref("last"))[0].state_dict()
    dataparallel = {"module." + (k.replace("classifier.", "fc.")): v for k, v in state.items()}
    torch.save({"epoch": 6, "model": dataparallel}, tmp_path / "a.pth")
    torch.save(resolve(teacher_run.ref("0.5"))[0].state_dict(), tmp_path / "b.pth")
    runs = []
    for name in ("a", "b"):
        result = call_cli("import", str(tmp_path / f"{name}.pth"), "--model", "resnet8", "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        runs.append(tmp_path / name)
    imported = manifest_json(runs[0])
    original = manifest_json(teacher_run.path)
    assert imported["kind"] == "import"
    assert imported["checkpoints"][0]["metrics"]["test_acc"] == pytest.approx(original["final"]["test_acc"])
    manifest = distill(student_config(), teachers=[str(r) for r in runs], out=tmp_path / "s", quiet=True).manifest.to_dict()
    # a.pth says epoch 6 (of 6); b.pth says nothing, so it is epoch 1 of 1
    assert [t["reference"] for t in manifest["teachers"]] == [f"{runs[0]}@epoch=6", f"{runs[1]}@epoch=1"]


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_import_refuses_a_malicious_pickle_and_runs_none_of_it(tmp_path):
    target = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {"w": _Payload(target)}}, f)
    result = call_cli("import", str(tmp_path / "evil.pth"), "--model", "resnet8", "--out", str(tmp_path / "r"))
    _one_line_error(result, "evil.pth", "refuses")
    assert not target.exists()
    assert not (tmp_path / "r").exists()


def test_import_refuses_weights_of_the_wrong_model(tmp_path, teacher_run):
    torch.save(resolve(teacher_run.ref("last"))[0].state_dict(), tmp_path / "w.pth")
    result = call_cli("import", str(tmp_path / "w.pth"), "--model", "resnet14", "--out", str(tmp_path / "r"))
    _one_line_error(result, "w.pth", "resnet14")


def test_a_teacher_shared_by_students_is_measured_once_per_data_split(teacher_run, monkeypatch):
    from ckptkd import config, data as data_mod

    calls = []
    measure = Teacher._accuracy
    monkeypatch.setattr(Teacher, "_accuracy", lambda self, data, split: calls.append(split) or measure(self, data, split))

    def accuracies(split_seed):
        data = data_mod.build(config.resolve(tiny_config(data={"split_seed": split_seed}))["data"])
        teacher = Teacher.from_references([teacher_run.ref("0.3,1.0")], quiet=True)
        teacher.prepare(data)
        return teacher.summary()["val_acc"], teacher.val_acc

    first = accuracies(split_seed=11)
    assert calls == ["val", "test"]
    assert accuracies(split_seed=11) == first and calls == ["val", "test"]  # the second student reuses them
    accuracies(split_seed=12)  # another validation split: measured again
    assert calls == ["val", "test"] * 2


def test_teacher_mode_train_reproduces_the_released_code_and_is_never_cached(tmp_path, teacher_run):
    """kd.teacher_mode=train: on the student's batches the teacher's BatchNorm uses batch statistics (as the
    authors' released code runs its teachers), so its outputs differ from eval mode and no cache applies."""
    from ckptkd.data import build
    from ckptkd.teachers import Teacher

    from ckptkd import config

    data = build(config.resolve(tiny_config())["data"])
    batch = next(data.train_batches(seed=0, epoch=1, batch_size=64))
    frozen = Teacher.from_references([teacher_run.ref("0.5")], quiet=True).prepare(data)
    live = Teacher.from_references([teacher_run.ref("0.5")], quiet=True, mode="train").prepare(data)
    stats_before = [b.clone() for name, b in live.models[0].named_buffers() if name.endswith("running_mean")]
    assert not torch.allclose(frozen.logits(batch), live.logits(batch), atol=1e-4)
    stats_after = [b for name, b in live.models[0].named_buffers() if name.endswith("running_mean")]
    assert any(not torch.equal(a, b) for a, b in zip(stats_before, stats_after))  # as in train mode
    assert all(not m.training for m in live.models)  # back in eval mode between batches
    manifest = distill(student_config(), teachers=[teacher_run.ref("0.5")], out=tmp_path / "s", quiet=True,
                       overrides={"kd.teacher_mode": "train"}).manifest
    assert manifest.teacher_ensemble["mode"] == "train" and "cache" not in manifest.teacher_ensemble
    assert manifest.health["ok"]
    with pytest.raises(UserError, match="kd.teacher_mode"):
        distill(student_config(), teachers=[teacher_run.ref("0.5")], out=tmp_path / "x", quiet=True,
                overrides={"kd.teacher_mode": "train", "kd.cache": "on"})


def test_a_teacher_is_frozen_in_eval_mode_with_its_batchnorm_folded_when_built(teacher_run):
    """Folding needs eval mode: a teacher built from models left in train mode keeps every BatchNorm (and a later
    `.eval()` would hide that its folding was lost)."""
    from torch import nn

    teacher = Teacher.from_references([teacher_run.ref("0.5")], quiet=True)
    model = teacher.models[0]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    unfolded = Teacher.from_references([teacher_run.ref("0.5")], quiet=True, mode="train").models[0]
    assert any(isinstance(m, nn.BatchNorm2d) for m in unfolded.modules())
    x = torch.randn(8, 1, 8, 8)
    assert torch.allclose(model(x), unfolded.eval()(x), atol=1e-4)  # folding keeps the eval-mode function
