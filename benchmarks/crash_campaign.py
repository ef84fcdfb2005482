"""Crash campaign: `train`, `distill` (a snapshot ensemble, teacher cache on) and `study` run as real subprocesses,
killed with SIGKILL, resumed, and compared with an uninterrupted run of the same command.

    python benchmarks/crash_campaign.py --runs 20 [--seed S] [--commands train distill study] [--keep DIR]

Each run is killed once, at a moment drawn from its seed: two runs in three at a random time between the process's
start (interpreter start-up and imports included) and 1.1x the uninterrupted run's wall time, one in three in the
middle of its N-th atomic file write (N drawn; the CKPTKD_FAULT_KILL_WRITE hook of ckptkd.storage writes half the
file, then the process kills itself). The distill runs build their teacher cache in a folder of their own, so a kill
can land in the cache build. Then the same command is run again (`--resume` for train and distill) and the run must
end with every checkpoint bit-identical to the uninterrupted run's (the manifest's sha256s and the files), no
temporary file left anywhere in its folders, and, for a study, every task's row in the database exactly once and
complete. Prints one line per command, `train: 20/20 resumed bit-identical`, each miss with the seed that replays it,
and exits 1 on any miss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path

import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
RUN = {"device": "cpu", "data": {"name": "digits", "batch_size": 64}, "log": {"progress": False, "tensorboard": False}}
TEACHER = {**RUN, "name": "teacher", "model": {"name": "resnet8"}, "schedule": {"epochs": 8},
           "checkpoints": {"fractions": [0.3, 0.5, 0.7, 1.0], "every": 1}}
STUDENT = {**RUN, "name": "student", "model": {"name": "cnn", "channels": [8, 16], "hidden": 32},
           "schedule": {"epochs": 6}, "checkpoints": {"every": 1}, "kd": {"cache": "on", "alpha": 0.5}}
STUDY = {"name": "crash", "seeds": 2, "variants": ["none", "T0.5", "snapshot"], "ensemble_size": 2, "fuse": 2,
         "analysis": {"seeds": 2},
         "pairs": [{"teacher": {**RUN, "model": {"name": "resnet8"}, "schedule": {"epochs": 4}},
                    "student": {**RUN, "model": {"name": "mlp", "widths": [16]}, "schedule": {"epochs": 3},
                                "checkpoints": {"fractions": [1.0]}}}]}


def ckptkd(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ckptkd", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env or ENV)


def finished(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")


class Command(ABC):
    """One command of the campaign: how to start it, and what an uninterrupted run of it leaves."""

    def __init__(self, name: str, work: Path):
        self.name, self.work = name, work
        self.reference: dict[str, list[str]] = {}
        self.seconds = 0.0

    @abstractmethod
    def args(self, out: Path, *, resume: bool) -> list[str]:
        """The command line that runs (or, with `resume`, continues) this command into `out`."""

    def prepare(self) -> None:
        started = time.perf_counter()
        out = self.work / "reference"
        finished(ckptkd(*self.args(out, resume=False)), f"{self.name} (uninterrupted)")
        self.seconds = time.perf_counter() - started
        self.reference = checkpoints(out)

    def check(self, out: Path) -> str | None:
        """None if `out` ended as the uninterrupted run did, else what differs."""
        got = checkpoints(out)
        if got != self.reference:
            differ = sorted(k for k in self.reference.keys() | got.keys() if got.get(k) != self.reference.get(k))
            return f"checkpoints differ from the uninterrupted run in {differ[:3]}"
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))
        return f"temporaries left: {left[:3]}" if left else None


class Train(Command):
    def __init__(self, work: Path):
        super().__init__("train", work)
        self.config = work / "teacher.yaml"
        self.config.write_text(yaml.safe_dump(TEACHER))

    def args(self, out, *, resume):
        return ["train", str(self.config), "--out", str(out), *(["--resume"] if resume else [])]


class Distill(Command):
    def __init__(self, work: Path):
        super().__init__("distill", work)
        self.config = work / "student.yaml"
        self.config.write_text(yaml.safe_dump(STUDENT))
        self.teacher = work / "teacher"

    def prepare(self):
        teacher_cfg = self.work / "teacher.yaml"
        teacher_cfg.write_text(yaml.safe_dump(TEACHER))
        finished(ckptkd("train", str(teacher_cfg), "--out", str(self.teacher)), "the distill campaign's teacher")
        super().prepare()

    def args(self, out, *, resume):
        # Each run builds the cache in a folder of its own (beside its run folder), so a kill can land in the build.
        return ["distill", str(self.config), "--teacher", f"{self.teacher}@0.3,0.5,0.7", "--out", str(out),
                "--set", f"kd.cache_dir={out.parent / (out.name + '-cache')}", *(["--resume"] if resume else [])]

    def check(self, out):
        left = sorted(str(p) for p in (out.parent / (out.name + "-cache")).glob(".*.tmp"))
        return super().check(out) or (f"cache temporaries left: {left[:3]}" if left else None)


class Study(Command):
    def __init__(self, work: Path):
        super().__init__("study", work)
        self.config = work / "study.yaml"
        self.config.write_text(yaml.safe_dump(STUDY))
        self.tasks = 0

    def args(self, out, *, resume):
        return ["study", str(self.config), "--out", str(out), "--no-report"]

    def prepare(self):
        super().prepare()
        self.tasks = len(rows(self.work / "reference"))

    def check(self, out):
        found = rows(out)
        if len(found) != self.tasks or len({r[0] for r in found}) != self.tasks:
            return f"the database holds {len(found)} rows for {self.tasks} tasks"
        if any(status != "complete" for _, status in found):
            return f"not every task completed: {sorted({s for _, s in found})}"
        return super().check(out)


def rows(study: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(f"{(study / 'results.sqlite').resolve().as_uri()}?mode=ro", uri=True) as db:
        return db.execute("SELECT run_id, status FROM runs").fetchall()


def checkpoints(root: Path) -> dict[str, list[str]]:
    """Every run folder under `root` (itself included): its checkpoints' sha256s, each checked against its file."""
    from ckptkd.run.storage import sha256_file

    found = {}
    for manifest in sorted(root.rglob("manifest.json")):
        raw = json.loads(manifest.read_text())
        folder = manifest.parent
        shas = [c["sha256"] for c in raw["checkpoints"]]
        files = [sha256_file(folder / c["path"]) for c in raw["checkpoints"]]
        found[str(folder.relative_to(root))] = shas if shas == files and raw["status"] == "complete" else \
            [f"status {raw['status']}"] + files
    return found


