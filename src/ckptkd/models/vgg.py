"""VGG with BatchNorm for CIFAR, as RepDistiller / mdistiller build it (their `vgg*_bn`, registered there as `vgg8`...).

Five blocks of 3x3 conv (with bias) + BN + ReLU, 2x2 max-pools between the first four, global average pooling and a
single linear layer: the ImageNet network's three fully connected layers are dropped. The module names are the
reference's (`block0.0.weight`, `block0.1.running_mean`, ..., `classifier.weight`), so their checkpoints (e.g. the
released `vgg13_vanilla` teacher) load with `load_state_dict(..., strict=True)`.
"""

import torch.nn.functional as F
from torch import nn

from ckptkd.models import register

# Output channels of each conv, block by block (the reference's configurations S, A, B, D and E).
CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(in_channels, widths):
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    # The reference ends each block at its last BatchNorm and applies that ReLU in forward (to expose the
    # pre-activation); dropping it here keeps the Sequential's indices, and so the state-dict keys, theirs.
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, widths, num_classes, in_channels=3, image_size=None):
        super().__init__()
        height, width = image_size or (32, 32)
        self.block0 = _block(in_channels, widths[0])
        self.block1 = _block(widths[0][-1], widths[1])
        self.block2 = _block(widths[1][-1], widths[2])
        self.block3 = _block(widths[2][-1], widths[3])
        self.block4 = _block(widths[3][-1], widths[4])
        # Which of the four max-pools (after blocks 0-3) run. The reference pools after blocks 0, 1 and 2, and after
        # block 3 only for 64x64 inputs (Tiny-ImageNet); we also skip a pool once the map is a single pixel, so small
        # inputs fit (8x8 needs no skip: 8 -> 4 -> 2 -> 1). Decided here from `image_size` (32x32 if not given)
        # rather than from each input's shape, so the forward has no shape test and torch.fx can trace it.
        tiny_imagenet = height == 64
        pools = []
        for i in range(4):
            pools.append((i < 3 or tiny_imagenet) and min(height, width) >= 2)
            if pools[-1]:
                height, width = height // 2, width // 2
        self.pools = tuple(pools)
        self.feature_dim = widths[4][-1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # normal(0, sqrt(2 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def extra_repr(self):
        # In the repr, so models that pool differently are never taken for the same architecture.
        return f"pools={self.pools}"

    def forward_features(self, x):
        for block, pool in zip((self.block0, self.block1, self.block2, self.block3), self.pools):
            x = F.relu(block(x))
            if pool:
                x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return x.mean((2, 3))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


def _make_factory(widths):
    def build(num_classes, in_channels=3, image_size=None):
        return VGG(widths, num_classes, in_channels, image_size)

    return build


for _name, _widths in CONFIGS.items():
    register(_name)(_make_factory(_widths))
    register(f"{_name}_bn")(_make_factory(_widths))  # the reference's function names
