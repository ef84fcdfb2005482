"""The ImageNet networks of the paper's Tiny-ImageNet and ImageNet recipes: ResNet-18/34/50 and MobileNetV2 as
torchvision builds them (7x7 stride-2 stem and max-pool; MobileNetV2's stride-2 3x3 stem), with torchvision's
parameter names, so its checkpoints load unchanged (`ckptkd import`) and the parameter counts match its own:
resnet18 11,689,512, resnet34 21,797,672, resnet50 25,557,032, mobilenet_v2 3,504,872 at 1,000 classes.

The CIFAR networks of the same family (`resnet20`..`resnet110`, `ResNet50`, `mobilenetv2`) keep a 3x3 stride-1 stem
for 32-px images; these are for 64 px and up.
"""

from __future__ import annotations

import torch
from torch import nn

from ckptkd.models import register


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3, as torchvision's v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ImageNetResNet(nn.Module):
    def __init__(self, block, layers: list[int], num_classes: int = 1000, in_channels: int = 3, image_size=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes, stages = 64, []
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(count):
                blocks.append(block(planes, width, 2 if j == 0 and i > 0 else 1))
                planes = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = planes
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc  # torchvision's name for the final layer

    def forward(self, x):
        return self.fc(self.forward_features(x))


@register("resnet18")
def resnet18(num_classes=1000, in_channels=3, image_size=None):
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@register("resnet34")
def resnet34(num_classes=1000, in_channels=3, image_size=None):
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


@register("resnet50")
def resnet50(num_classes=1000, in_channels=3, image_size=None):
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


def _conv_bn(in_planes: int, out_planes: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv, BatchNorm, ReLU6 (indices 0, 1, 2)."""
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_planes), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, expand: int):
        super().__init__()
        hidden = in_planes * expand
        layers = [] if expand == 1 else [_conv_bn(in_planes, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, out_planes, 1, bias=False),
                   nn.BatchNorm2d(out_planes)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_planes == out_planes

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _divisible(v: float, divisor: int = 8) -> int:
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class ImageNetMobileNetV2(nn.Module):
    # (expansion, channels, blocks, first stride): the paper's Table 2, as torchvision lists it
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        planes = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        features = [_conv_bn(in_channels, planes, 3, 2)]
        for expand, channels, count, stride in self.SETTINGS:
            out = _divisible(channels * width)
            for i in range(count):
                features.append(InvertedResidual(planes, out, stride if i == 0 else 1, expand))
                planes = out
        features.append(_conv_bn(planes, last, 1, 1))
        self.features = nn.Sequential(*features)
        self.feature_dim = last
        # torchvision's head is classifier = Sequential(Dropout, Linear); here the Linear is `classifier` itself (the
        # zoo's contract) and its checkpoints' `classifier.1.*` keys are read as `classifier.*`
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        self._register_load_state_dict_pre_hook(_torchvision_head)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x):
        return self.classifier(self.dropout(self.forward_features(x)))


def _torchvision_head(state_dict, prefix, *_):
    for name in ("weight", "bias"):
        key = f"{prefix}classifier.1.{name}"
        if key in state_dict:
            state_dict[f"{prefix}classifier.{name}"] = state_dict.pop(key)


@register("mobilenet_v2")
def mobilenet_v2(num_classes=1000, in_channels=3, image_size=None, width=1.0, dropout=0.2):
    return ImageNetMobileNetV2(num_classes, in_channels, width, dropout)
