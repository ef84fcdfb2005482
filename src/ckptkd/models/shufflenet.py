"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) for CIFAR, as RepDistiller / mdistiller build them.

Both start with a 1x1 conv to 24 channels at full resolution (no ImageNet stem stride or max-pool) and halve the map at
the start of each of three stages, so a 32x32 input ends at 4x4. Module names are the reference's (`layer1.0.conv1`,
..., final layer `linear`), so their `ShuffleV1` / `ShuffleV2` checkpoints load with `load_state_dict(strict=True)`.
The reference uses PyTorch's default initialisation for these two, and so do we.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ckptkd.models import register


def channel_shuffle(x, groups):
    """[N, g*c, H, W] -> [N, g, c, H, W] -> [N, c, g, H, W] -> [N, c*g, H, W], the reference's view/permute/reshape.

    Written without reading the shape, so torch.fx traces it and vmap batches it."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 conv, channel shuffle, 3x3 depthwise conv, grouped 1x1 conv. A stride-2 block concatenates an
    average-pooled copy of its input instead of adding it, so it outputs `out_planes` + its input's channels."""

    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        mid_planes = out_planes // 4
        # The reference does not group the first 1x1 conv of the first block, whose input is the 24-channel stem.
        first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle_groups = first_groups
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride=stride, padding=1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.shuffle_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes, in_channels=3, out_planes=(240, 480, 960), blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        planes = 24
        for i, (out, n) in enumerate(zip(out_planes, blocks), start=1):
            # The first (stride-2) block concatenates its input, so its own branch makes only the difference.
            layers = [ShuffleV1Block(planes, out - planes, 2, groups)]
            layers += [ShuffleV1Block(out, out, 1, groups) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            planes = out
        self.feature_dim = planes
        self.linear = nn.Linear(planes, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        # The final layer lives under the reference's name `linear` (state-dict keys `linear.weight`, `linear.bias`).
        return self.linear

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        # The reference's avg_pool2d(x, 4) is the global mean for a 32x32 input; the mean also fits other sizes.
        return x.mean((2, 3))

    def forward(self, x):
        return self.linear(self.forward_features(x))


class ShuffleV2Block(nn.Module):
    """Splits the channels in half, transforms one half (1x1, 3x3 depthwise, 1x1), concatenates and shuffles."""

    def __init__(self, channels):
        super().__init__()
        # The split point is fixed here rather than read from the input's shape, so torch.fx can trace the block.
        self.split = channels // 2
        half = channels - self.split
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        kept, transformed = x[:, : self.split], x[:, self.split :]
        out = F.relu(self.bn1(self.conv1(transformed)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Halves the map: two stride-2 branches (3x3 depthwise then 1x1, and 1x1-3x3 depthwise-1x1), concatenated."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """The reference's `net_size=1` configuration by default: stages of 116/232/464 channels, 1024 before pooling."""

    def __init__(self, num_classes, in_channels=3, channels=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        planes = 24
        for i, (out, n) in enumerate(zip(channels[:3], blocks), start=1):
            # A down-sampling block, then n plain ones: the reference's stage has n + 1 blocks.
            layers = [ShuffleV2DownBlock(planes, out)] + [ShuffleV2Block(out) for _ in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            planes = out
        self.conv2 = nn.Conv2d(planes, channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.feature_dim = channels[3]
        self.linear = nn.Linear(channels[3], num_classes)

    @property
    def classifier(self) -> nn.Linear:
        # The final layer lives under the reference's name `linear` (state-dict keys `linear.weight`, `linear.bias`).
        return self.linear

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        # The reference's avg_pool2d(x, 4) is the global mean for a 32x32 input; the mean also fits other sizes.
        return x.mean((2, 3))

    def forward(self, x):
        return self.linear(self.forward_features(x))


@register("ShuffleV1")
def shuffle_v1(num_classes, in_channels=3):
    return ShuffleNetV1(num_classes, in_channels)


@register("ShuffleV2")
def shuffle_v2(num_classes, in_channels=3):
    return ShuffleNetV2(num_classes, in_channels)
