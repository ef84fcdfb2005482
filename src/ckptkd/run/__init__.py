"""The run folder: its one reader and writer (`folder`), its lock (`lock`), the typed manifest (`manifest`), the resume
state (`state`), the analysis file's format (`analysis_file`), checkpoint references (`references`, and `paths`: the
same as text) and crash-safe, self-verifying files (`storage`). Every command that touches a run folder goes through
this package."""

from .folder import ANALYSIS, CONFIG, MANIFEST, STATE, Run, RunWriter, checkpoint_path, runs_under, write_run
from .manifest import CheckpointEntry, Final, Manifest, data_change, provenance
from .paths import relative_to, split_reference
from .references import Checkpoint, resolve, resolve_all
from .state import Progress

__all__ = ["Run", "RunWriter", "write_run", "runs_under", "checkpoint_path", "Manifest", "CheckpointEntry", "Final",
           "Progress", "provenance", "data_change", "Checkpoint", "resolve", "resolve_all", "split_reference", "relative_to",
           "MANIFEST", "CONFIG", "STATE", "ANALYSIS"]
