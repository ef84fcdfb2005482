"""What this machine's memory can hold, asked before a large allocation is attempted: the in-memory data sources and
the models check their size against it, so an input that could never fit is refused in one line instead of
swapping for minutes or being killed by the kernel. Standard library only."""

from __future__ import annotations

import os

from .errors import UserError


def available_memory() -> int:
    """Bytes this machine can still give without swapping (Linux' MemAvailable), or its physical memory where that
    is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62  # not knowable here: nothing is refused for its size


def check_fits(where: str, needed: int, what: str) -> None:
    """Refuse (naming `where` and `what`) when `needed` bytes exceed what is available."""
    have = available_memory()
    if needed > have:
        raise UserError(f"{where}: {what} need {needed / 2**30:,.1f} GiB in memory; this machine has "
                        f"{have / 2**30:,.1f} GiB available")


def is_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, torch's CUDA out-of-memory error, and its CPU allocator's refusal (a RuntimeError)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
