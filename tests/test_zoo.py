"""The CIFAR distillation zoo against RepDistiller / mdistiller (HobbitLong/RepDistiller `models/`,
megvii-research/mdistiller `mdistiller/models/cifar/`, identical in names and shapes).

The expected state-dict keys below are written from reading the reference model code, not from our models, so a
released RepDistiller/mdistiller teacher checkpoint loads into ours with `load_state_dict(sd, strict=True)`.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ckptkd import models
from ckptkd.models.shufflenet import channel_shuffle


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# (name, parameters of the reference model built by the reference code, published count or None).
# Reference counts: RepDistiller's models/ at commit b84f547 (mdistiller's are the same networks), each built as its
# `model_dict[name](num_classes=100)` builds it and counted with sum(p.numel() for p in model.parameters()).
# Published: the RepDistiller/CRD table of CIFAR-100 models (in millions, rounded to 0.01M).
COUNTS = [
    ("resnet8", 83_892, None),
    ("resnet14", 181_108, None),
    ("resnet20", 278_324, 0.28e6),
    ("resnet32", 472_756, 0.47e6),
    ("resnet44", 667_188, None),
    ("resnet56", 861_620, 0.86e6),
    ("resnet110", 1_736_564, 1.74e6),
    ("resnet8x4", 1_233_540, 1.23e6),
    ("resnet32x4", 7_433_860, 7.43e6),
    ("wrn_16_1", 180_916, 0.18e6),
    ("wrn_16_2", 703_284, 0.70e6),
    ("wrn_40_1", 569_780, 0.57e6),
    ("wrn_40_2", 2_255_156, 2.26e6),
    ("vgg8", 3_965_028, 3.97e6),
    ("vgg11", 9_277_284, None),
    ("vgg13", 9_462_180, 9.46e6),
    ("vgg16", 14_774_436, None),
    ("vgg19", 20_086_692, None),
    ("MobileNetV2", 812_836, 0.81e6),  # = mobile_half, MobileNetV2 at width 0.5
    ("mobile_half", 812_836, 0.81e6),
    ("ShuffleV1", 949_258, 0.95e6),
    ("ShuffleV2", 1_355_528, 1.36e6),
    ("ResNet50", 23_705_252, None),
    ("ResNet18", 11_220_132, None),  # the released CheckpointKD code's resnet18/34 (models/resnet_bottleneck.py)
    ("ResNet34", 21_328_292, None),
]


@pytest.mark.parametrize("name, reference, published", COUNTS, ids=[c[0] for c in COUNTS])
def test_parameter_counts_match_the_reference(name, reference, published):
    count = n_params(models.create(name, num_classes=100))
    assert count == reference
    if published is not None:
        assert abs(count - published) <= 0.01 * published, count


# ---- The reference's state-dict keys, family by family, written from its model code ----------------------------


def conv(name, out, inp, k):
    return [(f"{name}.weight", (out, inp, k, k))]


def bn(name, c):
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,)), (f"{name}.running_mean", (c,)),
            (f"{name}.running_var", (c,)), (f"{name}.num_batches_tracked", ())]


def linear(name, out, inp):
    return [(f"{name}.weight", (out, inp)), (f"{name}.bias", (out,))]


def resnet_keys(depth, filters, classes):
    """models/resnet.py: conv1, bn1, layer1-3 of BasicBlocks (conv1, bn1, conv2, bn2, and where the shape changes
    `downsample` = Sequential(conv1x1, BN)), fc. Stage strides 1, 2, 2; `inplanes` starts at filters[0]."""
    n = (depth - 2) // 6
    keys = conv("conv1", filters[0], 3, 3) + bn("bn1", filters[0])
    inplanes = filters[0]
    for stage, (planes, stride) in enumerate(zip(filters[1:], (1, 2, 2)), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            keys += conv(f"{p}.conv1", planes, inplanes, 3) + bn(f"{p}.bn1", planes)
            keys += conv(f"{p}.conv2", planes, planes, 3) + bn(f"{p}.bn2", planes)
            if i == 0 and (stride != 1 or inplanes != planes):
                keys += conv(f"{p}.downsample.0", planes, inplanes, 1) + bn(f"{p}.downsample.1", planes)
            inplanes = planes
    return keys + linear("fc", classes, filters[3])


# resnet8x4 spelled out in full (62 keys), as a check on resnet_keys itself: filters 32, 64, 128, 256, one block per
# stage, and every first block changes the width, so all three have a downsample.
RESNET8X4 = (
    conv("conv1", 32, 3, 3) + bn("bn1", 32)
    + conv("layer1.0.conv1", 64, 32, 3) + bn("layer1.0.bn1", 64) + conv("layer1.0.conv2", 64, 64, 3)
    + bn("layer1.0.bn2", 64) + conv("layer1.0.downsample.0", 64, 32, 1) + bn("layer1.0.downsample.1", 64)
    + conv("layer2.0.conv1", 128, 64, 3) + bn("layer2.0.bn1", 128) + conv("layer2.0.conv2", 128, 128, 3)
    + bn("layer2.0.bn2", 128) + conv("layer2.0.downsample.0", 128, 64, 1) + bn("layer2.0.downsample.1", 128)
    + conv("layer3.0.conv1", 256, 128, 3) + bn("layer3.0.bn1", 256) + conv("layer3.0.conv2", 256, 256, 3)
    + bn("layer3.0.bn2", 256) + conv("layer3.0.downsample.0", 256, 128, 1) + bn("layer3.0.downsample.1", 256)
    + [("fc.weight", (100, 256)), ("fc.bias", (100,))]
)


def test_resnet_keys_generator_agrees_with_the_spelled_out_resnet8x4():
    assert len(RESNET8X4) == 62
    assert resnet_keys(8, (32, 64, 128, 256), 100) == RESNET8X4


def wrn_keys(depth, width, classes):
    """models/wrn.py: conv1, block1-3 (NetworkBlock, blocks under `.layer.I`: bn1, conv1, bn2, conv2, and
    `convShortcut` where in != out), then the final bn1 and fc."""
    n = (depth - 4) // 6
    channels = [16, 16 * width, 32 * width, 64 * width]
    keys = conv("conv1", 16, 3, 3)
    for b in range(1, 4):
        for i in range(n):
            p, inp, out = f"block{b}.layer.{i}", channels[b - 1] if i == 0 else channels[b], channels[b]
            keys += bn(f"{p}.bn1", inp) + conv(f"{p}.conv1", out, inp, 3) + bn(f"{p}.bn2", out)
            keys += conv(f"{p}.conv2", out, out, 3)
            if inp != out:
                keys += conv(f"{p}.convShortcut", out, inp, 1)
    return keys + bn("bn1", channels[3]) + linear("fc", classes, channels[3])


VGG_CFG = {  # models/vgg.py cfg S, A, B, D, E
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def vgg_keys(cfg, classes):
    """models/vgg.py, batch_norm=True: block0-4 are Sequentials of [Conv2d(bias=True), BN, ReLU] per width (the last
    ReLU dropped), so conv i of a block is at index 3i and its BN at 3i+1; then classifier = Linear(512)."""
    keys, inp = [], 3
    for b, widths in enumerate(cfg):
        for i, v in enumerate(widths):
            keys += conv(f"block{b}.{3 * i}", v, inp, 3) + [(f"block{b}.{3 * i}.bias", (v,))]
            keys += bn(f"block{b}.{3 * i + 1}", v)
            inp = v
    return keys + linear("classifier", classes, 512)


def mobilenetv2_keys(width, classes, t=6):
    """models/mobilenetv2.py: conv1 = [conv3x3 s2, BN, ReLU]; blocks.S.I.conv = [pw, BN, ReLU, dw, BN, ReLU, pw, BN]
    (the pw expansion even at t=1); conv2 = [conv1x1 to 1280, BN, ReLU]; classifier = Sequential(Linear)."""
    setting = [(1, 16, 1), (t, 24, 2), (t, 32, 3), (t, 64, 4), (t, 96, 3), (t, 160, 3), (t, 320, 1)]
    inp = int(32 * width)
    keys = conv("conv1.0", inp, 3, 3) + bn("conv1.1", inp)
    for s, (expand, c, n) in enumerate(setting):
        out = int(c * width)
        for i in range(n):
            p, hidden = f"blocks.{s}.{i}.conv", inp * expand
            keys += conv(f"{p}.0", hidden, inp, 1) + bn(f"{p}.1", hidden)
            keys += [(f"{p}.3.weight", (hidden, 1, 3, 3))] + bn(f"{p}.4", hidden)  # depthwise
            keys += conv(f"{p}.6", out, hidden, 1) + bn(f"{p}.7", out)
            inp = out
    last = int(1280 * width) if width > 1.0 else 1280
    return keys + conv("conv2.0", last, inp, 1) + bn("conv2.1", last) + linear("classifier.0", classes, last)


def shufflev1_keys(classes, out_planes=(240, 480, 960), blocks=(4, 8, 4), groups=3):
    """models/ShuffleNetv1.py: conv1 (1x1 to 24), bn1, layer1-3 of Bottlenecks (conv1 1x1 grouped, except when the
    input is the 24-channel stem, bn1, conv2 3x3 depthwise, bn2, conv3 1x1 grouped, bn3); a stage's first block
    outputs out - in channels (its input is concatenated); linear."""
    keys = conv("conv1", 24, 3, 1) + bn("bn1", 24)
    inp = 24
    for layer, (planes, n) in enumerate(zip(out_planes, blocks), start=1):
        for i in range(n):
            p, out = f"layer{layer}.{i}", planes - (inp if i == 0 else 0)
            mid, g = out // 4, 1 if inp == 24 else groups
            keys += conv(f"{p}.conv1", mid, inp // g, 1) + bn(f"{p}.bn1", mid)
            keys += [(f"{p}.conv2.weight", (mid, 1, 3, 3))] + bn(f"{p}.bn2", mid)
            keys += conv(f"{p}.conv3", out, mid // groups, 1) + bn(f"{p}.bn3", out)
            inp = planes
    return keys + linear("linear", classes, out_planes[2])


def shufflev2_keys(classes, channels=(116, 232, 464, 1024), blocks=(3, 7, 3)):
    """models/ShuffleNetv2.py, net_size=1: conv1 (1x1 to 24), bn1, layer1-3 = [DownBlock, then n BasicBlocks],
    conv2 (1x1 to 1024), bn2, linear. DownBlock: conv1 dw s2 + bn1, conv2 1x1 + bn2 (left); conv3 1x1 + bn3, conv4 dw
    s2 + bn4, conv5 1x1 + bn5 (right), each half the output. BasicBlock: conv1 1x1, conv2 dw, conv3 1x1 on half."""
    keys = conv("conv1", 24, 3, 1) + bn("bn1", 24)
    inp = 24
    for layer, (out, n) in enumerate(zip(channels[:3], blocks), start=1):
        p, mid = f"layer{layer}.0", out // 2
        keys += [(f"{p}.conv1.weight", (inp, 1, 3, 3))] + bn(f"{p}.bn1", inp)
        keys += conv(f"{p}.conv2", mid, inp, 1) + bn(f"{p}.bn2", mid)
        keys += conv(f"{p}.conv3", mid, inp, 1) + bn(f"{p}.bn3", mid)
        keys += [(f"{p}.conv4.weight", (mid, 1, 3, 3))] + bn(f"{p}.bn4", mid)
        keys += conv(f"{p}.conv5", mid, mid, 1) + bn(f"{p}.bn5", mid)
        for i in range(1, n + 1):
            p, half = f"layer{layer}.{i}", out // 2
            keys += conv(f"{p}.conv1", half, half, 1) + bn(f"{p}.bn1", half)
            keys += [(f"{p}.conv2.weight", (half, 1, 3, 3))] + bn(f"{p}.bn2", half)
            keys += conv(f"{p}.conv3", half, half, 1) + bn(f"{p}.bn3", half)
        inp = out
    return keys + conv("conv2", channels[3], channels[2], 1) + bn("bn2", channels[3]) + linear("linear", classes,
                                                                                                 channels[3])


def resnet50_keys(classes):
    """models/resnetv2.py ResNet50: conv1 (3x3 to 64), bn1, layer1-4 of Bottlenecks (conv1 1x1, conv2 3x3, conv3 1x1
    to 4x, each with its bn, and `shortcut` = Sequential(conv1x1, BN) where the shape changes), linear."""
    keys = conv("conv1", 64, 3, 3) + bn("bn1", 64)
    inp = 64
    for layer, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2)), start=1):
        for i in range(n):
            p = f"layer{layer}.{i}"
            keys += conv(f"{p}.conv1", planes, inp, 1) + bn(f"{p}.bn1", planes)
            keys += conv(f"{p}.conv2", planes, planes, 3) + bn(f"{p}.bn2", planes)
            keys += conv(f"{p}.conv3", 4 * planes, planes, 1) + bn(f"{p}.bn3", 4 * planes)
            if i == 0 and (stride != 1 or inp != 4 * planes):
                keys += conv(f"{p}.shortcut.0", 4 * planes, inp, 1) + bn(f"{p}.shortcut.1", 4 * planes)
            inp = 4 * planes
    return keys + linear("linear", classes, 2048)


SMALL, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
REFERENCE_KEYS = {
    **{f"resnet{d}": (lambda d=d: resnet_keys(d, SMALL, 100)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda: RESNET8X4,
    "resnet32x4": lambda: resnet_keys(32, WIDE, 100),
    **{f"wrn_{d}_{w}": (lambda d=d, w=w: wrn_keys(d, w, 100)) for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{name: (lambda cfg=cfg: vgg_keys(cfg, 100)) for name, cfg in VGG_CFG.items()},
    **{f"{name}_bn": (lambda cfg=cfg: vgg_keys(cfg, 100)) for name, cfg in VGG_CFG.items()},
    "mobile_half": lambda: mobilenetv2_keys(0.5, 100),
    "MobileNetV2": lambda: mobilenetv2_keys(0.5, 100),
    "mobilenetv2": lambda: mobilenetv2_keys(1.0, 100),
    "mobilenetv2_075": lambda: mobilenetv2_keys(0.75, 100),
    "ShuffleV1": lambda: shufflev1_keys(100),
    "ShuffleV2": lambda: shufflev2_keys(100),
    "ResNet50": lambda: resnet50_keys(100),
}


def random_state(keys, generator):
    """Random tensors of the given shapes, scaled so that even a deep network's output stays finite."""
    state = {}
    for key, shape in keys:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif len(shape) > 1:  # conv or linear weight
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(1.0 / math.prod(shape[1:]))
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator) + (1.0 if key.endswith(".weight") else 0.0)
    return state


