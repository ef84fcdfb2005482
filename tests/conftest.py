import importlib.util
import itertools
import json
import statistics
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Subprocesses (`python -m ckptkd ...`) import the same ckptkd as these tests: this checkout's src/, or under mutmut
# the mutated copy in mutants/src/, not whatever the environment has installed.
_TESTED_SRC = str(Path(importlib.util.find_spec("ckptkd").origin).parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTED_SRC, os.environ.get("PYTHONPATH")) if p)
torch.set_num_threads(1)

# The property tests (Hypothesis) draw the same examples on every machine and in every run, CI's included: a failure
# is reproducible, never a coin toss between two runs of one commit. HYPOTHESIS_PROFILE=explore draws new examples
# (and keeps what fails in .hypothesis/ to replay).
settings.register_profile("ckptkd", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ckptkd"))

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """The tests marked slow (tens of seconds each; the Slurm one near two minutes) run first: pytest-xdist hands
    tests out in collection order, and one of them started last would leave the other worker idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort: otherwise as collected


def tiny_config(**sections) -> dict:
    """A digits run small enough for unit tests (a few seconds), with every section overridable."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "resnet8"},
        "optim": {"lr": 0.05},
        "schedule": {"name": "multistep", "epochs": 4, "milestones": [0.5, 0.75]},
        "checkpoints": {"fractions": [0.5, 1.0]},
        "log": {"progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def stop_after_epoch(monkeypatch, epoch: int | None = None):
    """Make the run folder raise KeyboardInterrupt right after it saves the resume state of `epoch` (None: the
    first saved); returns the function that undoes it. What a Ctrl-C between two epochs leaves behind."""
    import sys as _sys

    folder_module = _sys.modules["ckptkd.run.folder"]
    save_state = folder_module.save_state

    def save_then_stop(path, model, optimizer, progress, **ema):
        save_state(path, model, optimizer, progress, **ema)
        if epoch is None or progress.epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(folder_module, "save_state", save_then_stop)
    return lambda: monkeypatch.setattr(folder_module, "save_state", save_state)


def manifest_json(run) -> dict:
    """A run's manifest.json as written on disk (the contract other tools read)."""
    return json.loads((Path(run) / "manifest.json").read_text())


def rewrite_manifest(run, manifest: dict) -> None:
    """Put a run in a state by rewriting its manifest, sealed as ckptkd seals it (an unsealed edit is damage)."""
    from ckptkd.run.storage import write_sealed_json

    write_sealed_json(Path(run) / "manifest.json", manifest)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "ckptkd", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def call_cli(*args: str) -> subprocess.CompletedProcess:
    """`ckptkd ARGS` as run_cli answers it, but in this process: for tests of what a command says and writes rather
    than of the process (signals, exit on a kill), without a new interpreter's start of about 2 s."""
    import contextlib
    import io

    from ckptkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help, a bad argument
            code = e.code
    return subprocess.CompletedProcess(["ckptkd", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """One trained digits teacher shared by the tests that only read it."""
    from ckptkd import train

    out = tmp_path_factory.mktemp("teacher") / "t"
    return train(tiny_config(schedule={"epochs": 6}, checkpoints={"fractions": [0.3, 0.5, 0.7, 1.0], "every": 2}),
                 out=out, quiet=True)


def exact_permutation_p(a, b) -> float:
    """The reference for `stats.permutation_p`, by enumeration with the standard library: two-sided permutation p of mean(a) - mean(b) over every split of the pooled units."""
    pooled, n_a = list(a) + list(b), len(a)
    observed = abs(statistics.mean(a) - statistics.mean(b))
    splits = list(itertools.combinations(range(len(pooled)), n_a))
    extreme = 0
    for first in splits:
        x = [pooled[i] for i in first]
        y = [pooled[i] for i in range(len(pooled)) if i not in first]
        extreme += abs(statistics.mean(x) - statistics.mean(y)) >= observed - 1e-12
    return extreme / len(splits)
