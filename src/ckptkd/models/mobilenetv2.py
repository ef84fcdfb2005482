"""MobileNetV2 (Sandler et al. 2018) with the CIFAR strides: a 32x32 input ends at 4x4 before pooling."""

import torch
from torch import nn

from ckptkd.models import register

# expansion t, output channels c, blocks n, first block's stride s. ImageNet's stem stride 2 and
# the stride 2 of the 24-channel stage are set to 1 so small images are not pooled away early.
SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def conv_bn_relu(in_planes, planes, kernel_size, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(planes),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_planes, planes, stride, expansion):
        super().__init__()
        hidden = in_planes * expansion
        layers = [conv_bn_relu(in_planes, hidden, 1)] if expansion != 1 else []
        layers += [
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            # Linear bottleneck: no activation after the projection.
            nn.Conv2d(hidden, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_planes == planes

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes, in_channels=3, width_mult=1.0):
        super().__init__()
        channels = max(1, int(32 * width_mult))
        layers = [conv_bn_relu(in_channels, channels, 3)]
        for t, c, n, s in SETTINGS:
            planes = max(1, int(c * width_mult))
            for i in range(n):
                layers.append(InvertedResidual(channels, planes, s if i == 0 else 1, t))
                channels = planes
        # The last layer is only widened, never narrowed, as in the paper.
        self.feature_dim = int(1280 * max(1.0, width_mult))
        layers.append(conv_bn_relu(channels, self.feature_dim, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x):
        return self.features(x).mean((2, 3))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


@register("mobilenetv2")
def mobilenetv2(num_classes, in_channels=3, width_mult=1.0):
    return MobileNetV2(num_classes, in_channels, width_mult)


@register("mobilenetv2_075")
def mobilenetv2_075(num_classes, in_channels=3):
    return MobileNetV2(num_classes, in_channels, 0.75)