@pytest.mark.parametrize("name", sorted(REFERENCE_KEYS))
def test_reference_state_dict_loads_strictly_and_is_used(name):
    keys = REFERENCE_KEYS[name]()
    assert len({k for k, _ in keys}) == len(keys), "the reference generator repeats a key"
    torch.manual_seed(0)
    model = models.create(name, num_classes=100).eval()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = dict(keys)
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}

    x = torch.randn(2, 3, 16, 16)
    state = random_state(keys, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
        model.load_state_dict(state, strict=True)
        after = model(x)
        # A second model from another seed, loaded with the same tensors, gives the same output: the output is
        # the loaded weights' alone, nothing of the model's own initialisation is left.
        torch.manual_seed(1)
        other = models.create(name, num_classes=100).eval()
        other.load_state_dict(state, strict=True)
        assert torch.isfinite(after).all()
        assert not torch.allclose(before, after)
        torch.testing.assert_close(other(x), after)
        # And the final layer the contract calls `classifier` is the reference's final layer.
        final = keys[-1][0].rsplit(".", 1)[0]  # the reference's last key is its final layer's bias
        assert torch.equal(model.classifier.weight, state[f"{final}.weight"])
        torch.testing.assert_close(after, model.classifier(model.forward_features(x)))


# ---- The reference's forward, written from its code, on the loaded tensors --------------------------------------


def _bn(x, s, name):
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], False, 0.0, 1e-5)


