"""Training many runs as one group (ckptkd.training.loop, engines, fusion): equivalence with training them one by one,
determinism, resume, failure of one member, the study's grouping and the command line.

Tolerances: a fused model in float64 equals its members to 1e-9 (forward, gradients, BatchNorm statistics, optimizer
steps); in float32 the first epoch's losses agree to 1e-5 relative and a short digits run's final test
accuracies to 0.5 points (float32 rounding differs and training amplifies it later on, as another thread count
would)."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import call_cli, manifest_json, run_cli, tiny_config

from ckptkd import config as config_mod
from ckptkd.errors import UserError
from ckptkd.training.engines import choose_engine, split_for_memory
from ckptkd.training.loop import Member, check_group, fit, fit_one, group_key
from ckptkd.losses import kd_loss, kd_loss_members, soft_targets
from ckptkd.models import create
from ckptkd.run.storage import sha256_file
from ckptkd.training.api import make_teacher

KILL_SEED = int(os.environ.get("CKPTKD_KILL_SEED", random.randrange(10**6)))

def test_the_engine_loops_compute_bound_models_on_a_cpu_and_fuses_small_ones():
    cpu = torch.device("cpu")
    big = {"name": "resnet20", "in_channels": 3, "image_size": [32, 32]}
    small = {"name": "cnn", "in_channels": 1, "image_size": [28, 28]}
    engine, why = choose_engine(create("resnet20", num_classes=100, in_channels=3), big, cpu)
    assert engine == "looped-channels-last" and "compute-bound" in why
    model = create("cnn", num_classes=10, in_channels=1, image_size=(28, 28), channels=[4, 8], hidden=32)
    assert choose_engine(model, small, cpu)[0] == "fused"
    assert choose_engine(model, small, cpu, "looped")[0] == "looped"


def test_kd_loss_members_is_kd_loss_for_every_member_and_ensemble_mode():
    torch.manual_seed(0)
    n, b, c = 4, 16, 10
    logits = torch.randn(n, b, c, requires_grad=True)
    y = torch.randint(c, (n, b))
    teachers = [torch.randn(3, b, c) * 3, torch.randn(1, b, c), torch.randn(2, b, c), torch.randn(1, b, c)]
    taus, alphas = torch.tensor([4.0, 2.0, 5.0, 1.0]), torch.tensor([0.1, 0.5, 0.9, 0.3])
    for mode in ("probs", "logits", "per_teacher"):
        soft, plogp = zip(*(soft_targets(t, temperature=float(taus[i]), ensemble=mode)
                            for i, t in enumerate(teachers)))
        losses, terms = kd_loss_members(logits, y, soft=torch.stack(soft), plogp=torch.stack(plogp),
                                        temperature=taus, alpha=alphas)
        grad = torch.autograd.grad(losses.sum(), logits)[0]
        for i in range(n):
            loss, own = kd_loss(logits[i], teachers[i], y[i], temperature=float(taus[i]), alpha=float(alphas[i]),
                                ensemble=mode, return_terms=True)
            assert torch.allclose(losses[i], loss, atol=1e-5) and torch.allclose(terms["kd"][i], own["kd"], atol=1e-5)
            assert torch.allclose(terms["ce"][i], own["ce"], atol=1e-6), mode
            assert torch.allclose(grad[i], torch.autograd.grad(loss, logits)[0][i], atol=1e-6), mode


def test_group_batches_are_each_runs_own_batches(teacher_run):
    from ckptkd import data as data_mod

    for augment in (True, False):
        cfg = config_mod.resolve(tiny_config(data={"augment": augment}))
        data = data_mod.build(cfg["data"])
        teacher = make_teacher({**cfg, "kd": {**cfg["kd"], "teachers": [teacher_run.ref("0.5")]}}, quiet=True)
        teacher.prepare(data).attach_cache(data, views=4)
        banks = [None, teacher.view_bank, None]
        plans = [data.epoch_plan(seed=s, epoch=3, view_bank=bank) for s, bank in zip((0, 1, 2), banks)]
        together = list(data.group_batches(plans, 64))
        for i, (seed, bank) in enumerate(zip((0, 1, 2), banks)):
            alone = list(data.train_batches(seed=seed, epoch=3, batch_size=64, view_bank=bank))
            assert len(alone) == len(together)
            for a, g in zip(alone, together):
                assert torch.equal(a.x, g.x[i]) and torch.equal(a.y, g.y[i]) and torch.equal(a.index, g.index[i])
                if bank is not None:
                    assert torch.equal(a.view_ids, g.view_ids[i])


def _students(teacher_run, tmp_path, **overrides):
    """A CE-only student, two from T^0.5 (run online, and cached) and one from a snapshot ensemble (cached): four
    seeds, one architecture, each its own KD settings."""
    base = tiny_config(**{"model": {"name": "cnn", "channels": [8, 16], "hidden": 32}, "schedule": {"epochs": 4},
                          "kd": {"temperature": 4.0, "alpha": 0.3}, **overrides})
    members = []
    for seed, refs, kd in ((0, [], {}), (1, [teacher_run.ref("0.5")], {"cache": "off", "temperature": 2.0}),
                           (2, [teacher_run.ref("0.3,0.5,0.7")], {"cache": "on", "ensemble": "logits"}),
                           (3, [teacher_run.ref("0.5")], {"cache": "on"})):
        cfg = config_mod.resolve(base, {"seed": seed, "name": f"s{seed}", **{f"kd.{k}": v for k, v in kd.items()}})
        cfg["kd"]["teachers"] = refs
        members.append(Member(cfg, tmp_path / f"s{seed}", make_teacher(cfg, quiet=True),
                              "distill" if refs else "train"))
    return members


def _weights(run) -> list[str]:
    return [c.sha256 for c in run.manifest.checkpoints]


@pytest.mark.parametrize("engine, model", [("fused", "cnn"), ("looped", "cnn"), ("looped-channels-last", "cnn"),
                                           ("fused", "mlp")])
def test_a_group_trains_each_run_as_it_would_train_alone(teacher_run, tmp_path, engine, model):
    """Same initial weights, same batches, the same first epoch to float32 rounding; final test accuracies within
    0.5 points. (Only for the MLP: the CNN's channels-last max-pooling breaks ties between equal values in another
    order than the one-model kernel, and a member whose windows hold ties then drifts as another thread count would.)"""
    architecture = {"name": "mlp", "widths": [32], "batch_norm": True} if model == "mlp" else \
        {"name": "cnn", "channels": [8, 16], "hidden": 32}
    members = _students(teacher_run, tmp_path / "group", model=architecture, schedule={"epochs": 6})
    runs = fit(members, quiet=True, engine=engine)
    alone = [fit_one(Member(m.cfg, tmp_path / "alone" / m.out.name, make_teacher(m.cfg, quiet=True), m.kind),
                     quiet=True) for m in members]
    for i, (run, single) in enumerate(zip(runs, alone)):
        manifest, expected = run.manifest, single.manifest
        assert manifest.fused == {"engine": engine, "members": 4, "index": i, "group": [str(m.out) for m in members]}
        assert "fused" not in manifest_json(single)  # a run trained alone keeps the manifest it always had
        assert [c.epoch for c in manifest.checkpoints] == [c.epoch for c in expected.checkpoints]
        assert manifest.teachers == expected.teachers and manifest.seed == expected.seed
        first = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        first_alone = [json.loads(line) for line in (single.path / "metrics.jsonl").read_text().splitlines()]
        assert set(first[0]) == set(first_alone[0])  # the same terms logged (no kd term without a teacher)
        assert first[0]["train_loss"] == pytest.approx(first_alone[0]["train_loss"], rel=1e-5)
        if model == "mlp" or engine == "looped":
            assert abs(manifest.final.test_acc - expected.final.test_acc) <= 0.005


def test_a_fused_rerun_is_bit_identical(teacher_run, tmp_path):
    first = fit(_students(teacher_run, tmp_path / "a"), quiet=True, engine="fused")
    again = fit(_students(teacher_run, tmp_path / "b"), quiet=True, engine="fused")
    assert [_weights(r) for r in first] == [_weights(r) for r in again]


@pytest.mark.parametrize("engine", ["fused", "looped-channels-last"])
def test_members_left_at_different_epochs_resume_to_the_uninterrupted_weights(teacher_run, tmp_path, monkeypatch,
                                                                              engine):
    """A kill between two members' writes leaves one an epoch ahead: the group holds it until the others catch up."""
    from ckptkd.run import RunWriter

    reference = fit(_students(teacher_run, tmp_path / "ref"), quiet=True, engine=engine)
    real_end_epoch = RunWriter.end_epoch

    def dies_after_member_0_of_epoch_2(self, record, *args, **kwargs):
        if record["epoch"] == 2 and self.path.name != "s0":
            raise KeyboardInterrupt
        return real_end_epoch(self, record, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "end_epoch", dies_after_member_0_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(_students(teacher_run, tmp_path / "cut"), quiet=True, engine=engine)
    monkeypatch.setattr(RunWriter, "end_epoch", real_end_epoch)
    assert [json.loads(line)["epoch"] for line in (tmp_path / "cut/s0/metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert manifest_json(tmp_path / "cut/s1")["status"] == "interrupted"
    resumed = fit(_students(teacher_run, tmp_path / "cut"), resume=True, quiet=True, engine=engine)
    assert [_weights(r) for r in resumed] == [_weights(r) for r in reference]
    assert all(r.manifest.complete for r in resumed)


def test_a_member_whose_loss_is_not_finite_fails_alone(teacher_run, tmp_path, monkeypatch):
    from ckptkd.training.objective import Objective

    real_loss = Objective.batched

    def member_1_diverges(self, logits, *args, **kwargs):
        losses, terms = real_loss(self, logits, *args, **kwargs)
        if logits.shape[0] == 4:
            losses = losses * torch.tensor([1.0, float("nan"), 1.0, 1.0])
        return losses, terms

    monkeypatch.setattr(Objective, "batched", member_1_diverges)
    outcomes = fit(_students(teacher_run, tmp_path), quiet=True, engine="fused")
    assert isinstance(outcomes[1], UserError) and "nan" in str(outcomes[1])
    assert manifest_json(tmp_path / "s1")["status"] == "failed"
    assert [o.manifest.complete for o in (outcomes[0], outcomes[2], outcomes[3])] == [True, True, True]


def test_a_group_of_one_that_diverges_is_its_outcome_and_other_errors_are_raised(tmp_path):
    cfg = config_mod.resolve(tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 2},
                                         optim={"lr": 1e30}))
    [outcome] = fit([Member(cfg, tmp_path / "alone", None, "train")], quiet=True)
    assert isinstance(outcome, UserError) and "training loss" in str(outcome)
    assert manifest_json(tmp_path / "alone")["status"] == "failed"
    with pytest.raises(UserError, match="already exists"):  # not a member's outcome: the caller's mistake
        fit([Member(cfg, tmp_path / "alone", None, "train")], quiet=True)


def test_only_runs_that_differ_in_seed_teachers_kd_and_log_form_a_group(teacher_run, tmp_path):
    members = _students(teacher_run, tmp_path)
    assert len({group_key(m.cfg) for m in members}) == 1
    other = copy.deepcopy(members[0])
    other.cfg["optim"]["lr"] = 0.01
    other.out = tmp_path / "other"
    assert group_key(other.cfg) != group_key(members[0].cfg)
    with pytest.raises(UserError, match="optim.lr"):
        check_group([members[0], other])
    wide = copy.deepcopy(members[0])
    wide.cfg["model"]["channels"], wide.out = [16, 32], tmp_path / "wide"
    with pytest.raises(UserError, match="model.channels"):
        check_group([members[0], wide])


def test_a_group_too_large_for_memory_is_split_or_refused_naming_its_size():
    assert split_for_memory(list(range(8)), per_member=100, free=1000) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert split_for_memory(list(range(3)), per_member=1, free=10**9) == [[0, 1, 2]]
    with pytest.raises(UserError, match="group of 8 runs needs about 2 MiB per run"):
        split_for_memory(list(range(8)), per_member=2 * 2**20, free=2**20)


def test_a_split_group_says_so_and_trains_every_run(teacher_run, tmp_path, monkeypatch):
    import ckptkd.training.engines as engines_mod
    import ckptkd.training.loop as loop_mod

    said = []
    monkeypatch.setattr(loop_mod, "available_bytes", lambda device: 2 * 2 * engines_mod.step_bytes(
        create("cnn", num_classes=10, in_channels=1, image_size=(8, 8), channels=[8, 16], hidden=32),
        {"name": "cnn", "in_channels": 1, "image_size": [8, 8]}, 64, device))
    runs = fit(_students(teacher_run, tmp_path), quiet=True, announce=said.append)
    assert any("as 2 groups of up to 2" in line for line in said)
    assert [r.manifest.fused["members"] for r in runs] == [2, 2, 2, 2] and all(r.manifest.complete for r in runs)


def test_distill_fuse_on_the_command_line_writes_one_folder_per_teacher_and_seed(teacher_run, tmp_path):
    def cli(*args):  # in this process (the sweep itself runs as a user runs it, in its own)
        done = call_cli(*args)
        return done.returncode, done.stdout, done.stderr

    cfg_path = tmp_path / "student.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 2})))
    out = tmp_path / "sweep"
    done = run_cli("distill", str(cfg_path), "--fuse", "--teacher", "none", "--teacher", teacher_run.ref("0.5"),
                   "--teacher", f"{teacher_run.ref('0.3')}+{teacher_run.ref('last')}", "--seeds", "0,1",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["none-s0", "none-s1", "t@0.3+t@last-s0", "t@0.3+t@last-s1", "t@0.5-s0", "t@0.5-s1"]
    ensemble = manifest_json(out / "t@0.3+t@last-s1")
    assert len(ensemble["teachers"]) == 2 and ensemble["seed"] == 1 and ensemble["fused"]["members"] == 6
    code, _, err = cli("distill", str(cfg_path), "--fuse", "--teacher", f"{teacher_run.path}@epoch=99", "--out",
                       str(tmp_path / "bad"))
    assert code == 2 and "epoch=99" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    code, _, err = cli("distill", str(cfg_path), "--fuse", "--seeds", "0,0", "--teacher", "none", "--out",
                       str(tmp_path / "twice"))
    assert code == 2 and "listed twice" in err
    code, shown, err = cli("show", str(out))  # the folder of students is shown and verified as a whole
    assert code == 0 and all(name in shown for name in names), shown + err
    code, verified, err = cli("verify", str(out))
    assert code == 0 and "all intact" in verified, verified + err
    (out / "t@0.5-s1" / "manifest.json").write_text("{}")
    code, damaged, _ = cli("verify", str(out))
    assert code == 2 and str(out / "t@0.5-s1" / "manifest.json") in damaged
    code, _, err = cli("distill", str(cfg_path), "--fuse", "--teacher", "none", "--out", str(teacher_run.path))
    assert code == 2 and "is a run or a study folder" in err
    assert not (teacher_run.path / "none-s0").exists()


def test_student_folders_tell_teachers_of_the_same_name_apart(tmp_path):
    from ckptkd.training.api import parse_teacher_entry, teacher_slugs

    entries = [[f"{tmp_path}/a/t@0.5"], [f"{tmp_path}/b/t@0.5"], [f"{tmp_path}/a/u@last"], [],
               [f"{tmp_path}/a/t@0.3", f"{tmp_path}/c/v@all"]]
    assert teacher_slugs(entries) == ["a-t@0.5", "b-t@0.5", "u@last", "none", "t@0.3+v@all"]
    assert teacher_slugs([["runs/t@0.5"], ["runs/t"], ["runs/x/t@0.3+t@last-s0@0.5"]]) == [
        "t@0.5", "t", "t@0.3+t@last-s0@0.5"]
    with pytest.raises(UserError, match="cannot join an ensemble"):
        parse_teacher_entry("runs/t@0.5+none")
    (tmp_path / "t@0.3+t@last-s0").mkdir()  # a student of an ensemble, itself used as a teacher
    assert parse_teacher_entry(f"{tmp_path}/t@0.3+t@last-s0@0.5") == [f"{tmp_path}/t@0.3+t@last-s0@0.5"]
    assert parse_teacher_entry(f"{tmp_path}/a@0.5+{tmp_path}/b") == [f"{tmp_path}/a@0.5", f"{tmp_path}/b"]


def test_distill_fused_splits_its_students_into_groups_as_even_as_possible(tmp_path, monkeypatch):
    import ckptkd.training.api as api_mod
    from ckptkd.run import Run
    from ckptkd.training.api import distill_fused

    sizes = []
    monkeypatch.setattr(api_mod, "fit", lambda group, **kw: sizes.append(len(group)) or
                        [Run(m.out) for m in group])
    cfg = tiny_config(model={"name": "mlp", "widths": [4]}, schedule={"epochs": 1})
    distill_fused(cfg, teachers=["none"], seeds=list(range(9)), out=tmp_path / "nine", quiet=True)
    distill_fused(cfg, teachers=["none"], seeds=list(range(17)), out=tmp_path / "many", quiet=True, group_size=8)
    assert sizes == [4, 5, 5, 6, 6]


def test_a_group_of_one_is_an_ordinary_run(teacher_run, tmp_path):
    """Bit-identical to `distill` on its own, and its manifest says nothing of a group."""
    from ckptkd.training.api import distill, distill_fused

    cfg = tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 2})
    alone = distill(cfg, teachers=[teacher_run.ref("0.5")], out=tmp_path / "alone", quiet=True)
    [grouped] = distill_fused(cfg, teachers=[teacher_run.ref("0.5")], out=tmp_path / "group", quiet=True)
    assert manifest_json(grouped.path).get("fused") is None
    assert _weights(grouped) == _weights(alone)


