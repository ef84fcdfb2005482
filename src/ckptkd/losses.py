"""Distillation loss from an ensemble of checkpoint teachers.

Implements the loss of "Efficient Knowledge Distillation from Model Checkpoints" (NeurIPS 2022):
``L = alpha * CE(y, P_S) + (1 - alpha) * tau^2 * KL(P_T || softmax(s / tau))``, batch mean.
How the M teachers form ``P_T`` is chosen by ``ensemble``:

- ``"probs"``: ``P_T = mean_m softmax(t_m / tau)``, the formula in the paper;
- ``"logits"``: ``P_T = softmax(mean_m t_m / tau)``, what the authors' released code does;
- ``"per_teacher"``: the KL term is the mean over teachers of ``KL(softmax(t_m / tau) || softmax(s / tau))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

ENSEMBLE_MODES = ("probs", "logits", "per_teacher")

TeacherLogits = torch.Tensor | Sequence[torch.Tensor]


def _check_options(temperature: float, ensemble: str) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ensemble not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble must be one of {ENSEMBLE_MODES}, got {ensemble!r}")


def _stack_teachers(teacher_logits: TeacherLogits | None, like: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher logits as a detached ``[M, B, C]`` tensor, cast to ``like``'s dtype and device if given."""
    if teacher_logits is None:
        raise ValueError("teacher_logits is required unless alpha == 1")
    if isinstance(teacher_logits, torch.Tensor):
        stacked = teacher_logits.unsqueeze(0) if teacher_logits.dim() == 2 else teacher_logits
    else:
        teachers = list(teacher_logits)
        if not teachers:
            raise ValueError("teacher_logits is an empty sequence")
        if any(t.shape != teachers[0].shape for t in teachers):
            raise ValueError(f"teacher logits shapes differ: {[tuple(t.shape) for t in teachers]}")
        stacked = torch.stack(teachers)
    if stacked.dim() != 3:
        raise ValueError(
            f"teacher logits must be [B, C], [M, B, C] or a list of [B, C], got shape {tuple(stacked.shape)}"
        )
    if like is not None and stacked.shape[1:] != like.shape:
        raise ValueError(
            f"teacher logits shape {tuple(stacked.shape)} ([M, B, C]) does not match "
            f"student logits shape {tuple(like.shape)} ([B, C])"
        )
    stacked = stacked.detach()
    return stacked if like is None else stacked.to(dtype=like.dtype, device=like.device)


def _teacher_log_probs(teachers: torch.Tensor, temperature: float, ensemble: str) -> torch.Tensor:
    """Log soft targets, ``[1, B, C]`` (one ensemble target) or ``[M, B, C]`` for ``"per_teacher"``."""
    log_probs = F.log_softmax(teachers / temperature, dim=-1)
    if ensemble == "probs":
        # log of the mean of softmaxes, without ever taking log of an underflowed probability
        return torch.logsumexp(log_probs, dim=0, keepdim=True) - math.log(teachers.shape[0])
    if ensemble == "logits":
        return F.log_softmax(teachers.mean(dim=0, keepdim=True) / temperature, dim=-1)
    return log_probs


def teacher_probs(teacher_logits: TeacherLogits, *, temperature: float, ensemble: str = "probs") -> torch.Tensor:
    """Soft targets ``P_T`` as ``[B, C]``; for ``"per_teacher"`` the mean of per-teacher probabilities."""
    _check_options(temperature, ensemble)
    log_p = _teacher_log_probs(_stack_teachers(teacher_logits), temperature, ensemble)
    return log_p.exp().mean(dim=0)


