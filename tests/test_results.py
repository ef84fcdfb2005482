"""ResultsDB under real concurrency: separate processes sharing one sqlite file."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from ckptkd.study.queue import ClaimLost, ResultsDB

# Worker processes import the queue alone: it needs no torch (which costs seconds per process and has nothing to do
# with the database), and the prelude checks that it stays so.
_PRELUDE = """
import os, sys, time
from ckptkd.study import queue as results
assert "torch" not in sys.modules, "the study queue imports torch"
"""

_WORKER = """
db_path, log_path, go_path, name = sys.argv[1:]
db = results.ResultsDB(db_path)
while not os.path.exists(go_path):
    time.sleep(0.002)
log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
while True:
    run = db.claim(worker=name)
    if run is None:
        if db.pending_count() == 0:
            break
        time.sleep(0.005)
        continue
    os.write(log, f"claim {run['run_id']} {os.getpid()} {time.time():.6f}\\n".encode())
    time.sleep(0.03 if run["kind"] == "teacher" else 0.003)
    os.write(log, f"complete {run['run_id']} {os.getpid()} {time.time():.6f}\\n".encode())
    db.complete(run["run_id"], metrics={"by": os.getpid()}, timings={"train_s": 0.0})
"""


@pytest.fixture
def spawn():
    """Start `python -c BODY ARGS...` with the study queue imported as `results`; leftovers are killed at
    teardown."""
    procs = []

    def start(body: str, *args) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _PRELUDE + textwrap.dedent(body), *map(str, args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish(proc: subprocess.Popen, timeout: float = 30) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def add_run(db: ResultsDB, run_id: str, kind: str = "teacher", depends_on=()) -> None:
    db.add(run_id, kind=kind, name=run_id, config={"id": run_id}, path=f"runs/{run_id}", depends_on=depends_on,
           group={"pair": "t->s", "seed": 0})


def test_three_workers_share_the_grid_without_duplicates_or_early_students(tmp_path, spawn):
    db = ResultsDB(tmp_path / "results.sqlite")
    teachers = [f"t{i}" for i in range(3)]
    teacher_of = {f"s{i}": teachers[i % 3] for i in range(27)}
    for t in teachers:
        add_run(db, t)
    for s, t in teacher_of.items():
        add_run(db, s, kind="student", depends_on=[t])

    log, go = tmp_path / "claims.log", tmp_path / "go"
    workers = [spawn(_WORKER, db.path, log, go, f"w{i}") for i in range(3)]
    go.touch()  # all three start claiming together, so they really compete
    for w in workers:
        finish(w)

    events = [line.split() for line in log.read_text().splitlines()]
    claims = Counter(run_id for event, run_id, _, _ in events if event == "claim")
    assert claims == Counter({run_id: 1 for run_id in [*teachers, *teacher_of]})
    # Which worker claims how much is up to the scheduler (on a loaded machine one may claim nothing): only that
    # every claim came from one of them is asserted.
    assert {pid for _, _, pid, _ in events} <= {str(w.pid) for w in workers}

    logged = {(event, run_id): float(t) for event, run_id, _, t in events}
    rows = {r["run_id"]: r for r in db.rows()}
    for s, t in teacher_of.items():
        # The teacher logs "complete" before committing it, so this holds only if the claim waited for that commit.
        assert logged[("claim", s)] > logged[("complete", t)]
        assert rows[s]["timings"]["started_at"] > rows[t]["timings"]["finished_at"]
    claimed_by = {run_id: int(pid) for event, run_id, pid, _ in events if event == "claim"}
    for r in rows.values():
        assert (r["status"], r["attempts"]) == ("complete", 1)
        assert r["metrics"] == {"by": claimed_by[r["run_id"]]}
        pid, worker = r["claimer"].split("@")[0], r["claimer"].rsplit("/")[-1]
        assert (int(pid), worker in {"w0", "w1", "w2"}) == (claimed_by[r["run_id"]], True)
        assert r["timings"]["train_s"] == 0.0 and r["timings"]["duration_s"] >= 0
    assert [r["run_id"] for r in db.rows(kind="teacher")] == teachers
    assert db.pending_count() == 0 and db.blocked() == []


def test_run_of_a_killed_worker_is_taken_over(tmp_path, spawn):
    db = ResultsDB(tmp_path / "results.sqlite")
    add_run(db, "t0")
    doomed = spawn("""
        db = results.ResultsDB(sys.argv[1])
        print(db.claim(worker="doomed")["run_id"], flush=True)
        time.sleep(60)
    """, db.path)
    assert doomed.stdout.readline().strip() == "t0"
    assert db.claim() is None  # its claimer is alive and its heartbeat fresh

    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    (row,) = db.rows()
    assert (row["status"], row["claimer_pid"]) == ("running", doomed.pid)

    # The heartbeat is seconds old, far from the 120 s timeout: the dead pid alone makes the claim stale.
    run = db.claim(worker="heir")
    assert (run["run_id"], run["attempts"], run["claimer_pid"]) == ("t0", 2, os.getpid())
    db.complete("t0", metrics={"acc": 0.9}, timings={})
    (row,) = db.rows()
    assert (row["status"], row["attempts"], row["metrics"]) == ("complete", 2, {"acc": 0.9})


def age(db: ResultsDB, run_id: str, seconds: float, *columns: str) -> None:
    """Move a run's timestamps `seconds` into the past, as if that much time had gone by (no sleeping)."""
    with sqlite3.connect(db.path) as forge:
        forge.execute(f"UPDATE runs SET {', '.join(f'{c} = {c} - ?' for c in columns)} WHERE run_id = ?",
                      (*[seconds] * len(columns), run_id))


