"""Small architectures for demos and tests, usable as ``--arch lorasurgeon.zoo:NAME``."""

from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Module):
    """A CNN for 1×8×8 images (scikit-learn's digits; MNIST with --image-size 8): four 3×3
    convolutions (99% of its 65.6k parameters), global average pooling, a linear classifier.
    Trained weights ship in ``lorasurgeon/assets/digits_cnn.safetensors``
    (``benchmarks/train_digits_cnn.py`` makes them)."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv4 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        relu = nn.functional.relu
        h = self.pool(relu(self.conv2(relu(self.conv1(x)))))  # 8×8 -> 4×4
        h = relu(self.conv4(relu(self.conv3(h))))
        return self.classifier(h.mean((2, 3)))


def digits_cnn(num_classes: int = 10) -> nn.Module:
    return DigitsCNN(num_classes)


def digits_cnn_weights() -> str:
    """Path of the shipped, trained DigitsCNN weights."""
    from pathlib import Path

    return str(Path(__file__).parent / "assets" / "digits_cnn.safetensors")


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
