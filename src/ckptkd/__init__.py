"""ckptkd: knowledge distillation from model checkpoints.

Train a teacher and keep its trajectory, analyse each checkpoint, select T* or a snapshot ensemble, distill students.

The names below are imported on first use, so `import ckptkd` (and `ckptkd --help`) does not load torch.
"""

import importlib
import os

# On a few cores, two busy processes (study workers, torchrun ranks) spin against each other ~10x slower unless
# OpenMP threads wait passively; it must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.4.0"

# The public names, by where they live (layout by pipeline stage: data, models -> run -> teachers -> training ->
# selection -> study -> cli).
_LAZY = {
    "train": ("training.api", "train"), "distill": ("training.api", "distill"),
    "distill_fused": ("training.api", "distill_fused"), "fit": ("training.loop", "fit"),
    "Member": ("training.loop", "Member"), "import_trajectory": ("training.importer", "import_trajectory"),
    "analyze": ("selection.analysis", "analyze"), "select": ("selection.analysis", "select"),
    "run_study": ("study.runner", "run_study"), "write_report": ("study.report", "write_report"),
    "Run": ("run", "Run"), "resolve_reference": ("run", "resolve"), "UserError": ("errors", "UserError"),
    "Teacher": ("teachers", "Teacher"),
    "info": ("selection.info", None), "losses": ("losses", None), "models": ("models", None),
    "fusion": ("training.fusion", None), "run": ("run", None), "storage": ("run.storage", None),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ckptkd' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
