"""Regression tests for ckptkd.losses against float64 references computed independently with numpy/scipy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import log_softmax, rel_entr, softmax

from ckptkd.losses import ENSEMBLE_MODES, kd_loss, kd_loss_members, kd_terms, soft_targets, teacher_probs

B, C, M = 5, 7, 3
TAU_ALPHA = [(1.0, 0.5), (4.0, 0.1), (2.5, 0.0)]
SHAPES = ("single", "tensor", "list")


def reference_terms(student, teachers, targets, tau, mode):
    """(ce, kd) with explicit loops; ``teachers`` is a float64 array [M, B, C]."""
    n_teachers, batch, _ = teachers.shape
    ce = kd = 0.0
    for b in range(batch):
        ce -= log_softmax(student[b])[targets[b]]
        q = softmax(student[b] / tau)
        per_teacher = [softmax(teachers[m, b] / tau) for m in range(n_teachers)]
        if mode == "probs":
            kl = rel_entr(sum(per_teacher) / n_teachers, q).sum()
        elif mode == "logits":
            kl = rel_entr(softmax(teachers[:, b].sum(axis=0) / n_teachers / tau), q).sum()
        else:
            kl = sum(rel_entr(p, q).sum() for p in per_teacher) / n_teachers
        kd += kl
    return ce / batch, tau**2 * kd / batch


def reference_teacher_probs(teachers, tau, mode):
    n_teachers, batch, _ = teachers.shape
    rows = []
    for b in range(batch):
        if mode == "logits":
            rows.append(softmax(teachers[:, b].mean(axis=0) / tau))
        else:
            rows.append(sum(softmax(teachers[m, b] / tau) for m in range(n_teachers)) / n_teachers)
    return np.stack(rows)


def as_teacher_input(teachers: torch.Tensor, shape: str):
    if shape == "single":
        return teachers[0]
    if shape == "tensor":
        return teachers
    return list(teachers.unbind(0))


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    student = 3 * torch.randn(B, C, generator=gen, dtype=torch.float64)
    teachers = 3 * torch.randn(M, B, C, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, C, (B,), generator=gen)
    return student, teachers, targets


@pytest.mark.parametrize("tau,alpha", TAU_ALPHA)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_matches_reference(logits, mode, shape, tau, alpha):
    student, teachers, targets = logits
    used = teachers[:1] if shape == "single" else teachers
    ce_ref, kd_ref = reference_terms(student.numpy(), used.numpy(), targets.numpy(), tau, mode)
    teacher_in = as_teacher_input(teachers, shape)

    terms = kd_terms(student, teacher_in, targets, temperature=tau, ensemble=mode)
    loss = kd_loss(student, teacher_in, targets, temperature=tau, alpha=alpha, ensemble=mode)

    assert terms["ce"].item() == pytest.approx(ce_ref, rel=1e-10, abs=1e-10)
    assert terms["kd"].item() == pytest.approx(kd_ref, rel=1e-10, abs=1e-10)
    assert loss.item() == pytest.approx(alpha * ce_ref + (1 - alpha) * kd_ref, rel=1e-10, abs=1e-10)
    assert loss.dtype == torch.float64 and loss.dim() == 0


@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_teacher_probs_matches_reference(logits, mode):
    _, teachers, _ = logits
    probs = teacher_probs(list(teachers), temperature=2.0, ensemble=mode)
    np.testing.assert_allclose(probs.numpy(), reference_teacher_probs(teachers.numpy(), 2.0, mode), rtol=1e-10)
    np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, rtol=1e-12)


def test_hand_computed_single_teacher():
    # s = (0, 0), t = (log 3, 0), tau = 1: P_T = (3/4, 1/4), P_S = (1/2, 1/2), y = 0.
    # CE = log 2, KL = 3/4 log 3 - log 2, so 0.5 * CE + 0.5 * KL = 3/8 log 3.
    student = torch.zeros(1, 2, dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    for mode in ENSEMBLE_MODES:
        loss = kd_loss(student, teacher, torch.tensor([0]), temperature=1.0, alpha=0.5, ensemble=mode)
        assert loss.item() == pytest.approx(3 / 8 * math.log(3.0), rel=1e-12)


def test_hand_computed_two_teachers():
    # s = (0, 0), y = 0, tau = 2, alpha = 1/4; teachers (2 log 3, 0) and (0, 0).
    # Per-teacher soft targets: (3/4, 1/4) and (1/2, 1/2); KL(p || uniform) = log 2 + sum p log p.
    student = torch.zeros(1, 2, dtype=torch.float64)
    teachers = torch.tensor([[[2 * math.log(3.0), 0.0]], [[0.0, 0.0]]], dtype=torch.float64)

    def kl_to_uniform(p0):
        return math.log(2.0) + p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)

    sqrt3 = math.sqrt(3.0)
    kl = {
        "probs": kl_to_uniform(5 / 8),
        "logits": kl_to_uniform(sqrt3 / (1 + sqrt3)),
        "per_teacher": (kl_to_uniform(3 / 4) + 0.0) / 2,
    }
    for mode in ENSEMBLE_MODES:
        loss = kd_loss(student, teachers, torch.tensor([0]), temperature=2.0, alpha=0.25, ensemble=mode)
        assert loss.item() == pytest.approx(0.25 * math.log(2.0) + 0.75 * 4.0 * kl[mode], rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_single_teacher_modes_agree(logits, shape):
    student, teachers, targets = logits
    one = teachers[:1]
    teacher_in = {"single": one[0], "tensor": one, "list": [one[0]]}[shape]
    values = [
        kd_loss(student, teacher_in, targets, temperature=3.0, alpha=0.3, ensemble=mode).item()
        for mode in ENSEMBLE_MODES
    ]
    assert values == pytest.approx([values[0]] * 3, rel=1e-14)


def test_alpha_one_is_cross_entropy(logits):
    student, teachers, targets = logits
    expected = F.cross_entropy(student, targets)
    assert torch.equal(kd_loss(student, None, targets, temperature=4.0, alpha=1.0), expected)
    assert torch.equal(kd_loss(student, teachers, targets, temperature=4.0, alpha=1.0), expected)


def test_alpha_one_with_terms_is_the_cross_entropy_term_alone(logits):
    """The loop logs the terms kd_loss returns: with alpha == 1 there is a CE term and no KD term."""
    student, _, targets = logits
    loss, terms = kd_loss(student, None, targets, temperature=4.0, alpha=1.0, return_terms=True)
    assert torch.equal(loss, F.cross_entropy(student, targets)) and terms.keys() == {"ce"}
    assert torch.equal(terms["ce"], loss)


def test_the_default_ensemble_is_the_mean_of_probabilities(logits):
    """"probs" (the paper's formula) is the default of every entry point."""
    student, teachers, targets = logits
    probs = {"temperature": 3.0, "ensemble": "probs"}
    assert torch.equal(teacher_probs(teachers, temperature=3.0), teacher_probs(teachers, **probs))
    assert kd_terms(student, teachers, targets, temperature=3.0) == kd_terms(student, teachers, targets, **probs)
    default, paper = soft_targets(teachers, temperature=3.0), soft_targets(teachers, **probs)
    assert all(torch.equal(a, b) for a, b in zip(default, paper))
    assert not torch.equal(teacher_probs(teachers, temperature=3.0, ensemble="logits"), paper[0])


def test_teacher_logits_are_moved_to_the_students_device():
    """A teacher's logits on the CPU (a cache) with the student elsewhere: the meta device stands in for a GPU."""
    student = torch.zeros(B, C, device="meta")
    targets = torch.zeros(B, dtype=torch.long, device="meta")
    for teachers in (torch.zeros(M, B, C), [torch.zeros(B, C, dtype=torch.float16)] * 2):
        for mode in ENSEMBLE_MODES:
            terms = kd_terms(student, teachers, targets, temperature=2.0, ensemble=mode)
            assert terms["kd"].device.type == "meta" and terms["kd"].dtype == torch.float32


@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_soft_targets_of_a_masked_teacher_class_give_kd_loss(mode):
    """soft_targets' sum of P log P counts 0 log 0 as 0 (a -inf teacher logit), so kd_loss_members still equals
    kd_loss for such a teacher."""
    student = torch.tensor([[[0.3, -0.2, 0.5], [1.0, 0.0, -1.0]]], dtype=torch.float64)
    teachers = torch.tensor(
        [[[0.0, 1.0, -math.inf], [2.0, -math.inf, 0.5]], [[0.4, 0.2, -math.inf], [1.0, -math.inf, -0.5]]],
        dtype=torch.float64,
    )
    targets = torch.tensor([[0, 2]])
    soft, plogp = soft_targets(teachers, temperature=1.5, ensemble=mode)
    assert torch.isfinite(plogp).all()
    losses, terms = kd_loss_members(student, targets, soft=soft[None], plogp=plogp[None],
                                    temperature=torch.tensor([1.5]), alpha=torch.tensor([0.25]))
    loss, own = kd_loss(student[0], teachers, targets[0], temperature=1.5, alpha=0.25, ensemble=mode,
                        return_terms=True)
    assert terms["kd"][0].item() == pytest.approx(own["kd"].item(), rel=1e-6)
    assert losses[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_kd_loss_members_computes_in_the_students_dtype_and_device():
    """Per-member temperatures and alphas arrive as CPU tensors of any float type; the losses are computed where
    the students' logits are, in their dtype (the meta device stands in for a GPU)."""
    n, b, c = 2, 3, 4
    for device in ("cpu", "meta"):
        logits = torch.zeros(n, b, c, device=device)
        soft = torch.full((n, b, c), 1 / c, device=device)
        losses, terms = kd_loss_members(logits, torch.zeros(n, b, dtype=torch.long, device=device), soft=soft,
                                        plogp=torch.zeros(n, b, device=device),
                                        temperature=torch.tensor([2.0, 4.0], dtype=torch.float64),
                                        alpha=torch.tensor([0.5, 1.0], dtype=torch.float64))
        for value in (losses, terms["ce"], terms["kd"]):
            assert value.dtype == torch.float32 and value.device.type == device and value.shape == (n,)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_alpha_zero_teacher_equal_student_is_zero(logits, mode, shape):
    student, _, targets = logits
    copies = student.expand(M, B, C).clone()
    loss = kd_loss(student, as_teacher_input(copies, shape), targets, temperature=2.0, alpha=0.0, ensemble=mode)
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_no_gradient_reaches_teachers(logits, mode, shape):
    student, teachers, targets = logits
    grads = []
    for requires_grad in (False, True):
        s = student.clone().requires_grad_()
        t = teachers.clone().requires_grad_(requires_grad)
        kd_loss(s, as_teacher_input(t, shape), targets, temperature=3.0, alpha=0.2, ensemble=mode).backward()
        assert t.grad is None
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_gradcheck(logits, mode):
    student, teachers, targets = logits
    s = student.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, teachers, targets, temperature=2.0, alpha=0.3, ensemble=mode), (s,)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_extreme_logits_are_finite(mode, dtype):
    gen = torch.Generator().manual_seed(1)
    student = (1e4 * torch.randn(B, C, generator=gen)).to(dtype).requires_grad_()
    teachers = (1e4 * torch.randn(M, B, C, generator=gen)).to(dtype)
    targets = torch.randint(0, C, (B,), generator=gen)
    assert (torch.softmax(teachers, dim=-1) == 0).any()

    loss = kd_loss(student, teachers, targets, temperature=1.0, alpha=0.5, ensemble=mode)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()

    same = kd_loss(student, student.detach(), targets, temperature=1.0, alpha=0.0, ensemble=mode)
    assert same.item() == 0.0


@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_masked_teacher_class_contributes_zero(mode):
    # A -inf teacher logit gives a soft-target probability of exactly 0, and 0 * log 0 counts as 0.
    student = torch.tensor([[0.3, -0.2, 0.5], [1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    teachers = torch.tensor(
        [[[0.0, 1.0, -math.inf], [2.0, -math.inf, 0.5]], [[0.4, 0.2, -math.inf], [1.0, -math.inf, -0.5]]],
        dtype=torch.float64,
    )
    targets = torch.tensor([0, 2])
    _, kd_ref = reference_terms(student.detach().numpy(), teachers.numpy(), targets.numpy(), 1.5, mode)
    kd = kd_terms(student, teachers, targets, temperature=1.5, ensemble=mode)["kd"]
    kd.backward()
    assert kd.item() == pytest.approx(kd_ref, rel=1e-10)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_float16_teacher_with_float32_student(logits, mode):
    student, teachers, targets = logits
    student32 = student.float().requires_grad_()
    teachers16 = teachers.half()
    loss = kd_loss(student32, teachers16, targets, temperature=2.0, alpha=0.5, ensemble=mode)
    loss.backward()
    assert loss.dtype == torch.float32
    options = {"temperature": 2.0, "alpha": 0.5, "ensemble": mode}
    assert torch.equal(loss, kd_loss(student32, teachers16.float(), targets, **options))
    mixed = kd_loss(student32, [teachers16[0], teachers[1], teachers16[2]], targets, **options)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)

    ce_ref, kd_ref = reference_terms(
        student32.detach().double().numpy(), teachers16.double().numpy(), targets.numpy(), 2.0, mode
    )
    assert loss.item() == pytest.approx(0.5 * ce_ref + 0.5 * kd_ref, rel=1e-5)
    assert torch.isfinite(student32.grad).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"ensemble": "mean"}, "ensemble"),
        ({"teacher_logits": None}, "teacher_logits is required"),
        ({"teacher_logits": []}, "empty"),
        ({"teacher_logits": torch.zeros(B, C + 1)}, r"\(1, 5, 8\).*\(5, 7\)"),
        ({"teacher_logits": torch.zeros(M, B + 1, C)}, r"\(3, 6, 7\).*\(5, 7\)"),
        ({"teacher_logits": [torch.zeros(B, C), torch.zeros(B, C - 1)]}, "shapes differ"),
        ({"teacher_logits": torch.zeros(2, M, B, C)}, "got shape"),
        ({"teacher_logits": torch.zeros(C)}, "got shape"),
        ({"student_logits": torch.zeros(C)}, "student_logits"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {
        "student_logits": torch.zeros(B, C),
        "teacher_logits": torch.zeros(M, B, C),
        "targets": torch.zeros(B, dtype=torch.long),
        "temperature": 2.0,
        "alpha": 0.5,
        "ensemble": "probs",
    } | kwargs
    with pytest.raises(ValueError, match=match):
        kd_loss(**args)


def test_bad_arguments_teacher_probs():
    with pytest.raises(ValueError, match="temperature"):
        teacher_probs(torch.zeros(B, C), temperature=0.0)
    with pytest.raises(ValueError, match="ensemble"):
        teacher_probs(torch.zeros(B, C), temperature=1.0, ensemble="median")
