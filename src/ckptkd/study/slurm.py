"""The Slurm launcher (`ckptkd study CONFIG --launcher slurm`): this process coordinates, Slurm runs the tasks.

The coordinator is the only process that opens the study's results.sqlite (so it may sit wherever the coordinator
runs; a Slurm job never touches it). Every ready group of tasks (dependencies respected: teacher -> analysis ->
students) is claimed, written down as a *batch* (STUDY/slurm/BATCH/tasks.json, and the batch in each task's row),
then submitted through submitit as one Slurm job array, one element per group; each element's job id goes into its
tasks' rows at once. An element runs its tasks into their run folders on the shared file system and leaves one
sealed outcome file per task (STUDY/slurm/BATCH/outcomes/RUN_ID.json: complete with its metrics, failed with its
error, or interrupted), which the coordinator reads when squeue says the job has ended. Results travel through
these files, never through submitit's pickles.

Killed at any moment, the coordinator is started again with the same command: it takes back the tasks the last
one had sent out, by their rows — a job id it knows is watched again; a batch whose job ids it never learned is
found in squeue by its job name; a batch that never reached Slurm is sent again — so no task is submitted twice.

Preemption is an interruption: SIGTERM or SIGUSR2 (Slurm's warning before the time limit, `signal_delay_s` ahead)
stops the element's training as Ctrl-C does (each run keeps its last saved state, its manifest says `interrupted`).
On SIGUSR2 the element requeues itself (`scontrol requeue`: same job id) and continues with a resume; after SIGTERM
(preemption, `scancel`) it ends, and the coordinator sends its tasks out again without spending an attempt. A job
that ends without an outcome (killed outright, out of memory, its node lost) spends one.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import Interrupted, UserError, interrupting_signals
from ..processes import slurm_job
from ..run.lock import RunLock
from ..run.storage import read_sealed_json, write_sealed_json
from .queue import ResultsDB
from .execution import error_message, execute, record

SLURM_DIR = "slurm"
WORKER = "slurm"  # the claimer tag of a coordinator's claims: "pid@host/slurm"
# Job states after which nothing more will run (squeue -t all); anything else (PENDING, RUNNING, REQUEUED,
# CONFIGURING, COMPLETING, SUSPENDED, ...) is a job still under way.
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"})
GRACE_S = 15.0         # how long a job must stay ended before its unfinished tasks are taken back (see settle_ended)
HEARTBEAT_S = 60.0     # how often the coordinator marks its tasks as still in hand
MAX_REQUEUES = 20      # a task interrupted by its time limit this often fails: slurm.time_min is too short for it


def _batch_dir(study_dir: Path, batch: str) -> Path:
    return study_dir / SLURM_DIR / batch


def _outcome_path(study_dir: Path, batch: str, run_id: str) -> Path:
    return _batch_dir(study_dir, batch) / "outcomes" / f"{run_id}.json"


def read_outcome(study_dir: Path, batch: str, run_id: str) -> dict | None:
    """A task's outcome in `batch`, or None if there is none (or only a damaged one: the task is then run again)."""
    path = _outcome_path(study_dir, batch, run_id)
    if not path.is_file():
        return None
    try:
        outcome = read_sealed_json(path, "task outcome")
    except UserError:
        return None
    return outcome if isinstance(outcome, dict) and outcome.get("status") in ("complete", "failed",
                                                                              "interrupted") else None


# ---------------------------------------------------------------- inside a Slurm job


