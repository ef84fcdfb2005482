"""The run folder: its one reader and writer (`folder`), the typed manifest (`manifest`), the resume state (`state`)
and checkpoint references (`references`). Every command that touches a run folder goes through this package."""

from .folder import ANALYSIS, CONFIG, MANIFEST, STATE, Run, RunWriter, checkpoint_path, runs_under, write_run
from .manifest import CheckpointEntry, Final, Manifest, provenance
from .references import Checkpoint, resolve, resolve_all, split_reference
from .state import Progress

__all__ = ["Run", "RunWriter", "write_run", "runs_under", "checkpoint_path", "Manifest", "CheckpointEntry", "Final",
           "Progress", "provenance", "Checkpoint", "resolve", "resolve_all", "split_reference", "MANIFEST", "CONFIG", "STATE",
           "ANALYSIS"]