def kd_terms(
    student_logits: torch.Tensor,
    teacher_logits: TeacherLogits,
    targets: torch.Tensor,
    *,
    temperature: float,
    ensemble: str = "probs",
) -> dict[str, torch.Tensor]:
    """Unweighted terms ``{"ce": ..., "kd": ...}``; ``kd`` already includes the ``tau^2`` factor."""
    _check_options(temperature, ensemble)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must have shape [B, C], got {tuple(student_logits.shape)}")
    teachers = _stack_teachers(teacher_logits, like=student_logits)
    log_p = _teacher_log_probs(teachers, temperature, ensemble)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = log_p.exp()
    # 0 * log 0 = 0: a masked (-inf) teacher logit would otherwise give 0 * -inf = nan
    pointwise = torch.where(p > 0, p * (log_p - log_q), 0.0)
    kd = pointwise.sum(dim=-1).mean() * temperature**2
    return {"ce": F.cross_entropy(student_logits, targets), "kd": kd}


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: TeacherLogits | None,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    ensemble: str = "probs",
    return_terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``alpha * CE(targets, s) + (1 - alpha) * tau^2 * KL(P_T || softmax(s / tau))``, batch mean.

    With ``return_terms`` also the unweighted terms ``{"ce": ..., "kd": ...}`` (no ``kd`` when ``alpha == 1``): the
    training loop logs them, and takes the loss it minimises from here, so the loop runs exactly the tested loss.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_options(temperature, ensemble)
    if alpha == 1:
        ce = F.cross_entropy(student_logits, targets)
        return (ce, {"ce": ce}) if return_terms else ce
    terms = kd_terms(student_logits, teacher_logits, targets, temperature=temperature, ensemble=ensemble)
    loss = alpha * terms["ce"] + (1 - alpha) * terms["kd"]
    return (loss, terms) if return_terms else loss


def soft_targets(teacher_logits: TeacherLogits, *, temperature: float,
                 ensemble: str = "probs") -> tuple[torch.Tensor, torch.Tensor]:
    """What the KD term needs of a teacher, ahead of the student: ``(P, plogp)`` with ``P`` the soft targets
    ``[B, C]`` (for ``"per_teacher"`` the mean of the teachers' probabilities) and ``plogp`` ``[B]`` the sum over
    classes of ``P log P`` (for ``"per_teacher"`` the mean of each teacher's), so that for every mode

        ``KL term = tau^2 * mean_b (plogp - sum_c P log softmax(s / tau))``,

    the form `kd_loss_members` computes for many students at once."""
    _check_options(temperature, ensemble)
    log_p = _teacher_log_probs(_stack_teachers(teacher_logits).float(), temperature, ensemble)
    p = log_p.exp()
    plogp = torch.where(p > 0, p * log_p, 0.0).sum(dim=-1).mean(dim=0)  # 0 log 0 = 0
    return p.mean(dim=0), plogp


def kd_loss_members(student_logits: torch.Tensor, targets: torch.Tensor, *, soft: torch.Tensor, plogp: torch.Tensor,
                    temperature: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`kd_loss` for N students at once, each with its own teacher targets, temperature and alpha.

    ``student_logits`` ``[N, B, C]``, ``targets`` ``[N, B]``; ``soft`` ``[N, B, C]`` and ``plogp`` ``[N, B]`` from
    `soft_targets` (zeros for a student without a teacher, whose alpha is then 1); ``temperature`` and ``alpha``
    ``[N]``. Returns each student's loss ``[N]`` and its unweighted terms ``{"ce": [N], "kd": [N]}``: student i's
    values equal ``kd_loss(student_logits[i], ..., return_terms=True)`` up to float rounding (tested), and the
    gradient of the SUM of the losses reaches each student as its own loss's gradient."""
    n, b, c = student_logits.shape
    tau = temperature.to(student_logits)
    log_q = F.log_softmax(student_logits / tau.view(n, 1, 1), dim=-1)
    kd = (plogp - (soft * log_q).sum(dim=-1)).mean(dim=1) * tau**2
    ce = F.cross_entropy(student_logits.reshape(n * b, c), targets.reshape(n * b), reduction="none").view(n, b).mean(1)
    alpha = alpha.to(student_logits)
    return alpha * ce + (1 - alpha) * kd, {"ce": ce, "kd": kd}
