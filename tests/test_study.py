import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ckptkd.errors import UserError
from ckptkd.study.queue import ResultsDB
from ckptkd.study.config import VARIANTS, resolve_study
from ckptkd.study.plan import plan
from ckptkd.study.runner import run_study

RUN = {"data": {"name": "digits", "batch_size": 64}, "device": "cpu", "log": {"progress": False, "tensorboard": False}}


def tiny_study(**extra):
    study = {
        "name": "tiny",
        "seeds": 2,
        "ensemble_size": 2,
        "pairs": [{
            "teacher": {**RUN, "model": {"name": "resnet8"}, "schedule": {"epochs": 4}},
            "student": {**RUN, "model": {"name": "mlp", "widths": [16]}, "schedule": {"epochs": 2},
                        "checkpoints": {"fractions": [1.0]}},
        }],
    }
    study.update(extra)
    return study


def test_plan_covers_the_paper_grid():
    tasks = plan(resolve_study(tiny_study()))
    kinds = [t.kind for t in tasks]
    assert kinds.count("train") == 2 and kinds.count("analyze") == 1 and kinds.count("distill") == 2 * len(VARIANTS)
    students = {(t.group["variant"], t.group["seed"]): t for t in tasks if t.kind == "distill"}
    teacher = next(t for t in tasks if t.kind == "train" and t.group["role"] == "teacher")
    # Fixed checkpoints are named by epoch (of 4): 0.5 -> 2; 0.3, 0.5, 0.7 -> 1, 2, 3.
    assert students[("T0.5", 0)].config["kd"]["teachers"] == [f"{teacher.path}@epoch=2"]
    assert students[("snapshot", 1)].config["kd"]["teachers"] == [f"{teacher.path}@epoch={e}" for e in (1, 2, 3)]
    assert len(students[("full_ensemble", 0)].config["kd"]["teachers"]) == 2
    analysis = next(t for t in tasks if t.kind == "analyze")
    assert analysis.run_id in students[("Tstar", 1)].depends_on
    assert students[("none", 0)].depends_on == []
    assert {0.3, 0.5, 0.7, 1.0} <= set(teacher.config["checkpoints"]["fractions"])
    per_seed = plan(resolve_study(tiny_study(teacher_per_seed=True)))
    # one trajectory per student seed; with 2 of them the full ensemble of M = 2 needs no extra members
    assert sum(t.kind == "train" for t in per_seed) == 2
    assert sum(t.kind == "train" for t in plan(resolve_study(tiny_study(teacher_per_seed=True, seeds=1)))) == 2


@pytest.mark.parametrize("change, needle", [
    ({"seeds": 0}, "seeds"), ({"variants": ["Thalf"]}, "variants"), ({"variants": ["T1.5"]}, "variants"),
    ({"variants": ["none@online"]}, "variants"), ({"variants": ["Tfull@tau=10@tau=4"]}, "variants"),
    ({"max_attempts": 0}, "max_attempts"), ({"pairs": []}, "pairs"),
    ({"ensemble_size": 1}, "ensemble_size"), ({"colour": "red"}, "colour"),
    ({"launcher": "kubernetes"}, "launcher must be local or slurm"), ({"slurm": {"gpus": 1}}, "slurm.gpus"),
    ({"slurm": {"time_min": 0}}, "slurm.time_min"), ({"slurm": {"extra": ["--exclusive"]}}, "slurm.extra"),
    ({"seeds": 10**9}, "seeds must be a count from 1 to 1,000"), ({"seeds": list(range(1001))}, "at most 1,000 seeds"),
    ({"seeds": [0, 2**31]}, "seeds must be"), ({"analysis": {"seeds": 10**9}}, "analysis.seeds must be"),
    ({"analysis": {"seeds": 0}}, "analysis.seeds"), ({"analysis": {"seed": 2**40}}, "analysis.seed must be"),
    ({"analysis": {"split": "test"}}, "analysis.split must be train or val"),
    ({"analysis": {"temperature": -1}}, "analysis.temperature must be"), ({"analysis": {"k": 1}}, "'analysis.k'"),
])
def test_bad_study_configs_name_the_field(change, needle):
    with pytest.raises(UserError, match=needle):
        resolve_study(tiny_study(**change))