def test_heartbeat_keeps_a_claim_and_its_absence_loses_it(tmp_path, spawn):
    db = ResultsDB(tmp_path / "results.sqlite", stale_after_s=60.0)
    add_run(db, "t0")
    holder = spawn("""
        db = results.ResultsDB(sys.argv[1])
        run_id = db.claim()["run_id"]
        print("claimed", flush=True)
        for line in sys.stdin:  # one heartbeat per line the test sends
            try:
                db.heartbeat(run_id)
                print("kept", flush=True)
            except results.ClaimLost:
                print("lost", flush=True)
    """, db.path)

    def beat() -> str:
        holder.stdin.write("\n")
        holder.stdin.flush()
        return holder.stdout.readline().strip()

    assert holder.stdout.readline().strip() == "claimed"
    # The claim was made, and last heard of, two minutes ago: longer than stale_after_s.
    age(db, "t0", 120.0, "started_at", "heartbeat")
    assert beat() == "kept"  # the holder's heartbeat ...
    (row,) = db.rows()
    assert row["heartbeat"] - row["started_at"] > 100
    assert db.claim() is None  # ... alone keeps a claim older than stale_after_s
    assert beat() == "kept"

    # The holder is alive, but it has not been heard of for longer than stale_after_s.
    age(db, "t0", 61.0, "heartbeat")
    run = db.claim()
    assert (run["run_id"], run["attempts"], run["claimer_pid"]) == ("t0", 2, os.getpid())
    assert beat() == "lost"
    assert finish(holder).strip() == ""  # communicate() closes its stdin: the holder's loop ends
    db.complete("t0", metrics={}, timings={})
    assert db.rows()[0]["status"] == "complete"


def test_a_claim_just_within_stale_after_s_stands(tmp_path, spawn):
    """The boundary, without waiting: heard of stale_after_s - 1 s ago, a live holder keeps its claim."""
    db = ResultsDB(tmp_path / "results.sqlite", stale_after_s=60.0)
    add_run(db, "t0")
    holder = spawn("""
        db = results.ResultsDB(sys.argv[1])
        db.claim()
        print("claimed", flush=True)
        sys.stdin.readline()
    """, db.path)
    assert holder.stdout.readline().strip() == "claimed"
    age(db, "t0", 59.0, "started_at", "heartbeat")
    assert db.claim() is None
    age(db, "t0", 2.0, "heartbeat")
    assert db.claim()["attempts"] == 2
    holder.stdin.write("\n")
    holder.stdin.flush()
    finish(holder)


def test_add_is_idempotent_and_needs_dependencies_first(tmp_path):
    db = ResultsDB(tmp_path / "results.sqlite")
    add_run(db, "t0")
    db.complete(db.claim()["run_id"], metrics={"acc": 1.0}, timings={})
    db.add("t0", kind="student", name="other", config={"other": True}, path="elsewhere")
    (row,) = db.rows()
    assert (row["kind"], row["name"], row["status"], row["config"]) == ("teacher", "t0", "complete", {"id": "t0"})
    assert row["group"] == {"pair": "t->s", "seed": 0} and row["depends_on"] == []

    with pytest.raises(ValueError, match="missing"):
        add_run(db, "s0", kind="student", depends_on=["t0", "missing"])
    assert len(db.rows()) == 1
    with pytest.raises(TypeError, match="colour"):
        db.rows(colour="red")


def test_failed_run_is_retried_once_then_blocks_its_dependents(tmp_path):
    db = ResultsDB(tmp_path / "results.sqlite")
    add_run(db, "t0")
    add_run(db, "s0", kind="student", depends_on=["t0"])
    add_run(db, "g0", kind="student", depends_on=["s0"])
    add_run(db, "t1")

    assert db.claim()["run_id"] == "t0"
    db.fail("t0", error="CUDA out of memory")
    assert db.pending_count() == 4 and db.blocked() == []
    run = db.claim()
    assert (run["run_id"], run["attempts"], run["error"]) == ("t0", 2, "CUDA out of memory")
    db.fail("t0", error="CUDA out of memory again")

    assert db.claim()["run_id"] == "t1"
    db.fail("t1", error="flaky disk")
    assert db.claim()["run_id"] == "t1"
    db.complete("t1", metrics={"acc": 0.5}, timings={})
    assert db.claim() is None

    (failed,) = db.rows(status="failed")
    assert (failed["run_id"], failed["attempts"], failed["error"]) == ("t0", 2, "CUDA out of memory again")
    assert set(failed["timings"]) == {"started_at", "finished_at", "duration_s"}
    assert db.rows(run_id="t1")[0]["error"] is None
    assert [(r["run_id"], r["blocked_by"]) for r in db.blocked()] == [("s0", ["t0"]), ("g0", ["t0"])]  # the failed root
    assert db.pending_count() == 0


