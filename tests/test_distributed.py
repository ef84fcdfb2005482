"""`torchrun -m ckptkd train|distill` on CPU: two Gloo ranks, each on its half of every global batch."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import ckptkd
from ckptkd import train
from ckptkd.run.storage import load_tensors, sha256_file

from conftest import tiny_config, manifest_json

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
PACKAGE = os.path.dirname(os.path.abspath(ckptkd.__file__))  # src/ckptkd in a checkout, site-packages/ckptkd if not


def torchrun_args(*args: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "ckptkd", *args]


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_args(*args, ranks=ranks), capture_output=True, text=True, env=ENV, timeout=300)


def write_config(path, **sections):
    path.write_text(yaml.safe_dump(tiny_config(**sections)))
    return path


def test_two_ranks_train_the_model_one_process_trains(tmp_path):
    """Equal halves of each global batch and averaged gradients: the single-process update, up to summation order
    (an MLP without BatchNorm, whose statistics would otherwise be per rank)."""
    sections = dict(model={"name": "mlp", "widths": [64]}, schedule={"epochs": 3}, checkpoints={"fractions": [1.0]})
    cfg = write_config(tmp_path / "cfg.yaml", **sections)
    done = torchrun("train", str(cfg), "--out", str(tmp_path / "ddp"), "--set", "log.progress=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("last epoch 3") == 1  # one summary, from rank 0
    single = train(tiny_config(**sections), out=tmp_path / "single", quiet=True)

    ddp = manifest_json(tmp_path / "ddp")
    assert ddp["status"] == "complete" and ddp["distributed"] == {"world_size": 2, "backend": "gloo"}
    a = load_tensors(tmp_path / "ddp" / ddp["checkpoints"][-1]["path"])
    b = load_tensors(single.path / single.manifest.to_dict()["checkpoints"][-1]["path"])
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)
    history = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert abs(history[-1]["train_acc"] - single.manifest.to_dict()["final"]["train_acc"]) < 0.02  # summed over both ranks
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in single.path.iterdir())


@pytest.mark.slow
def test_one_rank_killed_ends_the_job_and_resume_is_bit_identical(tmp_path, teacher_run):
    cfg = write_config(tmp_path / "cfg.yaml", schedule={"epochs": 5}, checkpoints={"every": 1},
                       kd={"cache": "on", "cache_dir": str(tmp_path / "cache")})
    common = ("distill", str(cfg), "--teacher", teacher_run.ref("0.5,1.0"), "--set", "log.progress=false")
    reference = torchrun(*common, "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref = manifest_json(tmp_path / "ref")
    assert ref["teacher_ensemble"]["cache"]["built"] + ref["teacher_ensemble"]["cache"]["reused"] == 2

    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_args(*common, "--out", str(out)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)  # one rank, mid-epoch: the other is left waiting in a collective
    killed_at = time.time()
    try:
        _, err = proc.communicate(timeout=60)  # the job ends, bounded: it never hangs
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and time.time() - killed_at < 60
    assert re.search(r"rank\s*:\s*1\b", err) and "SIGKILL" in err, err[-2000:]  # torchrun names the killed rank
    assert manifest_json(out)["status"] in ("running", "failed")  # cut off (rank 0 may have seen its peer go)

    resumed = torchrun(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = manifest_json(out)
    assert manifest["status"] == "complete"
    assert [c["sha256"] for c in manifest["checkpoints"]] == [c["sha256"] for c in ref["checkpoints"]]
    for c in manifest["checkpoints"]:
        assert sha256_file(out / c["path"]) == c["sha256"]
    assert not list(out.rglob("*.tmp"))


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the worker torchrun started as `rank` (read from its environment)."""
    for _ in range(200):
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
                parents = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(parents[1]) == torchrun_pid and f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


def test_a_global_batch_that_does_not_split_and_other_commands_are_refused(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", data={"batch_size": 63})
    refused = torchrun("train", str(cfg), "--out", str(tmp_path / "odd"))
    assert refused.returncode != 0
    # One line from each rank; the traceback torchrun's launcher prints about failed workers is its own, not ours.
    assert refused.stderr.count("ckptkd: error: config: data.batch_size=63") == 2
    # No traceback frame in ckptkd's own code. Matched on the package's real folder, not on the word "ckptkd": a
    # clone named ckptkd/ puts the word in every path, torch's frames in its .venv included.
    assert not re.search(r'File "' + re.escape(os.path.join(PACKAGE, "")), refused.stderr), refused.stderr
    assert not (tmp_path / "odd").exists()
    # what torchrun sets for its workers; the refusal comes before any process group is joined
    env = {**ENV, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    study = subprocess.run([sys.executable, "-m", "ckptkd", "study", str(cfg), "--out", str(tmp_path / "study")],
                           capture_output=True, text=True, env=env, timeout=120)
    assert study.returncode == 2 and not (tmp_path / "study").exists()
    assert study.stderr.strip() == ("ckptkd: error: ckptkd study does not run under torchrun; only train and distill "
                                    "do (start study workers as separate processes instead)")
