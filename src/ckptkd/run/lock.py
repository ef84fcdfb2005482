"""One writer per run folder: RUN/.lock names the process that writes the run (host, pid, and its Slurm job).

A second process that would write into a folder another live process holds is refused in one line naming the
holder (a `--resume` while the first still trains; two `train --out X` at once). A lock whose holder is gone is taken
over: a process of this host that no longer runs, or — on a cluster, where the holder's host cannot be asked — an
earlier run of the same Slurm job (a requeued job starts again, possibly on another node, after Slurm stopped the
first). The lock is created atomically (O_EXCL) and taken over by an atomic rename, so of two processes racing for a
folder exactly one wins.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError
from ..processes import pid_alive, slurm_job

LOCK = ".lock"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": slurm_job(),
            "since": round(time.time(), 3)}


def _holder_gone(holder: dict) -> bool:
    me = _me()
    if holder.get("job") and holder.get("job") == me["job"]:
        return True  # an earlier run of this very Slurm job (requeued): Slurm stopped it before starting us
    return holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1)))


class RunLock:
    """The lock of the run folder `path`; `acquire` creates the folder if needed (and `release` removes it again if
    nothing else was written into it)."""

    def __init__(self, path: Path, *, what: str = "run folder"):
        self.folder, self.path = Path(path), Path(path) / LOCK
        self.what = what
        self.created_folder = False
        self.held = False

    def acquire(self) -> None:
        self.created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = json.dumps(_me())
        for _ in range(3):  # a holder may release or replace the lock between our looks
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released just now, or half-written by a creator that is still writing
                if not _holder_gone(holder):
                    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
                    raise UserError(f"{self.what} {self.folder} is being written by another process (host "
                                    f"{holder.get('host')}, pid {holder.get('pid')}{job}); wait for it to finish, "
                                    "or stop it first")
                if self._take_over(mine):
                    return
                continue
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            self.held = True
            return
        raise UserError(f"{self.what} {self.folder}: could not take its lock {self.path} (other processes keep "
                        "changing it); try again")

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError, UnicodeDecodeError, RecursionError):  # damaged: as if absent
            return None
        return holder if isinstance(holder, dict) else None

    def _take_over(self, mine: str) -> bool:
        """Replace a gone holder's lock by ours, atomically; True when it is ours afterwards."""
        temporary = self.folder / f"{LOCK}.{os.getpid()}.tmp"
        temporary.write_text(mine)
        os.replace(temporary, self.path)
        self.held = self._read() == json.loads(mine)
        return self.held

    def release(self) -> None:
        if self.held and self._read() is not None and self._read().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
        if self.created_folder and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()  # nothing was written: a refused or failed start leaves no folder behind