def test_settling_a_run_needs_the_claim(tmp_path):
    db = ResultsDB(tmp_path / "results.sqlite")
    add_run(db, "t0")
    with pytest.raises(ClaimLost, match="pending"):
        db.complete("t0", metrics={}, timings={})
    db.claim()
    db.complete("t0", metrics={}, timings={})
    with pytest.raises(ClaimLost, match="complete"):
        db.fail("t0", error="late")
    with pytest.raises(KeyError):
        db.heartbeat("nope")


def test_two_connections_share_the_file_in_wal_mode(tmp_path):
    a = ResultsDB(tmp_path / "results.sqlite")
    b = ResultsDB(tmp_path / "results.sqlite")
    add_run(a, "t0")
    assert b.claim()["run_id"] == "t0"
    a.heartbeat("t0")  # same process, so the claim made through b is a's too

    reader = sqlite3.connect(a.path, isolation_level=None)
    assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    # An open reader neither blocks the writer nor sees its commit. Without waiting: a blocked writer fails at once.
    b._conn.execute("PRAGMA busy_timeout = 0")
    add_run(b, "t1")
    b.complete("t0", metrics={}, timings={})
    assert reader.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    reader.execute("COMMIT")
    assert reader.execute("SELECT count(*) FROM runs").fetchone() == (2,)
    reader.close()

    assert [r["status"] for r in a.rows()] == ["complete", "pending"]
    a.close()
    b.close()


def test_processes_creating_the_database_at_once(tmp_path, spawn):
    path, go = tmp_path / "study" / "results.sqlite", tmp_path / "go"
    creators = [spawn("""
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.002)
        db = results.ResultsDB(sys.argv[1])
        db.add("shared", kind="teacher", name="shared", config={}, path="p")
        db.add(f"own{sys.argv[3]}", kind="student", name="own", config={}, path="p", depends_on=["shared"])
    """, path, go, i) for i in range(4)]
    go.touch()
    for proc in creators:
        finish(proc)
    with ResultsDB(path) as db:
        assert sorted(r["run_id"] for r in db.rows()) == ["own0", "own1", "own2", "own3", "shared"]


def test_a_group_is_claimed_whole_once_every_member_can_start(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    add_run(db, "t1")
    add_run(db, "t2")
    for name, deps in (("a", ["t1"]), ("b", ["t1"]), ("c", ["t1", "t2"]), ("d", [])):
        add_run(db, name, kind="student", depends_on=deps)
    groups = {r: ["a", "b", "c"] for r in ("a", "b", "c")}
    first = db.claim_group("w", groups)
    assert [r["run_id"] for r in first] == ["t1"]
    db.complete("t1", metrics={}, timings={})
    # a and b could start, but c waits for t2: the group waits whole, and d (alone) goes first
    assert [r["run_id"] for r in db.claim_group("w", groups)] == ["t2"]
    assert [r["run_id"] for r in db.claim_group("w", groups)] == ["d"]
    db.complete("t2", metrics={}, timings={})
    claimed = db.claim_group("w", groups)
    assert [r["run_id"] for r in claimed] == ["a", "b", "c"] and all(r["status"] == "running" for r in claimed)
    db.complete("a", metrics={}, timings={})
    db.fail("b", error="diverged")
    db.fail("c", error="diverged")
    # a is done: a retry of the group takes the members still to do, each attempt counted
    retried = db.claim_group("w", groups)
    assert [(r["run_id"], r["attempts"]) for r in retried] == [("b", 2), ("c", 2)]


def test_a_group_member_blocked_for_good_does_not_hold_back_the_others(tmp_path):
    """A student whose teacher failed for good will never start; its group goes on without it (it had waited for
    ever, and the study's worker with it)."""
    db = ResultsDB(tmp_path / "r.sqlite", max_attempts=1)
    add_run(db, "t1")
    add_run(db, "t2")
    add_run(db, "s1", kind="student", depends_on=["t1"])
    add_run(db, "s2", kind="student", depends_on=["t2"])
    groups = {r: ["s1", "s2"] for r in ("s1", "s2")}
    assert [r["run_id"] for r in db.claim_group("w", groups)] == ["t1"]
    db.fail("t1", error="diverged")
    assert [r["run_id"] for r in db.claim_group("w", groups)] == ["t2"]
    db.complete("t2", metrics={}, timings={})
    assert [r["run_id"] for r in db.claim_group("w", groups)] == ["s2"]
    assert [r["run_id"] for r in db.blocked()] == ["s1"]
