"""DigitsCNN: the model of the sample training run (written by make_samples.py)."""

from torch import nn


class DigitsCNN(nn.Module):
    """Two conv + BatchNorm + ReLU blocks, a 2x2 max-pool and a two-layer head: 8x8 digits -> 10 classes."""

    def __init__(self, width: int = 8, hidden: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))
