"""Small models for small data: LeNet-5, a plain CNN of configurable width, and a multilayer perceptron."""

import torch
import torch.nn.functional as F
from torch import nn

from ckptkd.errors import UserError
from ckptkd.models import register


@register("lenet5")
class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling. Both convs are padded and the last map is pooled to the
    classic 5x5, so the same network takes 8x8 digits, 28x28 MNIST and 32x32 CIFAR images."""

    def __init__(self, num_classes, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.feature_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def forward_features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 5), 1)
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


@register("cnn")
class CNN(nn.Module):
    """Conv3x3-BatchNorm-ReLU-MaxPool blocks (one per entry of `channels`), flatten, one hidden layer, classifier.

    Shallow, so it trains fast on a CPU; the flattened map keeps spatial detail, so a wide one can memorise a small
    training set (an over-confident teacher) and a narrow one makes a small student."""

    def __init__(self, num_classes, in_channels=3, image_size=None, channels=(32, 64, 128), hidden=256, dropout=0.0):
        super().__init__()
        if image_size is None:
            raise UserError("model 'cnn' needs the input size (image_size)")
        height, width = image_size
        blocks = []
        for out_channels in channels:
            blocks += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                       nn.ReLU(inplace=True)]
            if min(height, width) >= 2:  # stop pooling once the map is 1 pixel, so any depth fits 8x8 input
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        layers = [nn.Linear(in_channels * height * width, hidden), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.hidden = nn.Sequential(*layers)
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def forward_features(self, x):
        return self.hidden(torch.flatten(self.blocks(x), 1))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


@register("mlp")
class MLP(nn.Module):
    """Flatten, then Linear-[BatchNorm]-ReLU-[Dropout] for each hidden width, then the classifier."""

    def __init__(
        self, num_classes, in_channels=3, image_size=None, widths=(256, 128), dropout=0.0, batch_norm=False
    ):
        super().__init__()
        if image_size is None:
            raise UserError("model 'mlp' needs the input size (image_size)")
        height, width = image_size
        if not isinstance(widths, (list, tuple)) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                                                            for w in widths):
            raise UserError(f"model 'mlp' cannot be built with model.widths={widths!r}: it must be a list of layer "
                            "widths of at least 1")
        in_features = in_channels * height * width
        layers = []
        for out_features in widths:
            layers.append(nn.Linear(in_features, out_features))
            if batch_norm:
                layers.append(nn.BatchNorm1d(out_features))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = out_features
        self.hidden = nn.Sequential(*layers)
        self.feature_dim = in_features
        self.classifier = nn.Linear(in_features, num_classes)

    def forward_features(self, x):
        return self.hidden(torch.flatten(x, 1))

    def forward(self, x):
        return self.classifier(self.forward_features(x))