def test_a_study_runs_the_grid_and_a_rerun_redoes_nothing(tmp_path):
    study = run_study(tiny_study(), out=tmp_path / "s", quiet=True)
    db = ResultsDB(study / "results.sqlite")
    rows = db.rows()
    assert len(rows) == 3 + 2 * len(VARIANTS) and all(r["status"] == "complete" for r in rows)
    report = (study / "report.md").read_text()
    for label in ("T^0.3", "T^0.5", "T^0.7", "T^full", "T*", "snapshot", "full ens"):
        assert label in report
    assert (study / "results.csv").read_text().count("\n") == len(rows) + 1
    assert (study / "plots" / "accuracy_by_variant.png").is_file()
    _shows_each_task_by_variant(study, rows)
    mtimes = {p: p.stat().st_mtime_ns for p in (study / "runs").rglob("*.safetensors")}
    run_study(tiny_study(), out=tmp_path / "s", quiet=True)
    assert {p: p.stat().st_mtime_ns for p in (study / "runs").rglob("*.safetensors")} == mtimes
    assert all(r["attempts"] == 1 for r in ResultsDB(study / "results.sqlite").rows())


def _shows_each_task_by_variant(study, rows):
    """`ckptkd show STUDY`: one row per task with its pair, variant, trajectory, seed, the teacher epochs its run
    distilled from, and its status in the database."""
    import io

    from rich.console import Console

    from ckptkd.cli.tables import study_table
    from ckptkd.run import Run

    table = study_table(study, console=Console(file=io.StringIO(), width=300))
    cells = {column.header: list(column._cells) for column in table.columns}
    assert cells["run"] == [r["name"] for r in rows]
    assert f"({len(rows)} tasks: {len(rows)} complete)" in table.title
    for i, row in enumerate(rows):
        group = row["group"]
        assert cells["variant"][i] == group.get("variant", "") and cells["seed"][i] == str(group["seed"])
        assert cells["status"][i] == "complete"
        if group["role"] == "student":
            teachers = Run(study / row["path"]).manifest.teachers
            assert cells["teacher epochs"][i] == "+".join(str(t["epoch"]) for t in teachers)
    assert set(cells["variant"]) == set(VARIANTS) | {""}
    assert {cells["kind"][i] for i in range(len(rows))} == {"teacher", "ensemble_member", "analysis", "student"}


def test_another_study_in_the_same_folder_is_refused(tmp_path):
    run_study(tiny_study(variants=["none"], seeds=1), out=tmp_path / "s", quiet=True)
    with pytest.raises(UserError, match="different study"):
        run_study(tiny_study(variants=["none"], seeds=2), out=tmp_path / "s", quiet=True)


def _start(config_path, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "ckptkd", "study", str(config_path), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def test_killed_half_way_then_rerun_finishes_without_redoing_finished_runs(tmp_path):
    config_path = tmp_path / "study.yaml"
    # Groups of 2 students, so the study has several groups to finish after the kill.
    config_path.write_text(yaml.safe_dump(tiny_study(variants=["none", "T0.5", "Tfull", "snapshot"], fuse=2)))
    out = tmp_path / "s"
    proc = _start(config_path, out)

    def finished() -> int:
        try:  # read-only: never waits for the study's write lock, never creates the file or its table
            with ResultsDB(out / "results.sqlite", readonly=True) as db:
                return sum(r["status"] == "complete" for r in db.rows())
        except UserError:  # not created yet, or its table not yet committed
            return 0

    # However fast or slow the machine, wait (polling) until 4 tasks are done; no assertion here reads a clock.
    while proc.poll() is None and finished() < 4:
        time.sleep(0.2)
    assert proc.poll() is None, f"the study ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGSTOP)  # frozen now: what it has finished is what the kill leaves
    with ResultsDB(out / "results.sqlite", readonly=True) as db:  # it may be frozen holding the write lock
        rows = db.rows()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = [r for r in rows if r["status"] == "complete"]
    assert 4 <= len(complete) < len(rows) == 10, "the study should have been killed half-way"
    finished_before = {r["run_id"]: r["timings"]["finished_at"] for r in complete}
    rerun = _start(config_path, out)
    assert rerun.wait(timeout=1800) == 0, rerun.stderr.read()  # the timeout only guards against a hang
    rows = {r["run_id"]: r for r in ResultsDB(out / "results.sqlite").rows()}
    assert all(r["status"] == "complete" for r in rows.values())
    for run_id, finished_at in finished_before.items():
        assert rows[run_id]["attempts"] == 1 and rows[run_id]["timings"]["finished_at"] == finished_at
    assert (out / "report.md").is_file()


def test_two_processes_share_one_study_and_do_each_run_once(tmp_path):
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(tiny_study(variants=["none", "T0.3", "T0.7", "Tfull", "full_ensemble"])))
    out = tmp_path / "s"
    procs = [_start(config_path, out) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=400) == 0, proc.stderr.read()
    rows = ResultsDB(out / "results.sqlite").rows()
    assert len(rows) == 3 + 2 * 5
    assert all(r["status"] == "complete" and r["attempts"] == 1 for r in rows)
    claimers = {r["claimer"].split("/")[0] for r in rows}
    assert len(claimers) == 2, claimers  # both processes did part of the grid


