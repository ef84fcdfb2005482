"""Which processes are alive, asked by the writers that name themselves by host and pid (temporary files, claims of
study tasks). Standard library only: a study's queue imports it without torch."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but belongs to another user
    return True


def slurm_job() -> str | None:
    """The Slurm job this process runs in, as squeue and scancel name it (`ARRAY_TASK` for an element of a job
    array, whose SLURM_JOB_ID is another number); None outside Slurm. A requeued job keeps its id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None
