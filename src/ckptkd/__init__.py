"""ckptkd: knowledge distillation from model checkpoints.

Train a teacher and keep its trajectory, analyse each checkpoint, select T* or a snapshot ensemble, distill students.
"""

import os

# On a few cores, two busy processes (study workers, torchrun ranks) spin against each other ~10x slower unless
# OpenMP threads wait passively; it must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import info, losses, models  # noqa: E402
from .analysis import analyze, select  # noqa: E402
from .checkpoints import resolve as resolve_reference  # noqa: E402
from .errors import UserError  # noqa: E402
from .study import run_study  # noqa: E402
from .train import Run, distill, train  # noqa: E402

__version__ = "0.1.0"

__all__ = ["train", "distill", "analyze", "select", "run_study", "Run", "resolve_reference", "models", "losses",
           "info", "UserError", "__version__"]
