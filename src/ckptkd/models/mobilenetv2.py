"""MobileNetV2 (Sandler et al. 2018) for CIFAR, as RepDistiller / mdistiller build it.

That is the CIFAR network of "Knowledge Distillation via Route Constrained Optimization": a stride-2 stem, the stride 2
of the 24-channel stage set to 1, ReLU (not ReLU6), and an expansion 1x1 conv even in the first stage, whose
expansion is 1. A 32x32 input ends at 2x2 before pooling. Module names are the reference's (`conv1`, `blocks.S.I.conv`,
`conv2`, and the final layer `classifier.0`), so their checkpoints load with
`load_state_dict(..., strict=True)`. `mobile_half` (registered there as `MobileNetV2`) is width 0.5.
"""

from torch import nn

from ckptkd.models import register

# expansion t, output channels c, blocks n, first block's stride s
SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def conv_bn_relu(in_planes, planes, kernel_size, stride=1):
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(planes),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_planes, planes, stride, expansion):
        super().__init__()
        hidden = in_planes * expansion
        # One Sequential, as in the reference, so the keys are `conv.0` (expand), `conv.3` (depthwise), `conv.6`
        # (project) and their BatchNorms `conv.1`, `conv.4`, `conv.7`.
        self.conv = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # Linear bottleneck: no activation after the projection.
            nn.Conv2d(hidden, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
        )
        self.use_residual = stride == 1 and in_planes == planes

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class IndexedLinear(nn.Linear):
    """An nn.Linear whose weight and bias live in a child named "0", so its state-dict keys are `0.weight`, `0.bias`.

    RepDistiller wraps MobileNetV2's final layer in a Sequential (`classifier.0.weight`). A property returning the
    Linear inside would shadow the Sequential for every lookup by path (torch.func.functional_call, torch.fx,
    get_submodule), so the module under `classifier` is this instead: an nn.Linear to our code, theirs by key."""

    def __init__(self, in_features, out_features):
        nn.Module.__init__(self)  # not nn.Linear.__init__, which would register the parameters on this module
        self.in_features, self.out_features = in_features, out_features
        self.add_module("0", nn.Linear(in_features, out_features))

    @property
    def weight(self):
        return self._modules["0"].weight

    @property
    def bias(self):
        return self._modules["0"].bias


class MobileNetV2(nn.Module):
    def __init__(self, num_classes, in_channels=3, width_mult=1.0):
        super().__init__()
        channels = max(1, int(32 * width_mult))
        self.conv1 = conv_bn_relu(in_channels, channels, 3, stride=2)
        stages = []
        for t, c, n, s in SETTINGS:
            planes = max(1, int(c * width_mult))
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(channels, planes, s if i == 0 else 1, t))
                channels = planes
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(stages)
        # The last layer is only widened, never narrowed, as in the paper.
        self.feature_dim = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, self.feature_dim, 1)
        self.classifier = IndexedLinear(self.feature_dim, num_classes)  # keys `classifier.0.weight`, `.bias`

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # normal(0, sqrt(2 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x):
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        # The reference's AvgPool2d(2, ceil_mode=True) is the global mean for a 32x32 input (2x2 map here).
        return x.mean((2, 3))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


@register("mobilenetv2")
def mobilenetv2(num_classes, in_channels=3, width_mult=1.0):
    return MobileNetV2(num_classes, in_channels, width_mult)


@register("mobilenetv2_075")
def mobilenetv2_075(num_classes, in_channels=3):
    return MobileNetV2(num_classes, in_channels, 0.75)


@register("mobile_half")
def mobile_half(num_classes, in_channels=3):
    return MobileNetV2(num_classes, in_channels, 0.5)


# RepDistiller's and mdistiller's model tables call mobile_half `MobileNetV2` (and so do their result tables).
register("MobileNetV2")(mobile_half)
