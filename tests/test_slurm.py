"""The Slurm launcher against a real Slurm (.ci/slurm-up starts a one-node one; CI sets CKPTKD_REQUIRE_SLURM=1, so
there these tests fail rather than skip when Slurm is not up).

One study runs through `--launcher slurm` while the test does to it what a cluster does: its coordinator is killed
(SIGKILL) and started again, the teachers' job is warned of its time limit (SIGUSR2: it requeues itself) and the
students' job is cancelled with scancel. The study must still finish with every task complete, nothing submitted
twice but the cancelled job's tasks, and every weight equal to the same study run with the local launcher."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from ckptkd.errors import UserError
from ckptkd.study.queue import ResultsDB
from ckptkd.study.runner import run_study
from ckptkd.study.slurm import read_outcome, run_element

RUN = {"data": {"name": "digits", "batch_size": 64}, "device": "cpu", "log": {"progress": False, "tensorboard": False}}


def slurm_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when a Slurm node is up and idle enough to take jobs."""
    for command in ("sbatch", "squeue", "scontrol", "sinfo"):
        if shutil.which(command) is None:
            return f"{command} is not on PATH (Slurm is not installed; .ci/run installs and starts it)"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install -e '.[dev]')"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    if states.returncode != 0 or not ({"idle", "mixed", "allocated"} & set(states.stdout.split())):
        return f"no Slurm node is up (sinfo: {(states.stdout or states.stderr).strip() or 'nothing'}; run .ci/slurm-up)"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = slurm_problem()
    if problem:
        if os.environ.get("CKPTKD_REQUIRE_SLURM"):
            pytest.fail(f"Slurm is required here (CKPTKD_REQUIRE_SLURM) but cannot be used: {problem}")
        print(f"\nskipping the real-Slurm tests: {problem}", file=sys.stderr)
        pytest.skip(problem)


def small_study(name="cluster") -> dict:
    """Two trajectories, two seeds: 2 teachers, 2 analyses, 10 students (fused into groups)."""
    return {
        "name": name, "seeds": 2, "trajectories": 2, "ensemble_size": 2, "variants": ["none", "T0.5", "Tfull"],
        "slurm": {"time_min": 30, "cpus_per_task": 1},
        "pairs": [{
            # Long enough (16 short epochs) that the teachers are still training when the test warns their job.
            "teacher": {**RUN, "model": {"name": "resnet8"}, "schedule": {"epochs": 16}},
            "student": {**RUN, "model": {"name": "mlp", "widths": [16]}, "schedule": {"epochs": 3},
                        "checkpoints": {"fractions": [1.0]}},
        }],
    }


