"""A tiny fully convolutional white-cell detector (CenterNet-style) in plain PyTorch.

The frame is first brought to the working scale (red cells ``rbc_px`` across, see
``hemaedge.edge.segment.scale``), so white cells are always about the same size in
working pixels and a small receptive field is enough. The net has four stride-2 stages
(/2, /4, /8, /16) and a two-step top-down path back to stride 4, where one 1x1 head
predicts per output cell:

* channel 0: white-cell centre heatmap logit (a Gaussian around each centre in training);
* channels 1-2: ``log`` of the box width and height in output cells (stride units);
* channels 3-4: sub-cell offset of the centre (0..1).

Only convolutions, batch norm (folded at export), ReLU, nearest upsampling and adds:
everything ONNX Runtime quantizes to INT8 and TensorRT builds.
"""

from __future__ import annotations

import torch
from torch import nn

STRIDE = 4
OUTPUTS = 5


def _cbr(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class WBCNet(nn.Module):
    """Centre heatmap + box size + offset at stride 4.

    Args:
        widths: Channels of the /2, /4, /8 and /16 stages.
        head: Channels of the stride-4 head (the /8 path has twice as many).
        depth16: 3x3 convolutions at stride 16 after the downsampling one.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (8, 16, 32, 64), head: int = 16, depth16: int = 2):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.widths, self.head_ch, self.depth16 = tuple(widths), head, depth16
        self.stem = _cbr(3, c1, 2)
        self.s4 = nn.Sequential(_cbr(c1, c2, 2), _cbr(c2, c2))
        self.s8 = nn.Sequential(_cbr(c2, c3, 2), _cbr(c3, c3))
        self.s16 = nn.Sequential(_cbr(c3, c4, 2), *[_cbr(c4, c4) for _ in range(depth16)])
        self.top16 = _cbr(c4, 2 * head, k=1)
        self.lat8 = _cbr(c3, 2 * head, k=1)
        self.fuse8 = _cbr(2 * head, 2 * head)
        self.top8 = _cbr(2 * head, head, k=1)
        self.lat4 = _cbr(c2, head, k=1)
        self.fuse4 = _cbr(head, head)
        self.out = nn.Conv2d(head, OUTPUTS, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        nn.init.constant_(self.out.bias, 0.0)
        with torch.no_grad():
            self.out.bias[0] = -4.0  # centres are rare: start the heatmap near 0 (focal-loss practice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N x 5 x H/4 x W/4`` for ``N x 3 x H x W`` input (H, W multiples of 16)."""
        f4 = self.s4(self.stem(x))
        f8 = self.s8(f4)
        f16 = self.s16(f8)
        p8 = self.fuse8(self.lat8(f8) + self.up(self.top16(f16)))
        p4 = self.fuse4(self.lat4(f4) + self.up(self.top8(p8)))
        return self.out(p4)

    def config(self) -> dict:
        """Keyword arguments that rebuild this architecture."""
        return {"widths": list(self.widths), "head": self.head_ch, "depth16": self.depth16}