def run_element(study_dir: str, batch: str, rows: list[dict]) -> str:
    """What one element of a batch's job array runs: its group of tasks, each outcome written down. A requeued
    element skips the tasks it already finished and resumes the others."""
    study = Path(study_dir)

    def write(row: dict, outcome: dict) -> None:
        path = _outcome_path(study, batch, row["run_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_sealed_json(path, {**outcome, "job": slurm_job(), "host": os.uname().nodename})

    todo = [r for r in rows if (read_outcome(study, batch, r["run_id"]) or {}).get("status") not in ("complete",
                                                                                                     "failed")]
    print(f"ckptkd: {len(todo)} of {len(rows)} tasks to run: {', '.join(r['name'] for r in todo)}", flush=True)
    started = time.time()
    try:
        with interrupting_signals():
            results = execute(todo, study, None, lambda msg: print(msg, flush=True)) if todo else []
    except KeyboardInterrupt as stop:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        warned = isinstance(stop, Interrupted) and stop.signum == signal.SIGUSR2
        if warned and restarts >= MAX_REQUEUES:
            for row in todo:
                write(row, {"status": "failed", "error": f"interrupted by Slurm's time-limit warning {restarts + 1} "
                                                         "times without finishing: raise slurm.time_min"})
            return "failed"
        for row in todo:
            write(row, {"status": "interrupted", "why": str(stop) or "SIGINT"})
        if warned:  # the time limit (or a preemption notice) is near: continue in the same job after a requeue
            job = slurm_job()
            print(f"ckptkd: interrupted by {stop}; requeueing job {job}", flush=True)
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        return "interrupted"
    finished = time.time()
    for row, result in zip(todo, results):
        if isinstance(result, Exception):
            write(row, {"status": "failed", "error": error_message(result)})
        else:
            metrics, timings = result
            write(row, {"status": "complete", "metrics": metrics,
                        "timings": {"started_at": started, "finished_at": finished,
                                    "duration_s": finished - started, **timings}})
    return "done"


# ---------------------------------------------------------------- the coordinator


class Slurm:
    """Submitting a batch and asking squeue about this user's jobs: the two things the coordinator needs of Slurm."""

    def __init__(self, study_dir: Path, resources: dict):
        for command in ("sbatch", "squeue", "scontrol"):
            if shutil.which(command) is None:
                raise UserError(f"study: launcher slurm needs {command} on PATH (run the study from a Slurm login "
                                "node, or use --launcher local)")
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise UserError("study: launcher slurm needs submitit: pip install 'ckptkd[slurm]'") from None
        self.study_dir, self.resources = study_dir, resources

    def submit(self, batch: str, groups: list[list[dict]]) -> list[str]:
        """Submit one job array, an element per group; its job ids ("ARRAY_INDEX"), in the groups' order."""
        import submitit

        folder = _batch_dir(self.study_dir, batch)
        r = self.resources
        executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=0)
        parameters = {"job_name": f"ckptkd-{batch}", "time": r["time_min"], "cpus_per_task": r["cpus_per_task"],
                      "signal_delay_s": r["signal_delay_s"], "array_parallelism": r["array_parallelism"],
                      "partition": r["partition"], "account": r["account"], "qos": r["qos"],
                      "gpus_per_task": r["gpus_per_task"] or None,
                      "mem": None if r["mem_gb"] is None else f"{int(r['mem_gb'] * 1024)}M",
                      "additional_parameters": dict(r["extra"])}
        executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
        where = str(self.study_dir.resolve())
        try:
            jobs = executor.map_array(run_element, [where] * len(groups), [batch] * len(groups), groups)
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as error:
            text = " ".join(str(getattr(error, "stderr", None) or error).split())
            raise UserError(f"study: Slurm refused the jobs ({text[:300]}); check the study's slurm: keys") from None
        return [job.job_id for job in jobs]

    def jobs(self) -> dict[str, tuple[str, str]] | None:
        """This user's jobs that Slurm still lists (finished ones for MinJobAge): job id -> (state, job name); None
        when squeue cannot answer (the controller is down, say), when nothing can be concluded."""
        try:
            done = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%j"],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        found = {}
        for line in done.stdout.splitlines():
            job, state, name = (line.split("|", 2) + ["", ""])[:3]
            found[job.strip()] = (state.strip().split()[0] if state.strip() else "", name.strip())
        return found


class Coordinator:
    def __init__(self, study: dict, study_dir: Path, db: ResultsDB, groups: dict, slurm: Slurm, say):
        self.study, self.study_dir, self.db, self.groups, self.slurm, self.say = (study, study_dir, db, groups,
                                                                                 slurm, say)
        self.in_flight: dict[str, list[dict]] = {}   # job id -> its tasks' rows
        self.ended_at: dict[str, float] = {}          # job id -> when it was first seen ended without all outcomes
        self.last_beat = time.monotonic()
        self.total = len(db.rows())
        self.batches = 0

    # -- taking back what an earlier coordinator sent out

    def reattach(self) -> None:
        mine = [r for r in self.db.rows(status="running") if (r["claimer"] or "").endswith(f"/{WORKER}")]
        if not mine:
            return
        jobs = self._wait_for_squeue()
        unsent = []
        for row in mine:
            row = self.db.adopt(row["run_id"])
            if row.get("job"):
                self.in_flight.setdefault(row["job"], []).append(row)
            elif row.get("batch"):
                unsent.append(row)
            else:  # claimed, but killed before its batch was written: never sent
                self.db.release(row["run_id"])
        by_batch: dict[str, list[dict]] = {}
        for row in unsent:
            by_batch.setdefault(row["batch"], []).append(row)
        for batch, rows in by_batch.items():
            elements = self._elements(batch)
            names = {job: name for job, (_state, name) in jobs.items() if name == f"ckptkd-{batch}"}
            for job in names:
                index = int(job.rsplit("_", 1)[1]) if "_" in job else 0
                for row in rows:
                    if index < len(elements) and row["run_id"] in elements[index]:
                        self.db.assign(row["run_id"], job=job)
                        self.in_flight.setdefault(job, []).append({**row, "job": job})
            for row in rows:
                if not any(row["run_id"] in [r["run_id"] for r in v] for v in self.in_flight.values()):
                    outcome = read_outcome(self.study_dir, batch, row["run_id"])
                    if outcome is None:
                        self.db.release(row["run_id"])  # the batch never reached Slurm: it goes out again
                    else:
                        self._settle_row(row, outcome, None, "")
        if self.in_flight:
            self.say(f"re-attached to {len(self.in_flight)} Slurm jobs of an earlier coordinator: "
                     f"{', '.join(sorted(self.in_flight))}")

    def _elements(self, batch: str) -> list[list[str]]:
        path = _batch_dir(self.study_dir, batch) / "tasks.json"
        try:
            return read_sealed_json(path, "Slurm batch")["elements"]
        except (UserError, KeyError, TypeError):
            return []

    def _wait_for_squeue(self) -> dict:
        for _ in range(60):
            jobs = self.slurm.jobs()
            if jobs is not None:
                return jobs
            time.sleep(5.0)
        raise UserError("study: squeue has not answered for 5 minutes; is the Slurm controller up?")

    # -- sending out what is ready

    def submit_ready(self) -> int:
        claimed = []
        while rows := self.db.claim_group(WORKER, self.groups):
            claimed.append(rows)
        if not claimed:
            return 0
        # Unique across coordinators and Slurm clusters (job ids restart when a controller's state is reset).
        self.batches += 1
        batch = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self.batches}"
        folder = _batch_dir(self.study_dir, batch)
        folder.mkdir(parents=True, exist_ok=False)
        write_sealed_json(folder / "tasks.json", {"elements": [[r["run_id"] for r in rows] for rows in claimed]})
        for rows in claimed:
            for row in rows:
                self.db.assign(row["run_id"], batch=batch)
        try:
            job_ids = self.slurm.submit(batch, claimed)
        except UserError:
            for rows in claimed:
                for row in rows:
                    self.db.release(row["run_id"])
            raise
        for job, rows in zip(job_ids, claimed):
            for row in rows:
                self.db.assign(row["run_id"], job=job)
            self.in_flight[job] = [{**row, "batch": batch, "job": job} for row in rows]
        runs = sum(len(rows) for rows in claimed)
        self.say(f"submitted {len(claimed)} groups ({runs} runs) as Slurm job array {job_ids[0].split('_')[0]}: "
                 + "; ".join(f"{job} {', '.join(r['name'] for r in rows)}" for job, rows in zip(job_ids, claimed)))
        return runs

    # -- watching and recording

    def settle_ended(self, jobs: dict) -> int:
        """Record the tasks of every job that has ended. A job whose tasks all have a final outcome (complete or
        failed) is settled when squeue first says it ended; any other only once it has stayed ended (or unlisted)
        for GRACE_S: a job being requeued passes through states and moments where it seems gone, and an outcome
        file written on another node may take a while to show here."""
        settled = 0
        for job, rows in list(self.in_flight.items()):
            state = jobs.get(job, ("", ""))[0]
            if state and state not in ENDED:
                self.ended_at.pop(job, None)
                continue
            outcomes = [read_outcome(self.study_dir, row["batch"], row["run_id"]) for row in rows]
            final = all(o is not None and o["status"] in ("complete", "failed") for o in outcomes)
            first = self.ended_at.setdefault(job, time.monotonic())
            if not final and time.monotonic() - first < GRACE_S:
                continue
            log = _batch_dir(self.study_dir, rows[0]["batch"]) / job
            for row, outcome in zip(rows, outcomes):
                self._settle_row(row, outcome, state or "gone from squeue", log)
            del self.in_flight[job]
            self.ended_at.pop(job, None)
            settled += len(rows)
        return settled

    def _settle_row(self, row: dict, outcome: dict | None, state: str | None, log) -> None:
        name, job = row["name"], row.get("job")
        done = self.total - self.db.pending_count()
        if outcome is None:
            error = (f"Slurm job {job} ended ({state}) without a result: killed, out of memory, over its time "
                     f"limit, or its node failed; its log: {log}")
            self.db.fail(row["run_id"], error=error)
            self.say(f"[{done}/{self.total}] {name}: failed: {error}")
        elif outcome["status"] == "interrupted":
            self.db.release(row["run_id"])  # preempted or cancelled: no attempt spent, it goes out again
            self.say(f"[{done}/{self.total}] {name}: interrupted in job {job} ({outcome.get('why')}); sent again")
        elif outcome["status"] == "failed":
            self.db.fail(row["run_id"], error=outcome["error"])
            self.say(f"[{done}/{self.total}] {name}: failed in job {job}: {outcome['error'].splitlines()[0]}")
        else:
            timings = {**outcome["timings"], "slurm_job": job}
            record(self.db, row, (outcome["metrics"], timings), timings["duration_s"],
                   lambda msg: self.say(f"[{done + 1}/{self.total}] {name} (job {job}): {msg.strip()}"))

    def beat(self) -> None:
        if time.monotonic() - self.last_beat < HEARTBEAT_S:
            return
        for rows in self.in_flight.values():
            for row in rows:
                self.db.heartbeat(row["run_id"])
        self.last_beat = time.monotonic()


