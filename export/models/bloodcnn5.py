"""The published seed CNN for BloodMNIST 28x28, with a width multiplier.

Five 3x3 conv layers (padding 1), each conv + batch norm + ReLU, a 2x2 max
pool after layers 2 and 5, then a fully connected head. ``width`` scales the
channel counts (the published net is width 1: 16-16-32-32-64 ... here
``base`` channels per stage); dropout before the head is optional.
"""

from __future__ import annotations

import torch
from hemaedge.export.models import register
from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("bloodcnn5", input_size=28)
class BloodCNN5(nn.Module):
    """5-layer CNN: conv-bn-relu x2, pool, conv-bn-relu x3, pool, FC head.

    Args:
        num_classes: Output classes (8 for BloodMNIST).
        width: Channel multiplier (1 = the published 16/32/64 net).
        in_size: Input side in pixels (28).
        hidden: Units of the hidden FC layer (0 = a single linear layer).
        dropout: Dropout before the classifier.
    """

    def __init__(
        self, num_classes: int = 8, width: float = 1.0, in_size: int = 28, hidden: int = 128, dropout: float = 0.0
    ):
        super().__init__()
        c1, c2, c3 = (int(round(c * width)) for c in (16, 32, 64))
        self.features = nn.Sequential(
            *_block(3, c1),
            *_block(c1, c1),
            nn.MaxPool2d(2),
            *_block(c1, c2),
            *_block(c2, c2),
            *_block(c2, c3),
            nn.MaxPool2d(2),
        )
        side = in_size // 4
        flat = c3 * side * side
        head: list[nn.Module] = [nn.Flatten()]
        if dropout:
            head.append(nn.Dropout(dropout))
        if hidden:
            head += [nn.Linear(flat, hidden), nn.ReLU(inplace=True)]
            if dropout:
                head.append(nn.Dropout(dropout))
            head.append(nn.Linear(hidden, num_classes))
        else:
            head.append(nn.Linear(flat, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``N x num_classes`` for ``N x 3 x in_size x in_size`` input."""
        return self.classifier(self.features(x))