def test_pairs_with_the_same_teacher_share_its_runs():
    study = tiny_study()
    study["pairs"].append({**study["pairs"][0], "student_set": {"model.widths": [8]}, "name": "second"})
    tasks = plan(resolve_study(study))
    teachers = [t for t in tasks if t.kind == "train"]
    assert len(teachers) == 2 and all(t.group["pairs"] == ["resnet8->mlp", "second"] for t in teachers)
    assert sum(t.kind == "distill" for t in tasks) == 2 * 2 * len(VARIANTS)


@pytest.mark.slow
def test_cifar100_table3_grid_runs_one_epoch_on_fixture_cifar_data(tmp_path):
    """The paper's four pairs and recipes, on CIFAR-100-format fixture files: one epoch, one seed, an ensemble of 2,
    and one variant of each teacher kind (none, one checkpoint chosen by analysis, snapshot, full ensemble)."""
    from fixtures import write_cifar100

    from conftest import REPO

    root = write_cifar100(tmp_path / "data", train_per_class=2, test_per_class=1)
    overrides = ["seeds=1", "ensemble_size=2", "variants=[none, Tstar, snapshot, full_ensemble]",
                 f"common.data.root={root}", "common.schedule.epochs=1",
                 "common.data.val_fraction=0.5", "common.data.batch_size=100", "common.kd.cache=off",
                 "common.log.progress=false", "common.device=cpu"]
    study = run_study(str(REPO / "configs" / "cifar100_table3.yaml"), out=tmp_path / "s", overrides=overrides,
                      quiet=True)
    rows = ResultsDB(study / "results.sqlite").rows()
    assert all(r["status"] == "complete" for r in rows), [(r["name"], r["error"]) for r in rows if r["error"]]
    assert sum(r["kind"] == "train" for r in rows) == 4  # WRN-40-2 and ResNet-110, each shared by two students
    # 4 pairs x 4 variants, but the two MobileNetV2 pairs' no-KD student is one run serving both
    assert sum(r["kind"] == "distill" for r in rows) == 4 * 4 - 1
    shared = next(r for r in rows if r["kind"] == "distill" and len(r["group"]["pairs"]) == 2)
    assert shared["group"]["variant"] == "none" and shared["name"] == "WRN-40-2-to-MobileNetV2-none-s0"
    report = (study / "report.md").read_text()
    for pair in ("WRN-40-2->WRN-40-1", "WRN-40-2->MobileNetV2", "ResNet-110->ResNet-32", "ResNet-110->MobileNetV2"):
        assert pair in report
    # aligned with the released code (results/paper_table3.md): its students, logit averaging, its normalisation,
    # and its metric recorded and reported beside ours
    snapshot = next(r for r in rows if r["group"].get("variant") == "snapshot" and "MobileNetV2" in r["name"])
    config = snapshot["config"] if isinstance(snapshot["config"], dict) else json.loads(snapshot["config"])
    assert config["model"]["name"] == "mobilenetv2_075" and config["kd"]["ensemble"] == "logits"
    assert config["optim"]["lr"] == 0.1 and config["data"]["mean"] == [0.5071, 0.4867, 0.4408]
    assert config["eval"] == {"last_k": 5, "best_of_last": 10}
    assert snapshot["metrics"]["test_acc_best_of_last"] is not None
    assert "The same students in the paper's own metric" in report


