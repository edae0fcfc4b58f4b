"""A small all-ReLU CNN for station crops (32-128 px), registered-architecture style.

Designed for the multi-source station model (``edge/models/hemanet64``; ``docs/models.md``): trained on crops cut
the station's way from PBC, DeepAPL and BCCD with wide photometric augmentation.

Layout (every conv is conv3x3 (no bias) + BatchNorm + ReLU, so BN folds into the conv at export
and ONNX Runtime fuses conv+ReLU; INT8 QDQ quantizes it cleanly; no depthwise, no SiLU/sigmoid):

    stem   conv s2                 3 -> c1      (S/2)
    stage1 conv, maxpool           c1 -> c1     (S/4)
    stage2 conv, conv, maxpool     c1 -> c2     (S/8)
    stage3 conv, conv, maxpool     c2 -> c3     (S/16)
    stage4 conv                    c3 -> c4
    head   global average pool, dropout, linear c4 -> classes

Channels ``(16, 32, 64, 128) * width``. The global pool makes the net input-size agnostic, so one
definition serves 32/48/64/96 px. At 64 px, width 1: ~22 MFLOPs (multiply-adds x2).
"""

from __future__ import annotations

import torch
from hemaedge.export.models import register
from torch import nn


def _cbr(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("hemanet", input_size=64)
class HemaNet(nn.Module):
    """Small ReLU CNN, see module docstring.

    Args:
        num_classes: Output classes.
        width: Channel multiplier on (16, 32, 64, 128).
        in_size: Nominal input side (informational; the net accepts any side >= 32).
        dropout: Dropout before the classifier.
    """

    def __init__(self, num_classes: int = 8, width: float = 1.0, in_size: int = 64, dropout: float = 0.2):
        super().__init__()
        c1, c2, c3, c4 = (max(8, int(round(c * width))) for c in (16, 32, 64, 128))
        self.in_size = in_size
        self.features = nn.Sequential(
            *_cbr(3, c1, 2),
            *_cbr(c1, c1),
            nn.MaxPool2d(2),
            *_cbr(c1, c2),
            *_cbr(c2, c2),
            nn.MaxPool2d(2),
            *_cbr(c2, c3),
            *_cbr(c3, c3),
            nn.MaxPool2d(2),
            *_cbr(c3, c4),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(c4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``N x num_classes`` for ``N x 3 x S x S`` input."""
        return self.fc(self.drop(torch.flatten(self.pool(self.features(x)), 1)))


def flops(model: nn.Module, size: int) -> int:
    """Multiply-adds x 2 of conv and linear layers for one ``3 x size x size`` input."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hs:
        h.remove()
    return total