def weights(study: Path) -> dict[str, dict]:
    """Every checkpoint of every run of a study: relative path -> {tensor name: tensor}."""
    out = {}
    for path in sorted((study / "runs").rglob("checkpoints/*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[str(path.relative_to(study))] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def rows(study: Path) -> list[dict]:
    try:
        with ResultsDB(study / "results.sqlite", readonly=True) as db:
            return db.rows()
    except UserError:  # not created yet
        return []


def squeue(job: str) -> str:
    done = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return done.stdout.strip()


def restarts(job: str) -> int:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return int(shown.split("Restarts=")[1].split()[0])


def wait_for(what: str, condition, proc, timeout=600.0):
    """Poll until `condition()` holds; the timeout only guards against a hang (nothing asserts on a clock)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the coordinator ended while waiting for {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def coordinator(config: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "ckptkd", "study", str(config), "--out", str(out), "--launcher",
                             "slurm", "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)


@pytest.mark.slow
def test_a_study_through_real_slurm_survives_a_killed_coordinator_a_requeue_and_scancel(slurm, tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(small_study()))
    out = tmp_path / "slurm"

    # 1. The coordinator is killed outright once the teachers' job is out; the same command re-attaches.
    first = coordinator(config, out)
    wait_for("the teachers' job", lambda: any(r["kind"] == "train" and r.get("job") for r in rows(out)), first)
    first.kill()
    first.wait()
    teachers = [r for r in rows(out) if r["kind"] == "train"]
    teacher_job = teachers[0]["job"]
    assert {r["job"] for r in teachers} == {teacher_job}, "the two teachers are one fused group: one job"
    second = coordinator(config, out)

    # 2. The teachers' job is warned of its time limit once it has saved a checkpoint: it requeues itself.
    wait_for("a teacher checkpoint", lambda: any(out.glob("runs/*/checkpoints/*.safetensors")), second)
    assert squeue(teacher_job) == "RUNNING", "the teachers finished before the test could warn their job"
    subprocess.run(["scancel", "--signal=USR2", teacher_job], check=True)
    wait_for("the requeue", lambda: restarts(teacher_job) == 1, second)

    # Slurm holds a requeued job back until its old credential expires (Reason=BeginTime; forcing StartTime=now
    # fails its launch): .ci/slurm-up sets cred_expire=10, so this is about 20 s.
    wait_for("the requeued job to start", lambda: squeue(teacher_job) in ("RUNNING", "COMPLETED"), second)

    # 3. The job of the first students' group is cancelled while it runs: its tasks are sent out again.
    def student_job():
        jobs = [r["job"] for r in rows(out) if r["group"]["role"] == "student"
                and r.get("job") and r["status"] == "running"]
        return jobs[0] if jobs and squeue(jobs[0]) == "RUNNING" else None

    wait_for("a students' job running", lambda: student_job() is not None, second)
    cancelled = student_job()
    cancelled_rows = [r for r in rows(out) if r.get("job") == cancelled]
    cancelled_runs = {r["run_id"] for r in cancelled_rows}
    # Once its runs are being written (their locks taken), the job is in ckptkd's hands: scancel's SIGTERM is
    # an interruption that spends no attempt.
    wait_for("the students' training", lambda: all((out / r["path"] / ".lock").is_file() for r in cancelled_rows),
             second)
    subprocess.run(["scancel", cancelled], check=True)
    assert second.wait(timeout=1200) == 0, second.stderr.read()

    # Every task complete, each in one batch but the cancelled job's, which went out exactly twice.
    final = rows(out)
    assert final and all(r["status"] == "complete" for r in final), [(r["name"], r["status"]) for r in final]
    assert all(r["attempts"] == 1 for r in final), [(r["name"], r["attempts"]) for r in final]
    batches: dict[str, int] = {}
    for tasks in out.glob("slurm/*/tasks.json"):
        for element in json.loads(tasks.read_text())["elements"]:
            for run_id in element:
                batches[run_id] = batches.get(run_id, 0) + 1
    assert {r for r, n in batches.items() if n != 1} == cancelled_runs
    assert all(batches[r] == 2 for r in cancelled_runs)
    assert sum(r["group"]["role"] == "student" for r in final) >= 6
    assert len({r["group"]["teacher_seed"] for r in final if r["group"]["role"] == "teacher"}) >= 2
    # The requeued teachers: one job id, recorded in their manifests, and one attempt.
    for teacher in (r for r in final if r["kind"] == "train" and r["group"]["role"] == "teacher"):
        manifest = json.loads((out / teacher["path"] / "manifest.json").read_text())
        assert manifest["slurm_jobs"] == [teacher_job] and teacher["attempts"] == 1

    # 4. The same study with the local launcher: the same weights, checkpoint by checkpoint.
    local = run_study(small_study(), out=tmp_path / "local", quiet=True, report=False)
    expected, got = weights(local), weights(out)
    assert sorted(got) == sorted(expected) and len(got) >= 2 + 10
    for path, tensors in expected.items():
        assert all(got[path][k].equal(v) for k, v in tensors.items()), f"{path} differs"


def test_a_job_element_writes_each_outcome_and_a_requeued_one_skips_what_it_finished(tmp_path):
    """Without Slurm: what a job array element runs, in this process."""
    from ckptkd.study.config import resolve_study
    from ckptkd.study.plan import plan

    study = resolve_study({**small_study("element"), "seeds": 1, "trajectories": 1, "variants": ["none"]})
    tasks = plan(study)
    student = next(t for t in tasks if t.group["role"] == "student")
    row = {"run_id": student.run_id, "kind": student.kind, "name": student.name, "config": student.config,
           "path": student.path, "group": student.group}
    assert run_element(str(tmp_path), "b1", [row]) == "done"
    outcome = read_outcome(tmp_path, "b1", row["run_id"])
    assert outcome["status"] == "complete" and outcome["metrics"]["test_acc"] > 0.3
    state = tmp_path / row["path"] / "state" / "last.safetensors"
    before = state.stat().st_mtime_ns
    assert run_element(str(tmp_path), "b1", [row]) == "done"  # a requeued element: nothing left to run
    assert state.stat().st_mtime_ns == before
    # A damaged outcome is no outcome: the task is run again (its folder, complete, is not retrained).
    path = tmp_path / "slurm" / "b1" / "outcomes" / f"{row['run_id']}.json"
    path.write_text(path.read_text().replace("complete", "completf"))
    assert read_outcome(tmp_path, "b1", row["run_id"]) is None
    bad = {**row, "run_id": "bad", "kind": "distill", "path": "runs/x",
           "config": {**row["config"], "kd": {**row["config"]["kd"], "teachers": ["runs/nowhere@last"]}}}
    assert run_element(str(tmp_path), "b2", [bad]) == "done"
    failed = read_outcome(tmp_path, "b2", "bad")
    assert failed["status"] == "failed" and "nowhere" in failed["error"], failed


def test_a_local_worker_refuses_a_study_whose_tasks_are_out_as_slurm_jobs(tmp_path):
    out = tmp_path / "s"
    run_study({**small_study("mixed"), "seeds": 1, "trajectories": 1, "variants": ["none"]}, out=out, quiet=True,
              report=False, max_tasks=0)
    with ResultsDB(out / "results.sqlite") as db:
        [claimed] = db.claim_group("slurm")
        db.assign(claimed["run_id"], batch="b1")
        db.assign(claimed["run_id"], job="41_0")
    with pytest.raises(UserError, match=r"out as Slurm jobs .*job 41_0.*--launcher slurm"):
        run_study({**small_study("mixed"), "seeds": 1, "trajectories": 1, "variants": ["none"]}, out=out,
                  quiet=True, report=False)