def test_trajectories_pair_every_seed_with_every_teacher_and_share_what_is_identical():
    """3 trajectories x 2 seeds: the full ensemble is the trajectories' last checkpoints (no extra members), the
    no-KD student of a seed serves every trajectory, T0.5 and the curve's epoch2 are one student."""
    study = tiny_study(trajectories=3, ensemble_size=3, variants=["none", "T0.5", "Tfull", "full_ensemble"],
                       curve=True)
    tasks = plan(resolve_study(study))
    assert sum(t.kind == "train" for t in tasks) == 3 and sum(t.kind == "analyze" for t in tasks) == 3
    students = [t for t in tasks if t.kind == "distill"]
    cells = [tuple(c) for t in students for c in t.group["serves"]]
    assert len(cells) == len(set(cells))
    by_cell = {c[1:]: t for t in students for c in map(tuple, t.group["serves"])}
    for seed in (0, 1):
        assert len({by_cell[("none", t, seed)].run_id for t in (0, 1, 2)}) == 1
        assert len({by_cell[("full_ensemble", t, seed)].run_id for t in (0, 1, 2)}) == 1
        for t in (0, 1, 2):
            assert by_cell[("T0.5", t, seed)] is by_cell[("epoch2", t, seed)]
            assert by_cell[("Tfull", t, seed)] is by_cell[("epoch4", t, seed)]
    members = by_cell[("full_ensemble", 0, 0)].config["kd"]["teachers"]
    assert len(members) == 3 and all(m.endswith("@epoch=4") for m in members)
    # curve (4 epochs) + none + T0.5/Tfull (shared with the curve) + full ensemble, per seed
    assert len(students) == 2 * (3 * 4 + 1 + 1)
    # the selection benchmark's proxy selector: one per trajectory, after its teacher, for the pair's student
    proxies = [t for t in tasks if t.kind == "proxy"]
    teachers = {t.group["teacher_seed"]: t for t in tasks if t.kind == "train"}
    assert sorted(t.group["teacher_seed"] for t in proxies) == [0, 1, 2]
    for proxy in proxies:
        assert proxy.depends_on == [teachers[proxy.group["teacher_seed"]].run_id]
        assert proxy.config["run"] == teachers[proxy.group["teacher_seed"]].path
        assert proxy.config["epochs"] == 1 and proxy.config["student"]["model"] == students[0].config["model"]


def test_a_pair_may_have_its_own_variants_and_label_noise():
    study = tiny_study()
    study["pairs"].append({**study["pairs"][0], "name": "noisy", "variants": ["none", "T0.5"],
                           "teacher_set": {"data.label_noise": 0.2}, "student_set": {"data.label_noise": 0.2}})
    tasks = plan(resolve_study(study))
    noisy = [t for t in tasks if t.kind == "distill" and t.group["pair"] == "noisy"]
    assert {t.group["variant"] for t in noisy} == {"none", "T0.5"}
    assert all(t.config["data"]["label_noise"] == 0.2 for t in noisy)


def test_an_option_added_later_leaves_task_identity_alone_at_the_value_that_reproduces_the_past():
    """A study begun before kd.teacher_mode existed resumes under the same task names (its rows are found again);
    a task that asks for the new behaviour is a different task."""
    from ckptkd import config as config_mod
    from ckptkd.study.plan import task_id

    before = config_mod.resolve(None, {"data.name": "digits"})
    del before["kd"]["teacher_mode"]
    now = config_mod.resolve(None, {"data.name": "digits"})
    assert now["kd"]["teacher_mode"] == "eval"
    assert task_id("distill", now) == task_id("distill", before)
    live = config_mod.resolve(None, {"data.name": "digits", "kd.teacher_mode": "train"})
    assert task_id("distill", live) != task_id("distill", now)


