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
    created_at   REAL NOT NULL
)
"""

# Columns stored as JSON text, with the key each one has in the dicts handed out.
_JSON_COLUMNS = {"config": "config", "depends_on": "depends_on", "group_json": "group", "metrics": "metrics",
                 "timings": "timings"}
_FILTERABLE = ("run_id", "kind", "name", "status")


class ClaimLost(RuntimeError):
    """This process no longer holds the claim on a run: it was judged stale and taken over, or the run was settled."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


class ResultsDB:
    """One connection to a study's results.sqlite; a failed run is claimed again until it has made max_attempts."""

    def __init__(self, path: str | Path, *, stale_after_s: float = 120.0, max_attempts: int = 2,
                 readonly: bool = False):
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.max_attempts = max_attempts
        self._pid = os.getpid()
        self._host = socket.gethostname()
        if readonly:
            # A reader (the report) never changes the file, so a committed study's database stays byte-identical.
            if not self.path.is_file():
                raise FileNotFoundError(self.path)
            self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0,
                                         isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA busy_timeout = 30000")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are only the ones opened explicitly below.
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA busy_timeout = 30000")
        self._conn.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL cannot corrupt the file; a power cut may only roll back the last commits.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        with self._write():
            self._conn.execute(_SCHEMA)

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
                       if self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (dep,)).fetchone() is None]
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
            self._settle_dead_claims(self._conn.execute("SELECT * FROM runs").fetchall(), now)
            rows = self._conn.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
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
                    "started_at = ?, heartbeat = ?, attempts = attempts + 1 WHERE run_id = ?",
                    (claimer, self._pid, self._host, now, now, row["run_id"]))
            return [self._decode(self._conn.execute("SELECT * FROM runs WHERE run_id = ?", (row["run_id"],))
                                 .fetchone()) for row in chosen]

    def _owned(self, run_id: str) -> sqlite3.Row:
        row = self._conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run {run_id} in {self.path}")
        if (row["status"], row["claimer_pid"], row["claimer_host"]) != ("running", self._pid, self._host):
            raise ClaimLost(f"run {run_id} ({row['name']}) is {row['status']}, claimed by {row['claimer']}, "
                            f"not by this process ({self._pid}@{self._host})")
        return row

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
                               "claimer_pid = NULL, claimer_host = NULL WHERE run_id = ?", (run_id,))

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

