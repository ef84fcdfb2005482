"""The results database of a study: one row per run, shared by every `ckptkd study` process on the folder.

Processes divide the work by claiming runs: a claim is one `BEGIN IMMEDIATE` transaction, so two processes can never
claim the same run. A claim records the claimer's pid and host and a heartbeat; a claim whose pid is gone from this
host, or whose heartbeat is older than `stale_after_s`, belongs to a dead process and is taken over by the next claim.

The file is SQLite in WAL mode, so it must live on a local filesystem (WAL needs shared memory between processes).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..processes import pid_alive

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'complete', 'failed')),
    config       TEXT NOT NULL,
    path         TEXT NOT NULL,
    depends_on   TEXT NOT NULL DEFAULT '[]',
    group_json   TEXT,
    metrics      TEXT,
    timings      TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    claimer      TEXT,
    claimer_pid  INTEGER,
    claimer_host TEXT,
    started_at   REAL,
    heartbeat    REAL,
    error        TEXT,
    created_at   REAL NOT NULL,
    batch        TEXT,
    job          TEXT
)
"""
# Added after 0.3 (`ALTER TABLE` on a study begun before): the Slurm launcher's submission of a claimed run and the
# Slurm job that runs it.
_LATER_COLUMNS = {"batch": "TEXT", "job": "TEXT"}

# Columns stored as JSON text, with the key each one has in the dicts handed out.
_JSON_COLUMNS = {"config": "config", "depends_on": "depends_on", "group_json": "group", "metrics": "metrics",
                 "timings": "timings"}
_FILTERABLE = ("run_id", "kind", "name", "status")


