"""Training: the one loop (`loop`) for teachers and students, single runs and groups; what a step minimises
(`objective`); how a group computes (`engines`, `fusion`); run health, schedules, trackers, torchrun; the API
(`api`: train, distill, distill_fused) and importing a trajectory trained elsewhere (`importer`)."""

from .api import distill, distill_fused, train
from .loop import Member, fit

__all__ = ["train", "distill", "distill_fused", "fit", "Member"]
