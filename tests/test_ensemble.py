import pytest
import torch
from torch import nn

from ckptkd.teachers.forward import EnsembleForward, fold_batchnorm
from ckptkd.models import create

SHAPES = {"resnet8": (3, 16, 16), "mobilenetv2": (3, 16, 16), "lenet5": (1, 8, 8), "mlp": (1, 8, 8)}


def trained_looking(name: str, seed: int, **kw) -> nn.Module:
    """Random weights plus non-trivial BatchNorm statistics from a few train-mode forwards, then frozen."""
    torch.manual_seed(seed)
    channels, height, _ = SHAPES[name]
    model = create(name, num_classes=10, in_channels=channels, image_size=height, **kw)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *SHAPES[name]) * 2 + 0.5)
    return model.eval().requires_grad_(False)


def one_by_one(models, xs):
    with torch.no_grad():
        return torch.stack([m(x) for m, x in zip(models, xs)])


def buffers(models):
    return [{k: v.clone() for k, v in m.named_buffers()} for m in models]


@pytest.mark.parametrize("name,kw", [("resnet8", {}), ("lenet5", {}), ("mlp", {"batch_norm": True}),
                                     ("mobilenetv2", {})], ids=["resnet8", "lenet5", "mlp_bn", "mobilenetv2"])
def test_batched_matches_one_by_one(name, kw):
    models = [trained_looking(name, seed, **kw) for seed in range(4)]
    x = torch.randn(5, *SHAPES[name])
    before = buffers(models)
    ensemble = EnsembleForward(models, batched=True)

    out = ensemble(x)

    assert ensemble.groups == [[0, 1, 2, 3]]
    assert ensemble.fallback_reason is None
    assert out.shape == (4, 5, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out, one_by_one(models, [x] * 4), atol=1e-5, rtol=0)
    # Different weights give different logits, so the order check above means something.
    assert not torch.allclose(out[0], out[1])
    for saved, model in zip(before, models):
        assert not model.training
        for key, value in model.named_buffers():
            assert torch.equal(value, saved[key]), key
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_output_is_a_normal_constant_tensor():
    models = [trained_looking("lenet5", seed) for seed in range(2)]
    out = EnsembleForward(models, batched=True)(torch.randn(3, 1, 8, 8))

    assert not out.is_inference()
    assert not out.requires_grad
    student = torch.randn(3, 10, requires_grad=True)
    (student * out.mean(0)).sum().backward()
    assert torch.equal(student.grad, out.mean(0))


def test_mixed_architectures_are_grouped_and_kept_in_order():
    torch.manual_seed(2)
    lenet = create("lenet5", num_classes=10, in_channels=3).eval().requires_grad_(False)
    models = [trained_looking("resnet8", 0), trained_looking("resnet8", 1), lenet, trained_looking("resnet8", 3)]
    x = torch.randn(4, 3, 16, 16)
    ensemble = EnsembleForward(models, batched=True)

    out = ensemble(x)

    assert ensemble.groups == [[0, 1, 3], [2]]
    torch.testing.assert_close(out, one_by_one(models, [x] * 4), atol=1e-5, rtol=0)


def test_same_class_with_different_config_is_not_grouped():
    narrow = [trained_looking("mlp", s, widths=(32,)) for s in range(2)]
    wide = trained_looking("mlp", 2, widths=(64,))
    with_dropout = trained_looking("mlp", 3, widths=(32,), dropout=0.1)
    assert EnsembleForward([*narrow, wide, with_dropout]).groups == [[0, 1], [2], [3]]