def test_fused_groups_follow_the_plan_and_each_run_keeps_its_row(tmp_path):
    from ckptkd.study.plan import fuse_groups

    study = tiny_study(fuse=3)
    tasks = plan(resolve_study(study))
    groups = fuse_groups(tasks, 3)
    students = [t.run_id for t in tasks if t.kind == "distill"]
    teachers = [t.run_id for t in tasks if t.kind == "train"]
    assert groups[teachers[0]] == teachers  # the two teachers differ only in their seed
    assert [groups[s] for s in students[:3]] == [students[:3]] * 3 and groups[students[-1]] == students[15:]
    assert not any(t.run_id in groups for t in tasks if t.kind == "analyze")
    assert fuse_groups(tasks, 3) == groups  # fixed by the plan alone
    with pytest.raises(UserError, match="fuse"):
        resolve_study(tiny_study(fuse="sometimes"))
    done = run_study(study, out=tmp_path / "s", quiet=True)
    rows = ResultsDB(done / "results.sqlite").rows()
    assert all(r["status"] == "complete" and r["attempts"] == 1 for r in rows)
    fused = [json.loads((done / r["path"] / "manifest.json").read_text()).get("fused") for r in rows
             if r["kind"] == "distill"]
    assert [f["members"] for f in fused[:15]] == [3] * 15
    assert fused[15] is None  # a group of one is an ordinary run
    # fuse says how runs are trained, not what they compute: the same study resumes under another setting
    run_study(tiny_study(fuse="off"), out=tmp_path / "s", quiet=True)


def test_one_of_two_workers_killed_the_other_finishes_and_nothing_is_done_twice(tmp_path):
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(tiny_study(variants=["none", "T0.5", "Tfull"], fuse=1)))
    out = tmp_path / "s"
    doomed, survivor = _start(config_path, out), _start(config_path, out)

    def running_claims() -> list[dict]:
        try:
            with ResultsDB(out / "results.sqlite", readonly=True) as db:
                return [r for r in db.rows() if r["status"] == "running" and r["claimer_pid"] == doomed.pid]
        except UserError:
            return []

    while doomed.poll() is None and not running_claims():  # kill it while it holds a task
        time.sleep(0.05)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert survivor.wait(timeout=600) == 0, survivor.stderr.read()
    rows = ResultsDB(out / "results.sqlite").rows()
    assert len(rows) == 2 + 2 * 3 and all(r["status"] == "complete" for r in rows)  # teacher, analysis, students
    taken_over = [r for r in rows if r["attempts"] == 2]
    assert len(taken_over) <= 1 and all(r["attempts"] == 1 for r in rows if r not in taken_over)
    assert all(r["claimer_pid"] == survivor.pid for r in taken_over)


def test_online_students_in_a_fused_group_run_their_teachers_online(tmp_path):
    """An @online student shares its group (and its teachers' references) with the cached one, never the cache."""
    study = tiny_study(variants=["T0.5", "snapshot"], compare_online=["T0.5", "snapshot"], seeds=1, fuse=4,
                       kd={"cache": "on"})
    done = run_study(study, out=tmp_path / "s", quiet=True)
    students = [r for r in ResultsDB(done / "results.sqlite").rows() if r["kind"] == "distill"]
    assert len(students) == 4
    for row in students:
        manifest = json.loads((done / row["path"] / "manifest.json").read_text())
        assert manifest["fused"]["members"] == 4
        online = row["group"]["variant"].endswith("@online")
        assert ("cache" in manifest["teacher_ensemble"]) is not online, row["group"]["variant"]


def test_a_selection_benchmark_study_runs_the_proxy_selector_and_reports_every_selector(tmp_path):
    """End to end on digits: 2 trajectories with a student from every checkpoint; each trajectory's proxy selection
    runs (after its teacher) and the report scores it beside the criteria, with its cost."""
    from ckptkd.study.queue import ResultsDB

    study = tiny_study(trajectories=2, variants=["none", "Tfull"], curve=True,
                       analysis={"seeds": 2, "split": "train", "seed": 0})
    out = run_study(study, out=tmp_path / "s", quiet=True)
    rows = ResultsDB(out / "results.sqlite", readonly=True).rows()
    proxies = [r for r in rows if r["kind"] == "proxy"]
    assert len(proxies) == 2 and all(r["status"] == "complete" for r in proxies)
    for r in proxies:
        scores = {row["epoch"]: row["score"] for row in r["metrics"]["scores"]}
        assert r["metrics"]["t_star"] == max(scores, key=lambda e: (scores[e], e)) and r["metrics"]["cost_s"] > 0
    report = (out / "report.md").read_text()
    table = report.split("## Selection benchmark:", 1)[1].split("\n## ", 1)[0]
    proxy_row = next(line for line in table.splitlines() if line.startswith("| proxy"))
    picks = ", ".join(str(r["metrics"]["t_star"]) for r in sorted(proxies, key=lambda r: r["group"]["teacher_seed"]))
    assert f"| {picks} |" in proxy_row
    assert "| proxy selection |" in report  # its time, in the compute-time table


