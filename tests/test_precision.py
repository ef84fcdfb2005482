"""`precision: fp16` for any run (students included): the forward under float16 autocast and a gradient scaler per
run, whose state (scale, growth tracker) travels in the resume state; never fused (one run's overflow must not skip
another's step). Runs on the CPU's float16 autocast here; `benchmarks/gpu_check.sh` runs the same on CUDA."""

import copy

import pytest
import torch

from ckptkd import config as config_mod
from ckptkd import distill_fused, train
from ckptkd.data import Batch, EpochPlan
from ckptkd.errors import UserError
from ckptkd.models import create
from ckptkd.run.state import load_state
from ckptkd.run.storage import load_tensors
from ckptkd.training.engines import LoopedEngine, choose_engine
from ckptkd.training.objective import Objective
from ckptkd.training.recipe import make_optimizer

from conftest import tiny_config

MLP = {"name": "mlp", "widths": [24]}


def _weights(run) -> dict:
    return load_tensors(run.path / run.manifest.checkpoints[-1].path)


def test_an_fp16_run_scales_its_loss_and_keeps_the_scale_in_its_resume_state(tmp_path):
    """Every step went through the scaler (its growth tracker counts the finite steps), the gradients were unscaled
    before the update (the weights stay near the float32 run's: scaled gradients would be 65,536 times too large),
    and the run learns."""
    cfg = tiny_config(model=MLP, schedule={"epochs": 3}, checkpoints={"fractions": [1.0]})
    half = train({**cfg, "precision": "fp16"}, out=tmp_path / "fp16", quiet=True)
    full = train(cfg, out=tmp_path / "fp32", quiet=True)
    steps = half.manifest.checkpoints[-1].step
    model = create("mlp", num_classes=10, in_channels=1, image_size=8, widths=[24])
    progress = load_state(half.path / "state" / "last.safetensors", model, make_optimizer(
        config_mod.resolve(cfg), model))
    assert progress.loss_scale["scale"] == 2.0 ** 16 and progress.loss_scale["_growth_tracker"] == steps
    assert half.manifest.to_dict()["precision"] == "fp16"
    a, b = _weights(half), _weights(full)
    assert all(torch.allclose(a[k], b[k], atol=5e-2, rtol=0) for k in a)  # 0.02 apart after 3 epochs here
    assert any(not torch.equal(a[k], b[k]) for k in a)  # float16 did compute something
    assert half.manifest.final.test_acc > 0.8


def test_a_step_whose_gradients_overflow_is_skipped_and_the_scale_halves():
    cfg = config_mod.resolve(tiny_config(model=MLP, precision="fp16"))
    torch.manual_seed(0)
    model = create("mlp", num_classes=10, in_channels=1, image_size=8, widths=[24])
    objective = Objective([None], [cfg["kd"]], 10, torch.device("cpu"))
    objective.begin_epoch([EpochPlan(torch.arange(16), torch.zeros(16, 3, dtype=torch.int16), None, True)])
    huge = {"scale": 3e38, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
            "_growth_tracker": 7}
    engine = LoopedEngine([model], [make_optimizer(cfg, model)], cfg, objective, torch.device("cpu"), own=True,
                          loss_scales=[huge])
    generator = torch.Generator().manual_seed(0)
    batch = Batch(torch.rand(1, 16, 1, 8, 8, generator=generator), torch.randint(0, 10, (1, 16), generator=generator),
                  torch.arange(16)[None], torch.zeros(1, 16, 3, dtype=torch.int16))
    before = copy.deepcopy(model.state_dict())
    engine.step(batch, 0.1, torch.float16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # skipped
    assert engine.loss_scale(0)["scale"] == pytest.approx(1.5e38) and engine.loss_scale(0)["_growth_tracker"] == 0
    for _ in range(200):  # halving until the scaled gradients are finite; then the steps are taken
        engine.step(batch, 0.1, torch.float16)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp16_runs_are_never_fused(tmp_path, teacher_run):
    model = create("mlp", num_classes=10, in_channels=1, image_size=8, widths=[24])
    spec = {"name": "mlp", "num_classes": 10, "in_channels": 1, "image_size": [8, 8], "kwargs": {"widths": [24]}}
    assert choose_engine(model, spec, torch.device("cpu"), "auto", "fp16")[0] == "looped"
    assert choose_engine(model, spec, torch.device("cpu"), "auto", "fp32")[0] == "fused"
    with pytest.raises(UserError, match="precision fp16 runs cannot be fused"):
        choose_engine(model, spec, torch.device("cpu"), "fused", "fp16")
    runs = distill_fused(tiny_config(model=MLP, precision="fp16", schedule={"epochs": 1}), [f"{teacher_run.path}@0.5"],
                         seeds=[0, 1], out=tmp_path / "group", quiet=True)
    assert [r.manifest.fused["engine"] for r in runs] == ["looped", "looped"]
    with pytest.raises(UserError, match="precision must be one of"):
        config_mod.resolve(tiny_config(precision="fp8"))


def test_deterministic_kernels_hold_for_the_run_and_the_process_settings_come_back_after(tmp_path):
    import os

    from ckptkd.training.loop import Member, fit_one

    def settings():
        return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))

    before = settings()
    assert before[0] is False
    seen = []
    cfg = config_mod.resolve(tiny_config(model=MLP, deterministic=True, schedule={"epochs": 2}))
    fit_one(Member(cfg, tmp_path / "on"), quiet=True, on_epoch=lambda _e: seen.append(settings()))
    assert seen == [(True, False, True, os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))] * 2
    assert settings() == before
    fit_one(Member(config_mod.resolve(tiny_config(model=MLP, schedule={"epochs": 1})), tmp_path / "off"), quiet=True,
            on_epoch=lambda _e: seen.append(settings()))
    assert seen[-1] == before
    # at its neutral value it is not part of a study task's identity; on, it is
    assert "deterministic" not in config_mod.identity(config_mod.resolve(tiny_config()))
    assert config_mod.identity(cfg)["deterministic"] is True


