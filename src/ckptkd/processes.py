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
