"""What a training step minimises, for each run of a group (a single run is a group of one): cross-entropy alone,
or the paper's loss (`losses.kd_loss`) under the run's frozen teacher, with its named terms (cf. mdistiller's
losses dict), logged as train_<term>.

Two forms of the same loss, one owner:
  `member_loss(i, logits, batch)`  run i's loss by `kd_loss` itself, exactly as the tested function computes it;
                                   for engines that step the runs one at a time (and so for every single run)
  `batched(logits, batch)`         every run's loss at once by `kd_loss_members` (equal to `kd_loss` up to float
                                   rounding, tested), for the fused engine, with the soft targets of cached teachers
                                   gathered for the whole epoch at once
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import Batch, EpochPlan
from ..losses import kd_loss, kd_loss_members, soft_targets

TERMS = ("ce", "kd")  # every name a run may log; a run logs the ones `names[i]` lists


class Objective:
    def __init__(self, teachers: list, kds: list[dict], num_classes: int, device: torch.device):
        self.teachers, self.kds, self.num_classes = teachers, kds, num_classes
        # alpha = 1 needs no teacher output: the teacher is not asked.
        self.kd_used = [t is not None and kd["alpha"] < 1 for t, kd in zip(teachers, kds)]
        self.names = [[] if t is None else list(TERMS) if used else ["ce"] for t, used in zip(teachers, self.kd_used)]
        self.temperature = torch.tensor([kd["temperature"] for kd in kds], device=device)
        self.alpha = torch.tensor([kd["alpha"] if used else 1.0 for kd, used in zip(kds, self.kd_used)],
                                  device=device)
        self._plans: list[EpochPlan] = []
        self._epoch_targets: tuple[torch.Tensor, torch.Tensor] | None = None

    def view_bank(self, i: int) -> torch.Tensor | None:
        """The views run i's cached teacher answers for: its batches must be drawn from them."""
        return self.teachers[i].view_bank if self.teachers[i] is not None else None

    def member_loss(self, i: int, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run i's loss on its own batch (logits [B, C]) and its terms."""
        teacher, kd = self.teachers[i], self.kds[i]
        if teacher is None:
            return F.cross_entropy(logits, batch.y), {}
        targets = teacher.logits(batch) if self.kd_used[i] else None
        return kd_loss(logits, targets, batch.y, temperature=kd["temperature"], alpha=kd["alpha"],
                       ensemble=kd["ensemble"], return_terms=True)

    def begin_epoch(self, plans: list[EpochPlan]) -> None:
        self._plans, self._epoch_targets = plans, None

    def batched(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every run's loss [N] on its own batch (logits [N, B, C]), with the terms {"ce": [N], "kd": [N]}."""
        soft, plogp = self._targets(batch)
        return kd_loss_members(logits, batch.y, soft=soft, plogp=plogp, temperature=self.temperature,
                               alpha=self.alpha)

    def _targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every run's soft targets for its batch: (P [N, B, C], plogp [N, B]); zeros for those without KD."""
        if self._epoch_targets is None:
            self._epoch_targets = self._cached_targets()
        soft_all, plogp_all = self._epoch_targets
        index = batch.index
        soft = soft_all.gather(1, index[..., None].expand(-1, -1, self.num_classes))
        plogp = plogp_all.gather(1, index)
        for i, teacher in enumerate(self.teachers):
            if self.kd_used[i] and (teacher.cache is None or self._plans[i].view_ids is None):  # online
                soft[i], plogp[i] = soft_targets(teacher.logits(batch.member(i)),
                                                 temperature=self.kds[i]["temperature"],
                                                 ensemble=self.kds[i]["ensemble"])
        return soft, plogp

    def _cached_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft targets for the whole epoch from every cached teacher, one row per training image (each image shows
        one view per epoch), so a step's targets are one gather for all N; teachers run online are asked per step."""
        n, c = len(self.teachers), self.num_classes
        images = len(self._plans[0].order)
        device = self.temperature.device
        soft = torch.zeros(n, images, c, device=device)
        plogp = torch.zeros(n, images, device=device)
        for i, (teacher, plan) in enumerate(zip(self.teachers, self._plans)):
            if not self.kd_used[i] or teacher.cache is None or plan.view_ids is None:
                continue
            logits = teacher.cache[:, torch.arange(images, device=teacher.cache.device), plan.view_ids].float()
            soft[i], plogp[i] = soft_targets(logits, temperature=self.kds[i]["temperature"],
                                             ensemble=self.kds[i]["ensemble"])
        return soft, plogp