def reference_resnet_forward(s, x, depth):
    """models/resnet.py ResNet.forward with BasicBlocks, in eval mode, on a 32x32 input."""
    n = (depth - 2) // 6
    x = F.relu(_bn(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"))
    for stage, stride in zip((1, 2, 3), (1, 2, 2)):
        for i in range(n):
            p, st = f"layer{stage}.{i}", stride if i == 0 else 1
            out = F.relu(_bn(F.conv2d(x, s[f"{p}.conv1.weight"], stride=st, padding=1), s, f"{p}.bn1"))
            out = _bn(F.conv2d(out, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in s:
                x = _bn(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=st), s, f"{p}.downsample.1")
            x = F.relu(out + x)
    x = F.avg_pool2d(x, 8).flatten(1)
    return F.linear(x, s["fc.weight"], s["fc.bias"])


def reference_wrn_forward(s, x, depth):
    """models/wrn.py WideResNet.forward in eval mode on a 32x32 input: a block whose widths differ pre-activates its
    input and feeds that to both conv1 and convShortcut; otherwise the shortcut is the raw input."""
    n = (depth - 4) // 6
    x = F.conv2d(x, s["conv1.weight"], padding=1)
    for b, stride in zip((1, 2, 3), (1, 2, 2)):
        for i in range(n):
            p, st = f"block{b}.layer.{i}", stride if i == 0 else 1
            pre = F.relu(_bn(x, s, f"{p}.bn1"))
            out = F.relu(_bn(F.conv2d(pre, s[f"{p}.conv1.weight"], stride=st, padding=1), s, f"{p}.bn2"))
            out = F.conv2d(out, s[f"{p}.conv2.weight"], padding=1)
            shortcut = x if f"{p}.convShortcut.weight" not in s else F.conv2d(pre, s[f"{p}.convShortcut.weight"],
                                                                              stride=st)
            x = shortcut + out
    x = F.avg_pool2d(F.relu(_bn(x, s, "bn1")), 8).flatten(1)
    return F.linear(x, s["fc.weight"], s["fc.bias"])


@pytest.mark.parametrize("name, forward, depth", [("resnet8x4", reference_resnet_forward, 8),
                                                  ("resnet20", reference_resnet_forward, 20),
                                                  ("wrn_16_2", reference_wrn_forward, 16)])
def test_forward_on_32x32_equals_the_reference_forward(name, forward, depth):
    model = models.create(name, num_classes=100).eval()
    state = random_state(REFERENCE_KEYS[name](), torch.Generator().manual_seed(2))
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), forward(state, x, depth), rtol=1e-4, atol=1e-5)


def test_channel_shuffle_is_the_references():
    x = torch.randn(2, 12, 3, 3)
    n, c, h, w = x.shape
    for g in (1, 2, 3):
        # ShuffleBlock.forward in models/ShuffleNetv1.py and ShuffleNetv2.py
        expected = x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
        assert torch.equal(channel_shuffle(x, g), expected)


def test_vgg_pools_as_the_reference_for_its_input_size():
    # The reference max-pools after blocks 0-2, and after block 3 only for 64x64 inputs; we also skip pools that
    # would shrink a 1x1 map, which only inputs below 8x8 need.
    assert models.create("vgg13", num_classes=10).pools == (True, True, True, False)
    assert models.create("vgg13", num_classes=10, image_size=64).pools == (True, True, True, True)
    assert models.create("vgg8", num_classes=10, image_size=4).pools == (True, True, False, False)
    assert models.create("vgg8", num_classes=10, image_size=4).eval()(torch.randn(1, 3, 4, 4)).shape == (1, 10)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "mobile_half", "ShuffleV1", "ShuffleV2"])