def test_plain_distill_reads_none_and_a_plus_b_as_the_fused_form_does(teacher_run, tmp_path):
    from ckptkd.training.api import distill

    cfg = tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 1})
    baseline = distill(cfg, teachers=["none"], out=tmp_path / "none", quiet=True)
    assert baseline.manifest.teachers == []
    both = distill(cfg, teachers=[f"{teacher_run.ref('0.3')}+{teacher_run.ref('last')}"], out=tmp_path / "ab",
                   quiet=True)
    assert [t["epoch"] for t in both.manifest.teachers] == [2, 6]  # 0.3 of 6 epochs, and the last
    with pytest.raises(UserError, match="none"):
        distill(cfg, teachers=["none", teacher_run.ref("0.5")], out=tmp_path / "mixed", quiet=True)


def test_a_killed_fused_distill_resumes_bit_identical(teacher_run, tmp_path):
    cfg_path = tmp_path / "student.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(model={"name": "cnn", "channels": [8, 16], "hidden": 32},
                                                   schedule={"epochs": 6}, checkpoints={"every": 1})))
    args = ["distill", str(cfg_path), "--fuse", "--teacher", "none", "--teacher", teacher_run.ref("0.5"),
            "--seeds", "0,1"]
    reference = run_cli(*args, "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    delay = random.Random(KILL_SEED).uniform(0.0, 1.0)
    replay = f"(KILL_SEED={KILL_SEED}: SIGKILL {delay:.3f} s after the first resume state)"
    proc = subprocess.Popen([sys.executable, "-m", "ckptkd", *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list(out.glob("*/state/last.safetensors")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, f"{replay}\n{resumed.stderr}"
    for folder in sorted((tmp_path / "ref").iterdir()):
        ref, got = manifest_json(folder), manifest_json(out / folder.name)
        assert got["status"] == "complete", replay
        assert [c["sha256"] for c in got["checkpoints"]] == [c["sha256"] for c in ref["checkpoints"]], replay
        for c in got["checkpoints"]:
            assert sha256_file(out / folder.name / c["path"]) == c["sha256"], replay
    assert not list(out.rglob("*.tmp")), replay