def kill_once(command: Command, out: Path, rng: random.Random) -> str:
    """Start the command, kill it once as drawn, and say how."""
    if rng.random() < 1 / 3:
        n = rng.randint(1, 30)
        proc = ckptkd(*command.args(out, resume=False), env={**ENV, "CKPTKD_FAULT_KILL_WRITE": str(n)})
        proc.communicate(timeout=1800)
        return f"killed inside atomic write {n}" if proc.returncode == -signal.SIGKILL else \
            f"write {n} is past the run's last write (not killed)"
    delay = rng.uniform(0.0, 1.1 * command.seconds)
    proc = ckptkd(*command.args(out, resume=False))
    try:
        proc.communicate(timeout=delay)
        return f"finished before the kill at {delay:.2f} s"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        return f"SIGKILL at {delay:.2f} s"


def campaign(command: Command, runs: int, seed: int, say=print) -> tuple[int, int, list[str]]:
    """(runs resumed bit-identical, runs actually killed, the misses with what replays them)."""
    command.prepare()
    ok, killed, misses = 0, 0, []
    for r in range(runs):
        run_seed = seed * 1000 + r
        out = command.work / f"run{r}"
        how = kill_once(command, out, random.Random(run_seed))
        killed += how.startswith(("killed", "SIGKILL"))
        try:
            finished(ckptkd(*command.args(out, resume=True)), f"{command.name} resumed")
            problem = command.check(out)
        except RuntimeError as error:
            problem = str(error)
        if problem is None:
            ok += 1
        else:
            misses.append(f"{command.name} run {r} (--seed {seed}, run seed {run_seed}; {how}): {problem}")
            say(f"  miss: {misses[-1]}")
    return ok, killed, misses


COMMANDS = {"train": Train, "distill": Distill, "study": Study}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="campaign seed (default: drawn, and printed)")
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--keep", default=None, help="keep the runs in this folder (default: a temporary one)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    print(f"crash campaign: --runs {args.runs} --seed {seed}", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="ckptkd-crash-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for name in args.commands:
            work = root / name
            work.mkdir(parents=True, exist_ok=False)
            ok, killed, misses = campaign(COMMANDS[name](work), args.runs, seed)
            rest = f", {args.runs - killed} finished before their kill" if killed < args.runs else ""
            print(f"{name}: {ok}/{args.runs} resumed bit-identical ({killed} killed mid-run{rest})", flush=True)
            failed |= bool(misses)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