def test_in_channels_changes_only_the_first_conv(name):
    rgb = {k: v.shape for k, v in models.create(name, num_classes=10).state_dict().items()}
    gray = {k: v.shape for k, v in models.create(name, num_classes=10, in_channels=1).state_dict().items()}
    changed = sorted(k for k in rgb if rgb[k] != gray[k])
    assert len(changed) == 1 and gray[changed[0]][1] == 1, changed


# torchvision's ImageNet networks at 1,000 classes (their model cards: resnet18 11,689,512, resnet34 21,797,672,
# resnet50 25,557,032, mobilenet_v2 3,504,872), the paper's Tiny-ImageNet and ImageNet pairs.
IMAGENET_COUNTS = [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
                   ("mobilenet_v2", 3_504_872)]


@pytest.mark.parametrize("name, reference", IMAGENET_COUNTS, ids=[c[0] for c in IMAGENET_COUNTS])
def test_imagenet_networks_match_torchvision(name, reference):
    model = models.create(name, num_classes=1000)
    assert n_params(model) == reference
    keys = model.state_dict().keys()
    # torchvision's names, so its checkpoints load unchanged
    assert ({"conv1.weight", "bn1.running_mean", "layer4.1.bn2.weight", "fc.weight"} <= keys if name != "mobilenet_v2"
            else {"features.0.0.weight", "features.1.conv.0.0.weight", "features.18.1.running_var",
                  "classifier.weight"} <= keys)
    if name == "mobilenet_v2":  # torchvision's checkpoints name the final layer classifier.1 (after its dropout)
        named = {k.replace("classifier.", "classifier.1."): v for k, v in model.state_dict().items()}
        fresh = models.create(name, num_classes=1000)
        fresh.load_state_dict(named, strict=True)
        assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    small = models.create(name, num_classes=200)
    assert small(torch.randn(2, 3, 64, 64)).shape == (2, 200)  # Tiny-ImageNet's 64 px
