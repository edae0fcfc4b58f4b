"""EfficientNet-B0/B1/B2 in plain PyTorch, with torchvision's module tree.

torchvision cannot be installed on every workstation, but users bring
torchvision checkpoints. This module rebuilds the same module hierarchy, so a
``state_dict`` saved from ``torchvision.models.efficientnet_b0()`` loads here
key for key (``features.0.0.weight``, ``features.1.0.block.1.fc1.weight``,
``classifier.1.weight``, ...) and gives the same outputs (same BatchNorm eps
1e-5 and momentum 0.1 as torchvision uses for B0-B4, same SiLU, same padding).

Layout of ``features`` (as in torchvision):

* ``features.0``: stem, conv 3x3 stride 2 + BN + SiLU (``Sequential`` 0/1/2),
* ``features.1`` .. ``features.7``: the seven MBConv stages, each a
  ``Sequential`` of ``MBConv`` blocks whose ``block`` is
  ``[expand 1x1 (if ratio != 1)], depthwise kxk, SqueezeExcitation, project 1x1``,
* ``features.8``: head conv 1x1 to ``4 * last stage channels`` + BN + SiLU,

then ``avgpool`` and ``classifier = Sequential(Dropout, Linear)``.

One addition that has no parameters (so key names are unchanged):
``internal_size``. When set, the network bilinearly resizes its input to that
side before the stem, so a bundle keeps taking 256x256 crops while the
convolutions run at, e.g., 128x128 (4x fewer FLOPs). The resize is part of the
exported ONNX graph, so the station needs no change.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from hemaedge.export.models import register
from torch import nn

# (expand_ratio, kernel, stride, in_channels, out_channels, layers) per stage, EfficientNet paper Table 1.
_STAGES_B0 = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)

# name -> (width multiplier, depth multiplier, classifier dropout), as torchvision builds them.
VARIANTS: dict[str, tuple[float, float, float]] = {
    "efficientnet_b0": (1.0, 1.0, 0.2),
    "efficientnet_b1": (1.0, 1.1, 0.2),
    "efficientnet_b2": (1.1, 1.2, 0.3),
}

BN_EPS = 1e-5  # torchvision's B0-B4 use nn.BatchNorm2d defaults (B5+ use 1e-3)
BN_MOMENTUM = 0.1


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% below ``value``."""
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """conv (no bias) -> BatchNorm -> optional SiLU; children named 0, 1, 2 as torchvision's."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention: global pool -> 1x1 conv (fc1) -> SiLU -> 1x1 conv (fc2) -> sigmoid -> scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` scaled per channel by its squeeze-excitation weight."""
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class StochasticDepth(nn.Module):
    """Drop the residual branch per sample with probability ``p`` while training ("row" mode)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity in eval mode or when ``p == 0``; otherwise a per-sample Bernoulli mask scaled by 1/(1-p)."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MBConv(nn.Module):
    """Inverted residual block with squeeze-excitation (MBConv)."""

    def __init__(self, cin: int, cout: int, expand_ratio: float, kernel: int, stride: int, sd_prob: float):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
        self.use_res_connect = stride == 1 and cin == cout
        hidden = make_divisible(cin * expand_ratio)
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(ConvBNAct(cin, hidden, 1))
        layers.append(ConvBNAct(hidden, hidden, kernel, stride, groups=hidden))
        layers.append(SqueezeExcitation(hidden, max(1, cin // 4)))
        layers.append(ConvBNAct(hidden, cout, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, plus the input when the shapes allow a residual."""
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNet(nn.Module):
    """EfficientNet (v1) with torchvision's module names.

    Args:
        num_classes: Output classes.
        width_mult: Channel multiplier (B0 1.0, B1 1.0, B2 1.1).
        depth_mult: Layer-count multiplier (B0 1.0, B1 1.1, B2 1.2).
        dropout: Dropout before the classifier (torchvision: 0.2, 0.2, 0.3).
        stochastic_depth_prob: Largest drop-path probability (linearly ramped over blocks).
        internal_size: If set, resize the input bilinearly to this side before the stem
            (no parameters; the exported graph contains the resize).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
        internal_size: int | None = None,
    ):
        super().__init__()
        self.internal_size = int(internal_size) if internal_size else None
        stages = [
            (
                e,
                k,
                s,
                make_divisible(cin * width_mult),
                make_divisible(cout * width_mult),
                int(math.ceil(n * depth_mult)),
            )
            for e, k, s, cin, cout, n in _STAGES_B0
        ]
        total_blocks = sum(st[-1] for st in stages)
        layers: list[nn.Module] = [ConvBNAct(3, stages[0][3], 3, 2)]
        block_id = 0
        for e, k, s, cin, cout, n in stages:
            blocks = []
            for i in range(n):
                sd = stochastic_depth_prob * block_id / total_blocks
                blocks.append(MBConv(cin if i == 0 else cout, cout, e, k, s if i == 0 else 1, sd))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        last_in = stages[-1][4]
        last_out = 4 * last_in
        layers.append(ConvBNAct(last_in, last_out, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_out, num_classes))
        self._init_weights()
        # Depthwise convs train ~1.35x faster per CPU second in channels-last layout (measured, 1 thread).
        # Layout only: state_dict keys and values, ONNX export and results are unchanged.
        self.to(memory_format=torch.channels_last)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``N x num_classes`` for ``N x 3 x H x W`` normalised input."""
        if self.training:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.internal_size and (x.shape[-1] != self.internal_size or x.shape[-2] != self.internal_size):
            x = F.interpolate(x, size=(self.internal_size, self.internal_size), mode="bilinear", align_corners=False)
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _factory(name: str):
    width, depth, dropout = VARIANTS[name]

    def build(
        num_classes: int = 1000,
        dropout: float = dropout,
        stochastic_depth_prob: float = 0.2,
        internal_size: int | None = None,
        **unused: Any,
    ) -> EfficientNet:
        if unused:
            raise TypeError(f"{name}: unknown arguments {sorted(unused)}")
        return EfficientNet(num_classes, width, depth, dropout, stochastic_depth_prob, internal_size)

    build.__name__ = name
    build.__doc__ = f"{name}: width x{width}, depth x{depth}, dropout {dropout} (torchvision-compatible keys)."
    return build


