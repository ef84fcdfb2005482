"""The GPU path: skipped without CUDA (CI has none); `benchmarks/gpu_check.sh` runs it on a lent GPU.

On CUDA, fp32 convolutions may run in TF32, so CUDA results are compared with looser tolerances than the CPU tests use.
CKPTKD_TEST_DEVICE=cpu runs these tests on the CPU, to check the tests themselves where there is no GPU.
"""

import os

import pytest
import torch

from ckptkd import config, data as data_mod, distill, train
from ckptkd.teachers.forward import EnsembleForward
from ckptkd.teachers import Teacher

from conftest import tiny_config
from test_ensemble import SHAPES, one_by_one, trained_looking

CUDA = torch.device(os.environ.get("CKPTKD_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


def _digits(**data_cfg):
    return data_mod.build(config.resolve(tiny_config(data=data_cfg))["data"], CUDA)


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2", "mlp"])
def test_vmapped_ensemble_matches_one_by_one_on_cuda(name):
    kw = {"batch_norm": True} if name == "mlp" else {}
    models = [trained_looking(name, seed, **kw).to(CUDA) for seed in range(4)]
    x = torch.randn(32, *SHAPES[name], device=CUDA)
    ensemble = EnsembleForward(models, batched="auto")

    out = ensemble(x)

    assert ensemble._stacked and ensemble.fallback_reason is None  # "auto" ran the group vmapped on CUDA
    assert out.device.type == CUDA.type and out.dtype == torch.float32
    reference = one_by_one(models, [x] * 4)
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(out[0], out[1])


def test_channels_last_and_bf16_ensemble_agree_with_fp32_on_cuda():
    models = [trained_looking("resnet8", seed).to(CUDA) for seed in range(3)]
    x = torch.randn(64, 3, 16, 16, device=CUDA)
    fp32 = EnsembleForward(models, batched=True)(x)
    fast = EnsembleForward(models, batched=True, channels_last=True, autocast_dtype=torch.bfloat16)(x)

    assert fast.dtype == torch.float32  # logits leave the ensemble in fp32 whatever it computed in
    torch.testing.assert_close(fast, fp32, atol=0.15, rtol=0.05)
    assert (fast.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.9


def test_teacher_trains_in_bf16_on_cuda(tmp_path):
    run = train(tiny_config(device=str(CUDA), precision="bf16", schedule={"epochs": 6}), out=tmp_path / "t", quiet=True)
    manifest = run.manifest
    assert manifest["device"].startswith(CUDA.type) and manifest["precision"] == "bf16"
    assert manifest["status"] == "complete"
    assert manifest["final"]["val_acc"] > 0.8


def test_cached_teacher_on_cuda_equals_online_and_distills(tmp_path, teacher_run):
    data = _digits()
    teacher = Teacher.from_references([teacher_run.ref("0.3,0.5,0.7,1.0")], quiet=True, autocast="bf16")
    teacher.to(CUDA).prepare(data)
    info = teacher.attach_cache(data, views=32, cache_dir=tmp_path / "cache")
    assert info["built"] == 4 and teacher.cache.device.type == CUDA.type
    batch = next(data.train_batches(seed=1, epoch=1, batch_size=64, view_bank=teacher.view_bank))
    cached, online = teacher.logits(batch), teacher._forward(batch.x)
    torch.testing.assert_close(cached, online, atol=3e-2, rtol=1e-2)

    cfg = tiny_config(device=str(CUDA), precision="bf16", model={"name": "resnet8"}, schedule={"epochs": 4},
                      kd={"cache": "on", "cache_dir": str(tmp_path / "cache")})
    student = distill(cfg, teachers=[teacher_run.ref("0.3,0.5,0.7,1.0")], out=tmp_path / "s", quiet=True).manifest.to_dict()
    assert student["device"].startswith(CUDA.type) and student["status"] == "complete"
    assert student["teacher_ensemble"]["cache"]["reused"] + student["teacher_ensemble"]["cache"]["built"] == 4
    assert student["final"]["val_acc"] > 0.8