class ClaimLost(RuntimeError):
    """This process no longer holds the claim on a run: it was judged stale and taken over, or the run was settled."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


COLUMNS = {"run_id", "kind", "name", "status", "config", "path", "depends_on", "group_json", "metrics", "timings",
           "attempts", "claimer", "claimer_pid", "claimer_host", "heartbeat", "error"}
BUSY_S = 30.0  # how long a process waits for another's lock on the file before it gives up, saying so


def _explain(path: Path, error: sqlite3.Error) -> str:
    """One line naming the database and what is wrong with it, for any error SQLite raises."""
    text = str(error)
    if "locked" in text or "busy" in text:
        return (f"study database {path} is locked by another process (waited {BUSY_S:g} s); wait for it, or find the "
                "process that holds it")
    if "unable to open" in text:
        return f"study database {path} cannot be opened ({text}): is it a folder, or in a folder you cannot write?"
    return (f"study database {path} is damaged or not a database ({text}); restore it from a copy (`ckptkd verify` "
            "still checks every run folder)")


class _Connection:
    """A SQLite connection whose every error is a one-line UserError naming the file (a damaged, foreign, locked
    or missing database is the user's to mend, never a traceback). Queries return their rows fetched, so an error
    in reading them is caught here too."""

    def __init__(self, path: Path, uri: str, *, readonly: bool):
        self.path = path
        try:
            self.raw = sqlite3.connect(uri, uri=True, timeout=BUSY_S, isolation_level=None)
        except sqlite3.Error as error:
            raise UserError(_explain(path, error)) from None
        self.raw.row_factory = sqlite3.Row

    def execute(self, query: str, parameters=()) -> list[sqlite3.Row]:
        try:
            return self.raw.execute(query, parameters).fetchall()
        except sqlite3.Error as error:
            raise UserError(_explain(self.path, error)) from None

    def close(self) -> None:
        self.raw.close()


class ResultsDB:
    """One connection to a study's results.sqlite; a failed run is claimed again until it has made max_attempts."""

    def __init__(self, path: str | Path, *, stale_after_s: float = 120.0, max_attempts: int = 2,
                 readonly: bool = False):
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.max_attempts = max_attempts
        self._pid = os.getpid()
        self._host = socket.gethostname()
        if self.path.exists() and not self.path.is_file():
            raise UserError(f"study database {self.path} is not a file (a folder stands in its place)")
        if readonly:
            # A reader (the report) never changes the file, so a committed study's database stays byte-identical.
            if not self.path.is_file():
                raise UserError(f"study database {self.path} is missing")
            self._conn = _Connection(self.path, f"{self.path.resolve().as_uri()}?mode=ro", readonly=True)
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_S * 1000)}")
            self._check_schema(empty_ok=False)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are only the ones opened explicitly below.
        self._conn = _Connection(self.path, self.path.resolve().as_uri(), readonly=False)
        self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_S * 1000)}")
        self._check_schema(empty_ok=True)
        self._conn.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL cannot corrupt the file; a power cut may only roll back the last commits.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        with self._write():
            self._conn.execute(_SCHEMA)
            have = {row[1] for row in self._conn.execute("PRAGMA table_info(runs)")}
            for column, kind in _LATER_COLUMNS.items():
                if column not in have:
                    self._conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

    def _check_schema(self, *, empty_ok: bool) -> None:
        """Refuse a database that is not a study's: tables, but no `runs` table of ours (another program's file),
        or — for a reader — no tables at all (an empty file)."""
        tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and empty_ok:
            return
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(runs)")}
        if "runs" not in tables or not COLUMNS <= columns:
            what = "it is empty" if not tables else f"its tables: {', '.join(sorted(tables))}"
            raise UserError(f"study database {self.path} is not a ckptkd study database ({what}); it was not "
                            "changed. Restore the study's own results.sqlite")

    @contextmanager
    def _write(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so what a transaction reads cannot change before it writes.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _decode(self, row: sqlite3.Row) -> dict:
        out = {}
        for key in row.keys():
            value = row[key]
            if key in _JSON_COLUMNS:
                key = _JSON_COLUMNS[key]
                value = None if value is None else json.loads(value)
            out[key] = value
        return out

    def add(self, run_id: str, *, kind: str, name: str, config: dict, path: str, depends_on: list[str] = (),
            group: dict | None = None) -> None:
        """Insert a pending run; adding a run_id that is already there changes nothing.

        Dependencies must have been added first, which also rules out dependency cycles.
        """
        depends_on = list(depends_on)
        with self._write():
            missing = [dep for dep in depends_on
                       if not self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (dep,))]
            if missing:
                raise ValueError(f"run {run_id} ({name}) depends on runs not in {self.path}: {', '.join(missing)}")
            self._conn.execute(
                "INSERT OR IGNORE INTO runs (run_id, kind, name, config, path, depends_on, group_json, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, kind, name, _dumps(config), str(path), _dumps(depends_on),
                 None if group is None else _dumps(group), time.time()))

    def _is_stale(self, row: sqlite3.Row, now: float) -> bool:
        if now - row["heartbeat"] > self.stale_after_s:
            return True
        # Another host's pids mean nothing here: only the heartbeat can tell that claimer is dead.
        return row["claimer_host"] == self._host and not pid_alive(row["claimer_pid"])

    def _claimable(self, row: sqlite3.Row, now: float) -> bool:
        if row["status"] == "pending":
            return True
        # A stale claim (its worker was killed, perhaps by running out of memory) counts as an attempt, so a run
        # that kills every worker that takes it stops being retried after max_attempts.
        return row["status"] in ("failed", "running") and row["attempts"] < self.max_attempts and (
            row["status"] == "failed" or self._is_stale(row, now))

    def _settle_dead_claims(self, rows: list[sqlite3.Row], now: float) -> None:
        """Mark failed the runs whose last allowed attempt died with its worker (inside a write transaction)."""
        for row in rows:
            if row["status"] == "running" and row["attempts"] >= self.max_attempts and self._is_stale(row, now):
                self._conn.execute(
                    "UPDATE runs SET status = 'failed', error = ? WHERE run_id = ?",
                    (f"its worker ({row['claimer']}) died during attempt {row['attempts']} of {self.max_attempts} "
                     "(killed, or out of memory)", row["run_id"]))

    def claim(self, worker: str | None = None) -> dict | None:
        """Take one run that can start now (its dependencies complete) and mark it running; None if there is none."""
        claimed = self.claim_group(worker)
        return claimed[0] if claimed else None

    def claim_group(self, worker: str | None = None, groups: dict[str, list[str]] | None = None) -> list[dict]:
        """Take the first run that can start now, with the rest of its group (`groups`: run_id -> the run_ids
        trained together with it), all in one transaction; [] if nothing can start.

        A group is taken whole: the members still to do (not complete, not failed for good) must all be able to
        start now, or the group waits, so a study trains the same groups whatever the timing of its workers."""
        groups = groups or {}
        with self._write():
            now = time.time()
            self._settle_dead_claims(self._conn.execute("SELECT * FROM runs"), now)
            rows = self._conn.execute("SELECT * FROM runs ORDER BY rowid")
            by_id = {row["run_id"]: row for row in rows}
            status = {row["run_id"]: row["status"] for row in rows}
            failed, blocked_by = self._dead_ends([self._decode(row) for row in rows])

            def ready(row) -> bool:
                return self._claimable(row, now) and all(status.get(dep) == "complete"
                                                         for dep in json.loads(row["depends_on"]))

            def done(row) -> bool:  # nothing left to do: complete, failed for good, or blocked by such a run
                return row["status"] == "complete" or row["run_id"] in failed or row["run_id"] in blocked_by

            chosen = None
            for row in rows:
                if not ready(row):
                    continue
                members = [by_id[r] for r in groups.get(row["run_id"], [row["run_id"]]) if r in by_id]
                todo = [m for m in members if not done(m)]
                if all(ready(m) for m in todo):
                    chosen = todo
                    break
            if not chosen:
                return []
            claimer = f"{self._pid}@{self._host}" + (f"/{worker}" if worker else "")
            for row in chosen:
                self._conn.execute(
                    "UPDATE runs SET status = 'running', claimer = ?, claimer_pid = ?, claimer_host = ?, "
                    "started_at = ?, heartbeat = ?, attempts = attempts + 1, batch = NULL, job = NULL "
                    "WHERE run_id = ?",
                    (claimer, self._pid, self._host, now, now, row["run_id"]))
            return [self._decode(self._row(row["run_id"])) for row in chosen]

    def _row(self, run_id: str) -> sqlite3.Row | None:
        rows = self._conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return rows[0] if rows else None

    def _owned(self, run_id: str) -> sqlite3.Row:
        row = self._row(run_id)
        if row is None:
            raise KeyError(f"no run {run_id} in {self.path}")
        if (row["status"], row["claimer_pid"], row["claimer_host"]) != ("running", self._pid, self._host):
            raise ClaimLost(f"run {run_id} ({row['name']}) is {row['status']}, claimed by {row['claimer']}, "
                            f"not by this process ({self._pid}@{self._host})")
        return row

    def assign(self, run_id: str, *, batch: str | None = None, job: str | None = None) -> None:
        """Record the Slurm submission (`batch`) a claimed run goes out in, before it is submitted, and then the
        Slurm job that runs it: a coordinator started again finds every run it had sent out."""
        with self._write():
            self._owned(run_id)
            if batch is not None:
                self._conn.execute("UPDATE runs SET batch = ? WHERE run_id = ?", (batch, run_id))
            if job is not None:
                self._conn.execute("UPDATE runs SET job = ? WHERE run_id = ?", (job, run_id))

    def adopt(self, run_id: str) -> dict:
        """Make this process the claimer of a running run another (dead) coordinator of the study had claimed; the
        caller holds the study's coordinator lock, so no live process can hold the claim."""
        with self._write():
            rows = self._conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,))
            if not rows or rows[0]["status"] != "running":
                raise ClaimLost(f"run {run_id} is not running, so it cannot be adopted")
            self._conn.execute("UPDATE runs SET claimer = ?, claimer_pid = ?, claimer_host = ?, heartbeat = ? "
                               "WHERE run_id = ?", (f"{self._pid}@{self._host}/slurm", self._pid, self._host,
                                                    time.time(), run_id))
            return self._decode(self._row(run_id))

    def heartbeat(self, run_id: str) -> None:
        """Show that this process is still working on run_id; raises ClaimLost if another process took it over."""
        with self._write():
            self._owned(run_id)
            self._conn.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ?", (time.time(), run_id))

    def _finish(self, run_id: str, status: str, *, metrics: dict | None, timings: dict, error: str | None) -> None:
        with self._write():
            row = self._owned(run_id)
            now = time.time()
            timings = {"started_at": row["started_at"], "finished_at": now,
                       "duration_s": now - row["started_at"], **timings}
            self._conn.execute(
                "UPDATE runs SET status = ?, metrics = ?, timings = ?, error = ?, heartbeat = ? WHERE run_id = ?",
                (status, None if metrics is None else _dumps(metrics), _dumps(timings), error, now, run_id))

    def complete(self, run_id: str, *, metrics: dict, timings: dict) -> None:
        """Record a finished run; `timings` is merged over the started_at/finished_at/duration_s measured here."""
        self._finish(run_id, "complete", metrics=metrics, timings=timings, error=None)

    def fail(self, run_id: str, *, error: str) -> None:
        """Record a failed attempt; the run is claimed again until it has used max_attempts."""
        self._finish(run_id, "failed", metrics=None, timings={}, error=error)

    def release(self, run_id: str) -> None:
        """Give a claimed run back untried (the worker was interrupted): pending again, this attempt not counted."""
        with self._write():
            self._owned(run_id)
            self._conn.execute("UPDATE runs SET status = 'pending', attempts = attempts - 1, claimer = NULL, "
                               "claimer_pid = NULL, claimer_host = NULL, batch = NULL, job = NULL WHERE run_id = ?", (run_id,))

    def rows(self, **filters: Any) -> list[dict]:
        """All runs in the order they were added, optionally only those equal to the given run_id/kind/name/status."""
        unknown = set(filters) - set(_FILTERABLE)
        if unknown:
            raise TypeError(f"rows() can filter on {', '.join(_FILTERABLE)}, not {', '.join(sorted(unknown))}")
        where = " AND ".join(f"{column} = ?" for column in filters) or "1"
        query = f"SELECT * FROM runs WHERE {where} ORDER BY rowid"
        return [self._decode(row) for row in self._conn.execute(query, tuple(filters.values()))]

    def _dead_ends(self, rows: list[dict]) -> tuple[set[str], dict[str, list[str]]]:
        """The runs that failed for good, and for every run blocked by them the dependencies that block it."""
        failed = {r["run_id"] for r in rows if r["status"] == "failed" and r["attempts"] >= self.max_attempts}
        dead, blocked_by = set(failed), {}
        # Blocking is transitive; dependencies are added before their dependents, so one pass in rowid order suffices.
        for r in rows:
            roots = []
            for dep in r["depends_on"]:
                for root in ([dep] if dep in failed else blocked_by.get(dep, [])):
                    if root not in roots:
                        roots.append(root)
            if roots:
                blocked_by[r["run_id"]] = roots  # the runs that failed for good at the root of the chain
                dead.add(r["run_id"])
        return failed, blocked_by

    def pending_count(self) -> int:
        """Runs that may still complete: pending, running, or failed with retries left, and not blocked."""
        rows = self.rows()
        failed, blocked_by = self._dead_ends(rows)
        return sum(1 for r in rows if r["status"] != "complete" and r["run_id"] not in failed
                   and r["run_id"] not in blocked_by)

    def blocked(self) -> list[dict]:
        """Runs that can never run because a dependency (or one of its own) failed for good, with `blocked_by` set to
        the failed runs at the root of the chain."""
        rows = self.rows()
        _, blocked_by = self._dead_ends(rows)
        return [{**r, "blocked_by": blocked_by[r["run_id"]]} for r in rows if r["run_id"] in blocked_by]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

