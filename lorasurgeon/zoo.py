"""Small architectures for demos and tests, usable as ``--arch lorasurgeon.zoo:NAME``."""

from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Module):
    """A CNN for 1×8×8 images (scikit-learn's digits; MNIST resized with --image-size 8)."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 128)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        h = self.pool(nn.functional.relu(self.conv2(nn.functional.relu(self.conv1(x)))))
        return self.classifier(nn.functional.relu(self.fc1(h.flatten(1))))


def digits_cnn(num_classes: int = 10) -> nn.Module:
    return DigitsCNN(num_classes)


class MLP(nn.Module):
    """A 3-layer MLP over flattened inputs."""

    def __init__(self, in_features: int = 64, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        h = nn.functional.relu(self.fc1(x.flatten(1)))
        return self.classifier(nn.functional.relu(self.fc2(h)))


def mlp(num_classes: int = 10, in_features: int = 64) -> nn.Module:
    return MLP(in_features, 256, num_classes)