def coordinate(study: dict, study_dir: Path, db: ResultsDB, groups: dict, *, say, poll_s: float) -> None:
    """Run the study's tasks as Slurm jobs until every task is complete or failed for good (see the module
    docstring). Interrupted (Ctrl-C, SIGTERM), it stops at once and leaves the jobs running: started again, it
    re-attaches to them."""
    slurm = Slurm(study_dir, study["slurm"])
    lock = RunLock(study_dir, what="study")  # one coordinator per study
    lock.acquire()
    try:
        coordinator = Coordinator(study, study_dir, db, groups, slurm, say)
        coordinator.reattach()
        while True:
            changed = coordinator.submit_ready()
            jobs = slurm.jobs()
            if jobs is not None:
                changed += coordinator.settle_ended(jobs)
            coordinator.beat()
            if not coordinator.in_flight and db.pending_count() == 0:
                return
            if not changed:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        jobs = sorted(coordinator.in_flight) if "coordinator" in locals() else []
        if jobs:
            print(f"ckptkd: the coordinator stops; {len(jobs)} Slurm jobs go on ({', '.join(jobs[:8])}"
                  f"{' ...' if len(jobs) > 8 else ''}): the same command re-attaches to them", file=sys.stderr)
        raise
    finally:
        lock.release()


