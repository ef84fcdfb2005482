"""Gradient accumulation (`optim.accumulate: k`): a step computed in k pieces of `data.batch_size` equals one step of
the k-times batch — exactly in float64 for each engine, to float32 rounding for whole runs (single, KD, fused
groups), and a run with accumulation resumes bit-identically."""

import copy

import pytest
import torch

from ckptkd import config as config_mod
from ckptkd import distill, distill_fused, train
from ckptkd.data import Batch, EpochPlan
from ckptkd.errors import UserError
from ckptkd.models import create
from ckptkd.run.storage import load_tensors
from ckptkd.training.engines import FusedEngine, LoopedEngine
from ckptkd.training.objective import Objective
from ckptkd.training.recipe import make_optimizer

from conftest import tiny_config

MLP = {"name": "mlp", "widths": [24]}  # no BatchNorm: a piece's batch statistics would differ from the batch's


def _batch(members: int, size: int, generator: torch.Generator) -> Batch:
    x = torch.rand(members, size, 1, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (members, size), generator=generator)
    index = torch.arange(size).expand(members, size)
    return Batch(x, y, index, torch.zeros(members, size, 3, dtype=torch.int16))


def _engines(kind: str, members: int, cfg: dict):
    torch.manual_seed(0)
    models = [create("mlp", num_classes=10, in_channels=1, image_size=8, widths=[24]).double()
              for _ in range(members)]
    objective = Objective([None] * members, [cfg["kd"]] * members, 10, torch.device("cpu"))
    plan = EpochPlan(torch.arange(40), torch.zeros(40, 3, dtype=torch.int16), None, True)
    objective.begin_epoch([plan] * members)  # what the loop does before an epoch's steps

    def build():
        copies = [copy.deepcopy(m) for m in models]
        optimizers = [make_optimizer(cfg, m) for m in copies]
        if kind == "looped":
            return LoopedEngine(copies, optimizers, cfg, objective, torch.device("cpu"), own=members == 1), copies
        return FusedEngine(copies, optimizers, cfg, objective, torch.device("cpu")), copies

    return build(), build()


@pytest.mark.parametrize("kind, members", [("looped", 1), ("looped", 3), ("fused", 3)])
@pytest.mark.parametrize("k", [2, 4, 5])
def test_a_step_in_k_pieces_equals_one_step_of_the_whole_batch_in_float64(kind, members, k):
    """Three SGD steps with momentum on batches of 40 (5 pieces of 8, or uneven ones): the same weights, logits,
    losses to 1e-12. Dropping a piece's weight (each piece's mean counted as the batch's) breaks this by ~1e-2."""
    cfg = config_mod.resolve(tiny_config(model=MLP))
    (whole, whole_models), (pieces, piece_models) = _engines(kind, members, cfg)
    initial = copy.deepcopy(whole_models[0].state_dict())
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = _batch(members, 40, generator)
        logits_a, losses_a, _ = whole.step(batch, 0.1)
        logits_b, losses_b, _ = pieces.step(batch, 0.1, accumulate=k)
        assert torch.allclose(logits_a, logits_b, atol=1e-12, rtol=0)
        assert torch.allclose(losses_a, losses_b, atol=1e-12, rtol=0)
    for i in range(members):
        a, b = (copy.deepcopy(m) for m in (whole_models[i], piece_models[i]))
        whole.export(i, a, make_optimizer(cfg, a))
        pieces.export(i, b, make_optimizer(cfg, b))
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert (p - q).abs().max() < 1e-12, (i, name)
        if i == 0:  # the steps moved the weights: equal because equally trained, not because untouched
            assert all((p - initial[name]).abs().max() > 1e-3 for name, p in a.state_dict().items())


def _last_weights(run) -> dict:
    return load_tensors(run.path / run.manifest.checkpoints[-1].path)


def _close(a: dict, b: dict, atol: float = 2e-5) -> bool:
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_whole_runs_with_accumulation_match_the_k_times_batch(tmp_path, teacher_run):
    """Batch 16 x 4 against batch 64, for a teacher, a student distilled online from a snapshot ensemble and a fused
    group of two: the same number of steps (the schedule is per optimizer step) and the same weights to float32
    rounding."""
    base = dict(model=MLP, schedule={"epochs": 2}, checkpoints={"fractions": [1.0]})
    whole = train(tiny_config(**base, data={"batch_size": 64}), out=tmp_path / "whole", quiet=True)
    pieces = train(tiny_config(**base, data={"batch_size": 16}, optim={"accumulate": 4}), out=tmp_path / "pieces",
                   quiet=True)
    assert pieces.manifest.checkpoints[-1].step == whole.manifest.checkpoints[-1].step
    assert _close(_last_weights(whole), _last_weights(pieces))
    assert not _close(_last_weights(whole), _last_weights(train(  # 16 without accumulation: 4x the steps
        tiny_config(**base, data={"batch_size": 16}), out=tmp_path / "small", quiet=True)))

    snapshot = [f"{teacher_run.path}@0.5,1.0"]
    kd = dict(base, kd={"cache": "off"})
    a = distill(tiny_config(**kd, data={"batch_size": 64}), teachers=snapshot, out=tmp_path / "kd-whole", quiet=True)
    b = distill(tiny_config(**kd, data={"batch_size": 16}, optim={"accumulate": 4}), teachers=snapshot,
                out=tmp_path / "kd-pieces", quiet=True)
    assert _close(_last_weights(a), _last_weights(b))

    group = [f"{teacher_run.path}@0.5", None]
    fused_a = distill_fused(tiny_config(**kd, data={"batch_size": 64}), group, seeds=[0], out=tmp_path / "fa",
                            quiet=True, engine="fused")
    fused_b = distill_fused(tiny_config(**kd, data={"batch_size": 16}, optim={"accumulate": 4}), group, seeds=[0],
                            out=tmp_path / "fb", quiet=True, engine="fused")
    for x, y in zip(fused_a, fused_b):
        assert _close(_last_weights(x), _last_weights(y))


def test_accumulate_is_bounded_and_named(tmp_path):
    for value in (0, 1025, 1.5, "x"):
        with pytest.raises(UserError, match="optim.accumulate"):
            config_mod.resolve(tiny_config(optim={"accumulate": value}))
    # at its neutral value, the option is not part of a study task's identity (older studies resume)
    cfg = config_mod.resolve(tiny_config())
    assert "accumulate" not in config_mod.identity(cfg)["optim"]
    assert config_mod.identity(config_mod.resolve(tiny_config(optim={"accumulate": 2})))["optim"]["accumulate"] == 2