def test_each_model_gets_its_own_input():
    models = [trained_looking("resnet8", seed) for seed in range(3)]
    xs = [torch.randn(4, 3, 16, 16) * (i + 1) for i in range(3)]
    ensemble = EnsembleForward(models, batched=True)

    out = ensemble(xs)

    torch.testing.assert_close(out, one_by_one(models, xs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 inputs for 3 models"):
        ensemble(xs[:2])

    # Inputs of different sizes cannot be stacked, so that call runs the models one by one.
    sizes = [xs[0], xs[1][:, :, :8, :8], xs[2]]
    torch.testing.assert_close(ensemble(sizes), one_by_one(models, sizes), atol=1e-5, rtol=0)
    assert ensemble.fallback_reason is None


class ItemControlFlow(nn.Module):
    """A model vmap cannot batch: its Python control flow reads a tensor value."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        h = self.linear(x)
        return h if h.sum().item() > 0 else -h


def test_vmap_failure_falls_back_to_the_loop_once():
    torch.manual_seed(0)
    models = [ItemControlFlow().eval().requires_grad_(False) for _ in range(3)]
    x = torch.randn(2, 4)
    ensemble = EnsembleForward(models, batched=True)

    out = ensemble(x)

    assert "ItemControlFlow" in ensemble.fallback_reason
    torch.testing.assert_close(out, one_by_one(models, [x] * 3), atol=0, rtol=0)
    reason = ensemble.fallback_reason
    ensemble(x)
    assert ensemble.fallback_reason == reason


def test_input_errors_propagate_and_do_not_disable_batching():
    models = [trained_looking("lenet5", seed) for seed in range(2)]
    ensemble = EnsembleForward(models, batched=True)
    with pytest.raises(RuntimeError):
        ensemble(torch.randn(2, 3, 8, 8))  # 3 channels into a 1-channel model
    assert ensemble.fallback_reason is None
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(ensemble(x), one_by_one(models, [x] * 2), atol=1e-5, rtol=0)


def test_auto_loops_on_cpu_and_matches():
    models = [trained_looking("lenet5", seed) for seed in range(2)]
    ensemble = EnsembleForward(models)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(ensemble(x), one_by_one(models, [x] * 2), atol=1e-5, rtol=0)
    assert ensemble._stacked == {}  # the loop never stacks weights


def test_channels_last_and_bf16_autocast_work_on_cpu():
    models = [trained_looking("resnet8", seed) for seed in range(2)]
    x = torch.randn(4, 3, 16, 16)
    reference = one_by_one(models, [x] * 2)

    channels_last = EnsembleForward(models, batched=True, channels_last=True)
    torch.testing.assert_close(channels_last(x), reference, atol=1e-4, rtol=1e-4)
    assert models[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)

    bf16 = EnsembleForward(models, batched=True, autocast_dtype=torch.bfloat16)(x)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, reference, atol=0.1, rtol=0.05)


def test_to_restacks_weights():
    models = [trained_looking("lenet5", seed) for seed in range(2)]
    ensemble = EnsembleForward(models, batched=True)
    x = torch.randn(2, 1, 8, 8)
    ensemble(x)
    assert ensemble.to("cpu") is ensemble
    assert ensemble._stacked == {}
    torch.testing.assert_close(ensemble(x), one_by_one(models, [x] * 2), atol=1e-5, rtol=0)


# resnet8: the stem, 2 per block x 3 blocks and the 2 downsample shortcuts; every BatchNorm of the network.
@pytest.mark.parametrize("name,kw,folded", [("resnet8", {}, 9), ("mobilenetv2", {}, 53), ("lenet5", {}, 0)],
                         ids=["resnet8", "mobilenetv2", "lenet5"])
def test_folding_batchnorm_keeps_outputs_and_removes_the_layers(name, kw, folded):
    model = trained_looking(name, 0, **kw)
    x = torch.randn(8, *SHAPES[name])
    with torch.no_grad():
        reference = model(x)
        assert fold_batchnorm(model) == folded
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) or name == "lenet5"


def test_folding_skips_a_batchnorm_whose_conv_output_is_also_used_elsewhere():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding bn into conv would change the second use of y

    model = Branchy().eval()
    model.bn.running_mean.fill_(0.5)
    x = torch.randn(2, 2, 4, 4)
    reference = model(x)
    assert fold_batchnorm(model) == 0
    assert torch.equal(model(x), reference)