def test_compile_runs_the_training_forward_through_torch_compile_and_falls_back_in_one_line(tmp_path, monkeypatch,
                                                                                           capsys):
    """`compile: eager` (Dynamo's tracing without a compiler, exact) gives the uncompiled run's weights bit for bit,
    through torch.compile; a compiler that fails is noted once and the run continues uncompiled, losing nothing.
    (`compile: true`, inductor, needs a C++ compiler and ~20 s here; benchmarks/gpu_check.sh runs it on CUDA.)"""
    base = tiny_config(model=MLP, schedule={"epochs": 2}, checkpoints={"fractions": [1.0]})
    plain = _weights(train(base, out=tmp_path / "plain", quiet=True))
    real_compile, calls = torch.compile, []

    def spy(module, **kwargs):
        calls.append((type(module).__name__, kwargs))
        return real_compile(module, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    traced = _weights(train({**base, "compile": "eager"}, out=tmp_path / "eager", quiet=True))
    assert calls == [("MLP", {"backend": "eager"})]
    assert all(torch.equal(plain[k], traced[k]) for k in plain)

    class Broken:
        def __call__(self, x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: Broken())
    capsys.readouterr()
    fallen = _weights(train({**base, "compile": True}, out=tmp_path / "fallen", quiet=True))
    err = capsys.readouterr().err
    assert err.count("compile: torch.compile (backend inductor) failed (InvalidCxxCompiler") == 1
    assert "training continues without it" in err
    assert all(torch.equal(plain[k], fallen[k]) for k in plain)
    monkeypatch.setattr(torch, "compile", spy)  # a fused group compiles its one wide model
    group = tiny_config(model=MLP, schedule={"epochs": 1}, compile="eager")
    runs = distill_fused(group, [None], seeds=[0, 1], out=tmp_path / "group", quiet=True, engine="fused")
    assert calls[-1] == ("FusedModel", {"backend": "eager"}) and all(r.manifest.complete for r in runs)
    with pytest.raises(UserError, match="compile must be true, false or a torch.compile backend"):
        config_mod.resolve(tiny_config(compile="fast"))
    assert "compile" not in config_mod.identity(config_mod.resolve(base))
    from ckptkd import errors

    calls.clear()  # CUDA graphs off a GPU: not compiled at all (torch would warn for every graph), said once
    capsys.readouterr()
    errors._noted.clear()  # notes are said once per process
    graphs = _weights(train({**base, "compile": "cudagraphs"}, out=tmp_path / "graphs", quiet=True))
    assert calls == [] and all(torch.equal(plain[k], graphs[k]) for k in plain)
    assert capsys.readouterr().err.count("cudagraphs backend needs a CUDA device") == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_student_computes_at_its_precision_under_its_teacher(tmp_path, teacher_run, monkeypatch, precision):
    """A distilled student's training forward runs under the run's autocast dtype (its linear layers' outputs are
    bf16 / fp16 while it trains), its loss stays float32, and the manifest says so."""
    from ckptkd import distill

    seen = []
    real_linear = torch.nn.Linear.forward

    def recording(self, x):
        out = real_linear(self, x)
        if self.training:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    cfg = tiny_config(model=MLP, precision=precision, schedule={"epochs": 1}, checkpoints={"fractions": [1.0]},
                      kd={"temperature": 4.0, "alpha": 0.5, "cache": "off"})
    run = distill(cfg, [teacher_run.ref("0.5")], out=tmp_path / "s", quiet=True)
    wanted = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen and set(seen) == {wanted}
    assert run.manifest.precision == precision
    assert torch.isfinite(torch.tensor(run.manifest.checkpoints[-1].metrics["train_loss"]))
