"""ResNet-50 for CIFAR as RepDistiller / mdistiller build it (their `resnetv2.py`, registered there as `ResNet50`), and
ResNet-18 / ResNet-34 of the same family (`ResNet18`, `ResNet34`: the paper's released code builds its resnet18/34 so,
in models/resnet_bottleneck.py, the Tiny-ImageNet pair's networks).

The ImageNet bottleneck network (3, 4, 6, 3 blocks of 64/128/256/512 x 4 channels) with a 3x3 stride-1 stem and no
max-pool, so a 32x32 input ends at 4x4. Shortcuts are `shortcut.0` (1x1 conv) + `shortcut.1` (BatchNorm) where the
shape changes and the final layer is `linear`, the reference's names, so their checkpoints load unchanged.
"""

import torch.nn.functional as F
from torch import nn

from ckptkd.models import register, resnet


class BasicBlock(resnet.BasicBlock):
    expansion = 1
    projection = "shortcut"


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet50(nn.Module):
    def __init__(self, num_classes, in_channels=3, blocks=(3, 4, 6, 3), block=Bottleneck):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), start=1):
            layers = []
            for j in range(n):
                layers.append(block(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.feature_dim = in_planes
        self.linear = nn.Linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def classifier(self) -> nn.Linear:
        # The final layer lives under the reference's name `linear` (state-dict keys `linear.weight`, `linear.bias`).
        return self.linear

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))

    def forward(self, x):
        return self.linear(self.forward_features(x))


@register("ResNet50")
def resnet50(num_classes, in_channels=3):
    return ResNet50(num_classes, in_channels)


@register("ResNet18")
def resnet18(num_classes, in_channels=3):
    return ResNet50(num_classes, in_channels, blocks=(2, 2, 2, 2), block=BasicBlock)


@register("ResNet34")
def resnet34(num_classes, in_channels=3):
    return ResNet50(num_classes, in_channels, blocks=(3, 4, 6, 3), block=BasicBlock)