@pytest.mark.slow
def test_sigterm_three_times_during_the_teacher_spends_none_of_its_attempts(tmp_path):
    """A local study worker stopped with SIGTERM while it trains the teacher, three times (preemption, `docker
    stop`): each time it exits 143 and gives the task back; started again, the study completes and the teacher's row
    records one attempt, not four."""
    study = tiny_study(variants=["none", "Tfull"], seeds=1, max_attempts=2)
    study["pairs"][0]["teacher"]["schedule"] = {"epochs": 30}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "s"
    command = [sys.executable, "-m", "ckptkd", "study", str(path), "--out", str(out), "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(3):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        states = list(out.glob("runs/teacher-*/state/last.safetensors"))
        before = states[0].stat().st_mtime_ns if states else None
        deadline = time.time() + 120
        while time.time() < deadline:  # a new epoch of the teacher written by this worker
            states = list(out.glob("runs/teacher-*/state/last.safetensors"))
            if states and states[0].stat().st_mtime_ns != before:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, (attempt, err)
        teacher = next(r for r in ResultsDB(out / "results.sqlite", readonly=True).rows() if r["kind"] == "train")
        assert teacher["status"] == "pending" and teacher["attempts"] == 0, (attempt, teacher)
        manifest = json.loads(next(out.glob("runs/teacher-*/manifest.json")).read_text())
        assert manifest["status"] == "interrupted", attempt
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr
    rows = ResultsDB(out / "results.sqlite", readonly=True).rows()
    assert all(r["status"] == "complete" for r in rows)
    assert next(r for r in rows if r["kind"] == "train")["attempts"] == 1


@pytest.mark.slow
def test_a_study_killed_mid_student_resumes_after_a_move_from_another_directory(tmp_path):
    """Nothing a study stores depends on the working directory or on where the study folder lies: killed while a
    student trains, moved, and started again from elsewhere, it completes with every task done once, its students'
    weights those of an uninterrupted study, and the report unchanged by another move."""
    study = tiny_study(variants=["none", "T0.5", "Tfull"], seeds=1)
    study["pairs"][0]["student"]["schedule"] = {"epochs": 30}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "study.yaml").write_text(yaml.safe_dump(study))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = run_study(study, out=tmp_path / "reference", quiet=True)
    proc = subprocess.Popen([sys.executable, "-m", "ckptkd", "study", "study.yaml", "--out", "s"],
                            cwd=tmp_path / "a", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not list((tmp_path / "a" / "s").glob("runs/*-T0.5-*/state/last.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "a" / "s" / "report.md").exists()  # it was killed mid-study
    os.rename(tmp_path / "a" / "s", tmp_path / "moved")
    resumed = subprocess.run([sys.executable, "-m", "ckptkd", "study", "../a/study.yaml", "--out", "../moved"],
                             cwd=tmp_path / "b", capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    rows = ResultsDB(tmp_path / "moved" / "results.sqlite", readonly=True).rows()
    assert all(r["status"] == "complete" for r in rows)
    # the killed group of students (trained as one): one attempt more each; everything else once
    assert {(r["kind"], r["attempts"]) for r in rows} == {("train", 1), ("analyze", 1), ("distill", 2)}
    for run in (tmp_path / "moved" / "runs").iterdir():
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert all(not os.path.isabs(t) and t.startswith("../") for t in saved["kd"]["teachers"]), run.name
        ours, theirs = (json.loads((folder / run.name / "manifest.json").read_text())["checkpoints"][-1]["sha256"]
                        for folder in (tmp_path / "moved" / "runs", reference / "runs"))
        assert ours == theirs, run.name
    report = (tmp_path / "moved" / "report.md").read_bytes()
    os.rename(tmp_path / "moved", tmp_path / "b" / "again")
    again = subprocess.run([sys.executable, "-m", "ckptkd", "report", "again"], cwd=tmp_path / "b",
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b" / "again" / "report.md").read_bytes() == report
