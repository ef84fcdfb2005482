"""ckptkd: knowledge distillation from model checkpoints.

Train a teacher and keep its trajectory, analyse each checkpoint, select T* or a snapshot ensemble, distill students.
"""

from . import losses, models
from .checkpoints import resolve as resolve_reference
from .errors import UserError
from .train import Run, distill, train

__version__ = "0.1.0"

__all__ = ["train", "distill", "Run", "resolve_reference", "models", "losses", "UserError", "__version__"]
