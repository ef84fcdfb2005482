"""Checkpoint references as text: split into run path and selector, rewritten relative to the run that names them,
and compared by what they name. No file is read here but the runs' existence (`same_checkpoints`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable


def split_reference(text: str) -> tuple[Path, str]:
    # A path may itself contain '@'; the selector is whatever follows the last one, if it looks like a selector.
    if "@" in text:
        run, spec = text.rsplit("@", 1)
        if run and re.fullmatch(r"[\w.,=:\-]+", spec):
            return Path(run), spec
    return Path(text), "last"


def relative_to(reference: str, start: str | Path) -> str:
    """`reference` rewritten relative to the folder `start` (the run that names it), so that it stays true from any
    working directory and after the folders that hold both are moved together."""
    path, spec = split_reference(reference)
    return f"{os.path.relpath(path, start)}@{spec}"


def same_checkpoints(a: str, b: str, bases: Iterable[str | Path]) -> bool:
    """Whether two references name the same run and selector, each resolved against the first of `bases` where its
    run exists (a saved config's references may be relative to its run folder, or, before 0.4, to the working
    directory)."""
    def where(reference: str) -> tuple[str, str]:
        path, spec = split_reference(reference)
        candidates = [path] if path.is_absolute() else [Path(os.path.normpath(Path(b) / path)) for b in bases]
        found = next((c for c in candidates if c.exists()), candidates[0])
        return os.path.realpath(found), spec
    return where(a) == where(b)