efficientnet_b0 = register("efficientnet_b0", input_size=256)(_factory("efficientnet_b0"))
efficientnet_b1 = register("efficientnet_b1", input_size=256)(_factory("efficientnet_b1"))
efficientnet_b2 = register("efficientnet_b2", input_size=256)(_factory("efficientnet_b2"))


def load_torchvision_state_dict(
    model: EfficientNet, state_dict: dict[str, torch.Tensor], strict_head: bool = False
) -> list[str]:
    """Load a torchvision EfficientNet state_dict, tolerating a classifier of another size.

    Args:
        model: The target model (its classifier sets the class count).
        state_dict: Keys as torchvision writes them (``module.`` prefixes from DataParallel are stripped).
        strict_head: If True, a classifier shape mismatch raises instead of keeping the new head.

    Returns:
        The keys that were not loaded (classifier keys whose shape differs).
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = model.state_dict()
    skipped = [
        k for k in ("classifier.1.weight", "classifier.1.bias") if k in sd and k in own and sd[k].shape != own[k].shape
    ]
    if skipped and strict_head:
        raise ValueError(
            f"classifier shape differs: {[tuple(sd[k].shape) for k in skipped]} vs "
            f"{[tuple(own[k].shape) for k in skipped]}"
        )
    for k in skipped:
        sd.pop(k)
    model.load_state_dict(sd, strict=not skipped)
    missing = set(own) - set(sd)
    if missing - set(skipped):
        raise KeyError(f"state_dict lacks {sorted(missing - set(skipped))[:5]} ...")
    return skipped
