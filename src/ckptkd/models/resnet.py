"""CIFAR ResNets (He et al. 2016, section 4.2) as RepDistiller / mdistiller build them.

Depth 6n+2: a 3x3 stem, then three stages of n BasicBlocks, the 2nd and 3rd starting with stride 2. `resnet8` ...
`resnet110` have 16/16/32/64 channels (stem, stages); `resnet8x4` and `resnet32x4` are four times as wide. Where a
block changes shape, its shortcut is a 1x1 conv + BatchNorm called `downsample` (not the paper's parameter-free
option A), and the final layer is called `fc`: with these names a RepDistiller/mdistiller checkpoint (e.g. their
released `resnet32x4_vanilla` teacher) loads with `load_state_dict(..., strict=True)` as it is.
"""

import torch.nn.functional as F
from torch import nn

from ckptkd.models import register


class BasicBlock(nn.Module):
    # A projection only where the shape changes, as in the reference: `downsample.0` conv, `downsample.1` BN (the
    # ResNet18/34 of `resnet50.py` name it `shortcut`, as theirs do).
    projection = "downsample"

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        projection = None
        if stride != 1 or in_planes != planes:
            projection = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        setattr(self, self.projection, projection)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        projection = getattr(self, self.projection)
        return F.relu(out + (x if projection is None else projection(x)))


class ResNet(nn.Module):
    """`widths` = (stem, stage 1, stage 2, stage 3) channels."""

    def __init__(self, depth, num_classes, in_channels=3, widths=(16, 16, 32, 64)):
        super().__init__()
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], n, stride=2)
        self.feature_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def classifier(self) -> nn.Linear:
        # The final layer lives under the reference's name `fc` (state-dict keys `fc.weight`, `fc.bias`).
        return self.fc

    @staticmethod
    def _make_stage(in_planes, planes, blocks, stride):
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        # The reference's AvgPool2d(8) is the global mean for a 32x32 input; the mean also fits other sizes.
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.forward_features(x))


def _make_factory(depth, widths):
    def build(num_classes, in_channels=3):
        return ResNet(depth, num_classes, in_channels, widths)

    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register(f"resnet{_depth}")(_make_factory(_depth, (16, 16, 32, 64)))
for _depth in (8, 32):
    register(f"resnet{_depth}x4")(_make_factory(_depth, (32, 64, 128, 256)))
