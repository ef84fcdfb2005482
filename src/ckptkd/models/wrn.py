"""Wide ResNets (Zagoruyko & Komodakis 2016) in the CIFAR form: `wrn_{depth}_{width}`, depth = 6n+4.

Module names follow RepDistiller / mdistiller (`block1.layer.0.conv1`, `convShortcut`, the final `bn1` and `fc`),
so their checkpoints (e.g. the released `wrn_40_2_vanilla` teacher) load with `load_state_dict(..., strict=True)`.
"""

import re

import torch.nn.functional as F
from torch import nn

from ckptkd.errors import UserError
from ckptkd.models import register


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv, twice."""

    def __init__(self, in_planes, planes, stride, dropout):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        # The reference's name. Only the first block of a stage changes the shape, and there it always
        # changes the width too, so "stride != 1 or widths differ" is the reference's "widths differ".
        self.convShortcut = None
        if stride != 1 or in_planes != planes:
            self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # As in the reference code, a projection shortcut reads the pre-activated input.
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class NetworkBlock(nn.Module):
    """One stage. A wrapper only because the reference has one: its blocks are `blockN.layer.I`."""

    def __init__(self, in_planes, planes, blocks, stride, dropout):
        super().__init__()
        layers = [BasicBlock(in_planes, planes, stride, dropout)]
        layers += [BasicBlock(planes, planes, 1, dropout) for _ in range(blocks - 1)]
        self.layer = nn.Sequential(*layers)

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, width, num_classes, in_channels=3, dropout=0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(channels[0], channels[1], n, 1, dropout)
        self.block2 = NetworkBlock(channels[1], channels[2], n, 2, dropout)
        self.block3 = NetworkBlock(channels[2], channels[3], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.feature_dim = channels[3]
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    @property
    def classifier(self) -> nn.Linear:
        # The final layer lives under the reference's name `fc` (state-dict keys `fc.weight`, `fc.bias`).
        return self.fc

    def forward_features(self, x):
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = F.relu(self.bn1(x))
        # The reference's avg_pool2d(x, 8) is the global mean for a 32x32 input; the mean also fits other sizes.
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.forward_features(x))


def _make_factory(depth, width):
    def build(num_classes, in_channels=3, dropout=0.0):
        return WideResNet(depth, width, num_classes, in_channels, dropout)

    return build


MAX_DEPTH, MAX_WIDTH = 1204, 100


def factory_from_name(name):
    """The factory for a `wrn_D_W` name not registered explicitly; None if `name` is not of that form."""
    match = re.fullmatch(r"wrn_(\d+)_(\d+)", name)
    if match is None:
        return None
    depth, width = int(match[1]), int(match[2])
    if depth < 10 or (depth - 4) % 6 != 0:
        raise UserError(f"model '{name}': WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...)")
    if width < 1:
        raise UserError(f"model '{name}': WRN width must be at least 1")
    if depth > MAX_DEPTH or width > MAX_WIDTH:  # before 100,000 layers are built just to be measured
        raise UserError(f"model '{name}': WRN depth at most {MAX_DEPTH} and width at most {MAX_WIDTH} (the deepest "
                        "published is 1001 layers; a wider WRN is wrn_28_10's tenfold)")
    return _make_factory(depth, width)


for _depth, _width in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10)):
    register(f"wrn_{_depth}_{_width}")(_make_factory(_depth, _width))
