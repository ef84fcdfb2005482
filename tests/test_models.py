import pytest
import torch
from torch import nn

from ckptkd import models
from ckptkd.errors import UserError


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [
        # RepDistiller's published counts at 100 classes (our ResNets and WRNs are theirs, conv shortcuts included);
        # tests/test_zoo.py checks every zoo model against the exact count of the reference code.
        ("resnet32", 0.47e6),
        ("resnet110", 1.74e6),
        ("wrn_40_2", 2.26e6),
        ("wrn_40_1", 0.57e6),
    ],
)
def test_parameter_counts(name, expected):
    count = n_params(models.create(name, num_classes=100))
    assert abs(count - expected) <= 0.01 * expected, count


def test_mobilenetv2_width():
    full = models.create("mobilenetv2", num_classes=100)
    three_quarters = models.create("mobilenetv2_075", num_classes=100)
    assert full.feature_dim == three_quarters.feature_dim == 1280
    assert n_params(three_quarters) < n_params(full)
    wide = models.create("mobilenetv2", num_classes=100, width_mult=1.5)
    assert wide.feature_dim == 1920


def test_available_lists_builtins_sorted():
    names = models.available()
    assert names == sorted(names)
    for name in ["lenet5", "mlp", "mobilenetv2", "mobilenetv2_075", "mobile_half", "MobileNetV2", "resnet8",
                 "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
                 "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_28_10", "vgg8", "vgg11", "vgg13", "vgg16",
                 "vgg19", "ShuffleV1", "ShuffleV2", "ResNet50"]:
        assert name in names


@pytest.mark.parametrize("name", models.available())
@pytest.mark.parametrize("in_channels, size", [(1, 8), (1, 28), (3, 32)])
def test_builtin_shapes_and_features(name, in_channels, size):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_channels=in_channels, image_size=(size, size)).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        assert logits.shape == (2, 10)
        assert features.shape == (2, model.feature_dim)
        assert isinstance(model.classifier, nn.Linear)
        assert torch.allclose(model.classifier(features), logits, atol=1e-6)


def test_wrn_pattern_and_bad_depth():
    model = models.create("wrn_22_3", num_classes=5, dropout=0.3)
    assert model.feature_dim == 64 * 3
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    assert models.accepted_kwargs("wrn_22_3") == {"dropout"}
    with pytest.raises(UserError, match="wrn_41_2"):
        models.create("wrn_41_2", num_classes=10)


def test_mlp_kwargs_and_missing_size():
    model = models.create(
        "mlp", num_classes=3, in_channels=1, image_size=8, widths=[32], dropout=0.1, batch_norm=True
    )
    assert model.feature_dim == 32
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 3)
    assert models.accepted_kwargs("mlp") == {"widths", "dropout", "batch_norm"}
    with pytest.raises(UserError, match="'mlp' needs the input size"):
        models.create("mlp", num_classes=10)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Lets a test register models without leaving them behind for other tests."""
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))


def test_user_module_does_not_receive_image_size(scratch_registry):
    @models.register("user_net")
    class UserNet(nn.Module):
        def __init__(self, num_classes, in_channels):
            super().__init__()
            self.fc = nn.Linear(in_channels, num_classes)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3)))

    model = models.create("user_net", num_classes=4, in_channels=2, image_size=(8, 8))
    assert isinstance(model, UserNet)
    assert model(torch.randn(3, 2, 8, 8)).shape == (3, 4)
    assert "user_net" in models.available()
    assert models.accepted_kwargs("user_net") == set()


def test_user_factory_with_var_kwargs(scratch_registry):
    @models.register("user_factory")
    def user_factory(num_classes, in_channels=3, **kwargs):
        return nn.Linear(in_channels, num_classes, **kwargs)

    assert models.accepted_kwargs("user_factory") is None
    assert models.create("user_factory", num_classes=2, bias=False).bias is None


def test_duplicate_registration_raises(scratch_registry):
    with pytest.raises(ValueError, match="resnet8"):
        models.register("resnet8")(nn.Linear)


def test_unknown_name_raises():
    with pytest.raises(UserError, match=r"unknown model 'resnt8' \(available: .*resnet8"):
        models.create("resnt8", num_classes=10)
    with pytest.raises(UserError, match="resnt8"):
        models.accepted_kwargs("resnt8")


def test_unknown_kwarg_raises():
    with pytest.raises(UserError, match="model 'resnet8' does not take 'foo'"):
        models.create("resnet8", num_classes=10, foo=1)
    with pytest.raises(UserError, match=r"does not take 'width'.*width_mult"):
        models.create("mobilenetv2", num_classes=10, width=2)


def test_bad_image_size_raises():
    with pytest.raises(UserError, match="image_size"):
        models.create("mlp", num_classes=10, image_size=(8, 8, 8))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "mobilenetv2_075", "lenet5"])
def test_seeded_creation_is_deterministic(name):
    torch.manual_seed(0)
    first = models.create(name, num_classes=10).state_dict()
    torch.manual_seed(0)
    second = models.create(name, num_classes=10).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
