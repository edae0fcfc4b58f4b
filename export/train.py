"""Training recipes for registered architectures (``hemaedge train``).

A batch goes the station's way: raw pixels (resized exactly as ``preprocess`` resizes) are augmented
first, then pass through the runtime's own ``preprocess`` (white balance when the bundle has it,
mean/std), as the station does on each crop it cuts; so training, calibration and the station see
identical inputs, and colour augmentation meets the white balance the station applies.

Training data may come from several sources (``Recipe.data`` and ``Recipe.more_data``, each
``PATH[:WEIGHT]``): each is an ``.npz`` or a class-folder tree whose classes are matched to the first
source's by the canonical vocabulary (a finer class joins its clinical group's one model class:
``promyelocyte`` -> ``ig``; classes with no model class are dropped and reported). Every epoch draws
its samples by source weight; each source's ``val`` split is scored every epoch. With ``ema`` the
evaluated and saved weights are an exponential moving average of the trained ones.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hemaedge.calibration.datasets import ImageSet, load_folder, open_dataset, session_stain, set_stain_vectors
from hemaedge.edge.bundle.manifest import InputSpec, stain_fields
from hemaedge.edge.bundle.preprocess import StainEstimate, normalise_stain_u8, preprocess
from hemaedge.edge.errors import UsageError
from hemaedge.export import checkpoint
from hemaedge.export.models import DEFAULTS, build
from torch import nn


@dataclass
class Recipe:
    """Everything that defines a training run (saved in the checkpoint and log, and from there in the bundle)."""

    arch: str = "bloodcnn5"
    data: str = ""  # the first source, PATH[:WEIGHT]; its classes are the model's
    out: str = "runs/bloodcnn5"
    epochs: int = 20
    batch: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    aug: tuple[str, ...] = ("flip", "rot90")
    aug_strength: float = 1.0
    balanced: bool = False
    early_stop: int = 0
    label_smoothing: float = 0.0
    img_size: int = 0
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    threads: int = 0
    workers: int = 0
    max_minutes: float = 0.0
    white_balance: bool = False
    stain_ref: float = 0.0  # session stain normalisation (0: off); each source is one session
    stain_gain_range: tuple[float, float] = (0.5, 2.0)
    stain_hue: bool = False  # also map each session's two stains onto the first source's (needs stain_ref)
    stain_hue_tolerance: float = 0.0  # degrees a session's stain may differ from the reference unmapped
    extra_data: tuple[str, ...] = ()
    extra_repeat: int = 1
    init: str = ""
    more_data: tuple[str, ...] = ()  # further sources, PATH[:WEIGHT] each
    samples: int = 0  # samples per epoch (0: as many as the sources hold)
    ema: float = 0.0  # EMA decay of the weights (0: off); the evaluated and saved weights are the EMA ones


# ---------------------------------------------------------------------------------------------------------------
# Augmentation: on *raw* ``N x 3 x H x W`` RGB batches in 0..1, before white balance and mean/std (``to_model_input``
# then runs the station's own ``preprocess`` on them, as the station does on each crop it cuts).

GEOMETRIC = ("flip", "rot90", "rotate", "zoom")
# photometric ops in physical order: stain chemistry, lamp, camera response, colour, optics, sensor, codec
PHOTOMETRIC = ("stainrot", "od", "odres", "stain", "gain", "color", "gamma", "hue", "gray", "blur", "noise", "jpeg")
AUGMENTATIONS = GEOMETRIC + PHOTOMETRIC

# H&E(-DAB) stain optical-density vectors (Ruifrok & Johnston), rows = stains, unit length
_RGB_FROM_HED = torch.nn.functional.normalize(
    torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]), dim=1
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def _u(gen: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)


def _logu(gen: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return torch.exp(_u(gen, n, math.log(lo), math.log(hi), *shape))


def geometric(
    x: torch.Tensor, gen: torch.Generator, zoom: bool = True, rotate: bool = True, shift: float = 0.08
) -> torch.Tensor:
    """Random scale 0.8-1.25 (log-uniform; > 1 shows the cell larger) and shift (``zoom``), any rotation angle
    (``rotate``); borders reflected. The station's framing is the identity."""
    n = x.shape[0]
    s = _logu(gen, n, 0.8, 1.25) if zoom else torch.ones(n)
    ang = _u(gen, n, 0, 2 * math.pi) if rotate else torch.zeros(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(ang) / s
    theta[:, 0, 1] = -torch.sin(ang) / s
    theta[:, 1, 0] = torch.sin(ang) / s
    theta[:, 1, 1] = torch.cos(ang) / s
    if zoom:
        theta[:, :, 2] = shift * (torch.rand(n, 2, generator=gen) * 2 - 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


STAINROT_DEG = 10.0  # ``stainrot`` turns each stain by up to this many degrees (times the augmentation strength)


def stain_rotate(x: torch.Tensor, gen: torch.Generator, stains: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """``stainrot``: another lab's dyes. Each sample's optical density is split on its session's two stains
    (``stains``, ``N x 2 x 3`` unit rows, nuclear and eosin, as ``stain_vectors`` measures them) into amounts and a
    residual, and put back with each stain's colour turned by up to ``STAINROT_DEG * s`` degrees, independently, in
    a random direction: the same cell stained with a different azure/eosin batch or buffer, which per-stain scaling
    on a fixed basis (``od``) does not make. A sample whose stains are unknown (all zero) is left as it is."""
    n, _, h, w = x.shape
    known = stains.flatten(1).abs().sum(1) > 0
    v = torch.where(known[:, None, None], stains.to(x.dtype), torch.eye(3, dtype=x.dtype)[:2].expand(n, 2, 3))
    od = -torch.log10(x.clamp(1 / 255, 1)).permute(0, 2, 3, 1).reshape(n, h * w, 3)
    amount = od @ torch.linalg.pinv(v)  # N x P x 2
    residual = od - amount @ v
    u = torch.randn(n, 2, 3, generator=gen, dtype=x.dtype)
    u = u - (u * v).sum(-1, keepdim=True) * v  # a direction at right angles to each stain
    u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    th = _u(gen, n, 0, STAINROT_DEG * s, 2, 1).to(x.dtype) * math.pi / 180 * known[:, None, None]
    turned = torch.cos(th) * v + torch.sin(th) * u
    turned = turned / turned.norm(dim=-1, keepdim=True)
    out = torch.pow(10.0, -(amount @ turned + residual).clamp(min=0)).reshape(n, h, w, 3).permute(0, 3, 1, 2)
    return torch.where(known[:, None, None, None], out.clamp(0, 1), x)


def od_jitter(
    x: torch.Tensor, gen: torch.Generator, s: float = 1.0, strength: tuple[float, float] = (0.4, 1.6)
) -> torch.Tensor:
    """Stain chemistry (Tellez et al. 2018): in optical density, per-stain scale ``1 +- 0.3 s`` and bias
    ``+- 0.08 s`` on an H&E-like basis, times a stain-strength factor in ``strength^s`` (``[0.4, 1.6]``: pale to
    heavy smears). ``s = 0`` is the identity."""
    n = x.shape[0]
    od = -torch.log10(x.clamp(1 / 255, 1))
    hed = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB)
    a = _u(gen, n, 1 - 0.3 * s, 1 + 0.3 * s, 3, 1, 1) * _logu(gen, n, strength[0] ** s, strength[1] ** s, 1, 1, 1)
    b = _u(gen, n, -0.08 * s, 0.08 * s, 3, 1, 1) * (od.sum(1, keepdim=True) > 0.15)  # bias only where stained
    od = torch.einsum("ndhw,dc->nchw", hed * a + b, _RGB_FROM_HED).clamp(min=0)
    return torch.pow(10.0, -od).clamp(0, 1)


def stain_jitter(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """``stain``, the earlier all-in-one jitter: saturation x0.35-1.3, gamma 0.6-1.5, channel gains x0.85-1.15,
    brightness x0.85-1.1 (ranges at ``s = 1``)."""
    n = x.shape[0]
    grey = x.mean(1, keepdim=True)
    x = grey + _u(gen, n, 1 - 0.65 * s, 1 + 0.3 * s, 1, 1, 1) * (x - grey)
    x = x.clamp(1e-4, 1) ** _logu(gen, n, 0.6**s, 1.5**s, 1, 1, 1)
    return (x * _u(gen, n, 1 - 0.15 * s, 1 + 0.15 * s, 3, 1, 1) * _u(gen, n, 1 - 0.15 * s, 1 + 0.1 * s, 1, 1, 1)).clamp(
        0, 1
    )


def channel_gain(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """Lamp colour / camera white balance: per-channel gain in ``[0.7, 1.3]^s``, brightness ``[0.75, 1.2]^s``."""
    n = x.shape[0]
    return (x * _logu(gen, n, 0.7**s, 1.3**s, 3, 1, 1) * _logu(gen, n, 0.75**s, 1.2**s, 1, 1, 1)).clamp(0, 1)


def colour_jitter(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """``color``: per-channel gain ``1 +- 0.15 s`` and offset ``+- 0.04 s``."""
    n = x.shape[0]
    return (x * _u(gen, n, 1 - 0.15 * s, 1 + 0.15 * s, 3, 1, 1) + _u(gen, n, -0.04 * s, 0.04 * s, 3, 1, 1)).clamp(0, 1)


def gamma_contrast(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """Camera response: gamma in ``[0.6, 1.6]^s`` and contrast about mid-grey in ``[0.75, 1.3]^s``."""
    n = x.shape[0]
    x = x.clamp(1e-4, 1) ** _logu(gen, n, 0.6**s, 1.6**s, 1, 1, 1)
    return ((x - 0.5) * _logu(gen, n, 0.75**s, 1.3**s, 1, 1, 1) + 0.5).clamp(0, 1)


def saturation_hue(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """Saturation x ``[0.5, 1.6]^s`` and a hue rotation of ``+- 25 s`` degrees about the grey axis."""
    n = x.shape[0]
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * _logu(gen, n, 0.5**s, 1.6**s, 1, 1, 1)
    ang = _u(gen, n, -25 * s, 25 * s) * math.pi / 180
    k = torch.full((3,), 1 / math.sqrt(3))
    kx = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    c, si = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
    r = c * torch.eye(3) + si * kx + (1 - c) * torch.outer(k, k)  # Rodrigues rotation about the grey axis
    return torch.einsum("nij,njhw->nihw", r, x).clamp(0, 1)


def grayscale(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """Luminance on all three channels for a fraction ``0.1 s`` of the batch."""
    m = (torch.rand(x.shape[0], generator=gen) < 0.1 * s)[:, None, None, None]
    g = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    return torch.where(m, g, x)


def blur(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """Defocus: Gaussian blur, sigma uniform in ``[0.3, 0.3 + 0.9 s]`` pixels, on half the batch."""
    n, c, h, w = x.shape
    sig = _u(gen, n, 0.3, 0.3 + 0.9 * s)
    on = torch.rand(n, generator=gen) < (0.5 if s > 0 else 0.0)
    r = min(3, (min(h, w) - 1) // 2)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sig[:, None] ** 2))
    k = torch.where(on[:, None], k / k.sum(1, keepdim=True), (t[None] == 0).to(x.dtype)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(F.conv2d(y, k[:, None, None, :], groups=n * c), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w).clamp(0, 1)


def noise(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """Sensor noise: Gaussian, standard deviation uniform in ``[0, 0.03 s]``."""
    sd = _u(gen, x.shape[0], 0, 0.03 * s, 1, 1, 1)
    return (x + sd * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def _dct8() -> torch.Tensor:
    i = torch.arange(8.0)
    m = torch.cos((2 * i[None] + 1) * i[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] = math.sqrt(1 / 8)
    return m


_D8 = _dct8()
# the JPEG standard's luminance and chrominance quantisation tables (quality 50)
_QY = torch.tensor(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29]
    + [51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121]
    + [120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=torch.float32,
).view(8, 8)
_QC = torch.full((8, 8), 99.0)
_QC[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])


def jpeg(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """Codec: on half the batch, YCbCr, 8x8 DCT quantised with the standard tables at a quality uniform in
    ``[95 - 65 s, 95]`` (libjpeg scaling), and back: block artefacts and chroma loss."""
    n, _, h, w = x.shape
    on = torch.rand(n, generator=gen) < (0.5 if s > 0 else 0.0)
    q = _u(gen, n, 95 - 65 * min(s, 1.3), 95)[on]
    if not on.any():
        return x
    v = x[on] * 255
    m = v.shape[0]
    ycc = (
        torch.einsum(
            "ij,njhw->nihw",
            torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]),
            v,
        )
        + torch.tensor([0.0, 128.0, 128.0])[None, :, None, None]
    )
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q) / 100
    ph, pw = (-h) % 8, (-w) % 8
    t = F.pad(ycc - 128, (0, pw, 0, ph), mode="replicate")
    hh, ww = t.shape[2:]
    blocks = t.reshape(m, 3, hh // 8, 8, ww // 8, 8).permute(0, 1, 2, 4, 3, 5)
    table = torch.stack([_QY, _QC, _QC])[None, :, None, None] * scale[:, None, None, None, None, None]
    qt = table.clamp(min=1)
    coef = torch.round((_D8 @ blocks @ _D8.T) / qt) * qt
    rec = (_D8.T @ coef @ _D8).permute(0, 1, 2, 4, 3, 5).reshape(m, 3, hh, ww)[:, :, :h, :w] + 128
    rgb = torch.einsum(
        "ij,njhw->nihw",
        torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]]),
        rec - torch.tensor([0.0, 128.0, 128.0])[None, :, None, None],
    )
    out = x.clone()
    out[on] = (rgb / 255).clamp(0, 1)
    return out


def od_residual(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """``od`` with the stain-strength factor narrowed to ``[0.8, 1.25]^s``: for ``--stain-norm``, where the session's
    normalisation removes a slide's stain strength and what is left is the error of measuring it."""
    return od_jitter(x, gen, s, (0.8, 1.25))


_PHOTOMETRIC_OPS = {
    "od": od_jitter,
    "odres": od_residual,
    "stain": stain_jitter,
    "gain": channel_gain,
    "color": colour_jitter,
    "gamma": gamma_contrast,
    "hue": saturation_hue,
    "gray": grayscale,
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
}


def check_aug(aug: tuple[str, ...]) -> tuple[str, ...]:
    """``aug`` itself, or a UsageError naming what is unknown (before any data is read)."""
    unknown = [a for a in aug if a not in AUGMENTATIONS]
    if unknown:
        raise UsageError(f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
    return aug


def set_stains(images: ImageSet, size: int) -> torch.Tensor:
    """A set's two stains taken as one session (``2 x 3``, as ``stainrot`` wants them; zeros when there are too few
    stained pixels to measure them, which ``stainrot`` leaves unturned)."""
    vectors = set_stain_vectors(images, InputSpec(height=size, width=size))
    return torch.zeros(2, 3) if vectors is None else torch.from_numpy(np.asarray(vectors, np.float32))


def augment(
    x: torch.Tensor,
    aug: tuple[str, ...],
    gen: torch.Generator,
    strength: float = 1.0,
    stains: torch.Tensor | None = None,
) -> torch.Tensor:
    """Augment a raw ``N x 3 x H x W`` RGB batch in 0..1 (before white balance and mean/std): geometry first
    (``flip``, ``rot90``, ``rotate``, ``zoom``), then the photometric ops named in ``aug`` in physical order
    (``PHOTOMETRIC``; ``strength`` scales their ranges, 0 leaves the pixels alone). ``stainrot`` needs each
    sample's session stains (``stains``, ``N x 2 x 3``). Returns raw pixels in 0..1."""
    n = x.shape[0]
    if "zoom" in aug or "rotate" in aug:
        x = geometric(x, gen, zoom="zoom" in aug, rotate="rotate" in aug)
    if "flip" in aug:
        x = torch.where((torch.rand(n, generator=gen) < 0.5)[:, None, None, None], x.flip(3), x)
    if "rot90" in aug and x.shape[2] == x.shape[3]:
        k = torch.randint(0, 4, (n,), generator=gen)
        out = x.clone()
        for r in (1, 2, 3):
            if (k == r).any():
                out[k == r] = torch.rot90(x[k == r], r, (2, 3))
        x = out
    for name in PHOTOMETRIC:
        if name == "stainrot" and name in aug:
            if stains is None:
                raise ValueError("the stainrot augmentation needs each sample's session stains")
            x = stain_rotate(x, gen, stains, strength)
        elif name in aug:
            x = _PHOTOMETRIC_OPS[name](x, gen, strength)
    return x.clamp(0, 1)


def to_model_input(raw: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Raw ``N x 3 x H x W`` pixels in 0..1 at model size -> the model's input, through the station's own
    ``preprocess`` (white balance, mean/std) on the uint8 crop a camera would have given."""
    u8 = (raw * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return torch.from_numpy(preprocess(u8, spec))


def raw_pixels(images: Sequence[np.ndarray] | np.ndarray, size: int) -> np.ndarray:
    """``N x size x size x 3`` uint8: images resized exactly as ``preprocess`` resizes them, nothing else."""
    x = preprocess(images, InputSpec(height=size, width=size))  # mean 0, std 1, no white balance: pixels / 255
    return np.rint(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Sources: labelled sets aligned to the model's classes, sampled by weight


def parse_source(spec: str) -> tuple[str, float | None]:
    """``"PATH[:WEIGHT]"`` -> ``(PATH, WEIGHT or None)``; a suffix that is not a positive number stays in the path."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            w = float(tail)
        except ValueError:
            return spec, None
        if not w > 0:
            raise UsageError(f"source weight must be positive: {spec!r}")
        return path, w
    return spec, None


def class_map(have: Sequence[str], classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """For each class of a source, the index of the model class it trains (-1: dropped), and the dropped names.

    A class matches a model class of the same name or spelling (``ig`` is ``immature granulocyte``); otherwise, when
    exactly one model class is in its clinical group, that one (``neutrophil_segmented`` -> ``neutrophil``,
    ``promyelocyte`` -> ``ig``, ``giant_platelet`` -> ``platelet``); otherwise it is dropped (``blast`` for an
    8-class model).
    """
    from hemaedge.edge.bundle.class_groups import default_class_groups, group_of
    from hemaedge.edge.bundle.vocabulary import canonical_classes, canonical_or_same, same_class

    canon = canonical_classes(classes)
    groups = default_class_groups(canon)
    out, dropped = [], []
    for name in have:
        i = next((k for k, c in enumerate(classes) if same_class(name, c)), None)
        if i is None:
            members = groups.get(group_of(canonical_or_same(name)) or "", [])
            i = canon.index(members[0]) if len(members) == 1 else None
        out.append(-1 if i is None else i)
        if i is None:
            dropped.append(name)
    return np.asarray(out, np.int64), dropped


class _RawSet(torch.utils.data.Dataset):
    """Raw uint8 pixels at model size, labels in the model's classes, and the source index of each image.

    Held in memory when under ``budget`` bytes (decoded once), else decoded per item.
    """

    def __init__(
        self,
        images: ImageSet,
        size: int,
        source: int,
        budget: float = 1.5e9,
        stain: InputSpec | None = None,
        measure_stains: bool = False,
    ):
        self.images, self.size, self.source = images, size, source
        self.array = None
        self.spec = stain  # with ``stain`` (a spec with stain_ref) the set is one session, normalised before augmenting
        self.stain = session_stain(images, stain) if stain is not None and stain.stain_ref else None
        self.stains = set_stains(images, size) if measure_stains else torch.zeros(2, 3)  # for ``stainrot``
        if len(images) * size * size * 3 <= budget:
            idx = np.arange(len(images))
            self.array = np.concatenate([self._raw(images.images(idx[s : s + 256])) for s in range(0, len(idx), 256)])

    def _raw(self, images: Sequence[np.ndarray]) -> np.ndarray:
        x = raw_pixels(images, self.size)
        return x if self.stain is None else normalise_stain_u8(x, self.stain, self.spec)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.array[i] if self.array is not None else self._raw([self.images.image(i)])[0]
        return torch.from_numpy(np.ascontiguousarray(x)), int(self.images.labels[i]), self.source, self.stains


@dataclass
class Source:
    """One training source: its images (``parts``, each with a per-image repeat), share of an epoch, val split."""

    name: str
    path: str
    weight: float | None
    parts: list[tuple[ImageSet, float]]
    val: ImageSet | None
    dropped: dict[str, int]

    def describe(self) -> dict[str, Any]:
        """What the checkpoint and the bundle's provenance record about this source."""
        return {
            "name": self.name,
            "path": self.path,
            "weight": self.weight,
            "train_images": sum(len(p) for p, _ in self.parts),
            "train_digest": self.parts[0][0].digest,
            "val_images": len(self.val) if self.val is not None else 0,
            "val_digest": self.val.digest if self.val is not None else None,
            "dropped": self.dropped,
        }


def _has_val(path: Path) -> bool:
    if path.suffix.lower() == ".npz":
        with np.load(path) as z:
            return "val_images" in z.files
    return (path / "val").is_dir()


def _aligned(images: ImageSet, classes: Sequence[str], split: str) -> tuple[ImageSet, dict[str, int]]:
    mapping, dropped = class_map(images.classes, classes)
    new = np.where(images.labels >= 0, mapping[np.maximum(images.labels, 0)], -1)
    keep = np.flatnonzero(new >= 0)
    counts = {n: int((images.labels == k).sum()) for k, n in enumerate(images.classes) if n in dropped}
    if len(keep) == 0:
        raise UsageError(f"{images.name} ({split}) holds none of the model's classes {list(classes)}")
    sub = images if len(keep) == len(images) else images.subset(keep)
    return ImageSet(sub.name, tuple(classes), new[keep], sub.array, sub.paths, sub.digest), counts


def open_sources(recipe: Recipe) -> tuple[tuple[str, ...], list[Source]]:
    """The model's classes (the first source's) and every source, aligned to them.

    Raises:
        UsageError: weights given for some sources and not others, a source with none of the classes.
    """
    specs = [recipe.data, *recipe.more_data]
    parsed = [parse_source(s) for s in specs]
    if len({w is None for _, w in parsed}) > 1:
        raise UsageError("give a weight to every --data source (PATH:WEIGHT) or to none (shares follow sizes)")
    first = open_dataset(parsed[0][0], "train")
    classes = first.classes
    sources, names = [], []
    for k, (path, weight) in enumerate(parsed):
        p = Path(path)
        npz = p.suffix.lower() == ".npz"
        name = p.stem if npz else p.name
        name = name if name not in names else f"{name}#{k}"
        names.append(name)
        own = first if k == 0 else open_dataset(p, "train")
        tr, dropped = _aligned(own, classes, "train")
        va = (
            _aligned(open_dataset(p, "val", classes=own.classes if npz else None), classes, "val")[0]
            if _has_val(p)
            else None
        )
        sources.append(Source(name, str(path), weight, [(tr, 1.0)], va, dropped))
    for path in recipe.extra_data:  # crops from the station's own microscope, seen extra_repeat times an epoch
        ex = load_folder(path, None, classes=classes)
        sources[0].parts.append((ex, float(recipe.extra_repeat)))
    return classes, sources


def sample_weights(sources: list[Source], balanced: bool) -> np.ndarray:
    """Sampling weight of every training image, sources and their parts concatenated in order.

    A source's images together get its share of each epoch: its weight over all weights, or, when no weight is
    given, its size (with repeats) over all sizes. Inside a source an image counts its part's repeat, and with
    ``balanced`` one over its class's count.
    """
    out = []
    sizes = [sum(len(p) * r for p, r in s.parts) for s in sources]
    shares = [s.weight if s.weight is not None else float(n) for s, n in zip(sources, sizes)]
    total = sum(shares)
    for s, share in zip(sources, shares):
        w = np.concatenate([np.full(len(p), r, np.float64) for p, r in s.parts])
        if balanced:
            labels = np.concatenate([p.labels for p, _ in s.parts])
            w = w / np.maximum(np.bincount(labels)[labels], 1)
        out.append(w / w.sum() * share / total)
    return np.concatenate(out)


class Ema:
    """Exponential moving average of all weights and batch-norm statistics; decay ``min(decay, (1+t)/(10+t))``, so
    a short run is not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.t = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.t += 1
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)
            else:
                e.copy_(m)


def _stats(data: torch.utils.data.Dataset, weights: np.ndarray, size: int, white_balance: bool, n: int = 2000):
    """Per-channel mean/std of training pixels as the model will see them (white-balanced when the bundle is), over
    images drawn as training draws them."""
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(weights), size=min(n, len(weights)), replace=False, p=weights / weights.sum()))
    raw = np.stack([data[int(i)][0].numpy() for i in idx])
    x = preprocess(raw, InputSpec(height=size, width=size, white_balance=white_balance))
    return tuple(float(v) for v in x.mean((0, 2, 3))), tuple(float(v) for v in x.std((0, 2, 3)))


def stage_lineage(path: str | Path, ck: dict) -> list[dict]:
    """The training stages behind checkpoint ``ck`` (read from ``path``), oldest first, itself last.

    A fine-tuned model (``--init``) records this, so its bundle says every recipe that made it,
    not only the last one.
    """
    from hemaedge.edge.bundle import sha256_file

    own = {
        "checkpoint": str(path),
        "sha256": sha256_file(path),
        "recipe": ck.get("recipe"),
        "epoch": ck.get("epoch"),
        "metrics": ck.get("metrics"),
    }
    return [*(ck.get("lineage") or []), own]


class _FolderData(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, spec: InputSpec, stain: StainEstimate | None = None):
        self.images, self.spec, self.stain = images, spec, stain

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = preprocess([self.images.image(i)], self.spec, session=self.stain)[0]
        return torch.from_numpy(x), int(self.images.labels[i])


def _val_loader(images: ImageSet, spec: InputSpec, workers: int):
    """Validation batches through the station's ``preprocess`` (in memory for npz sets, decoded for folders); with
    session stain normalisation the set is one session, as ``evaluate --station`` takes a labelled set."""
    stain = session_stain(images, spec) if spec.stain_ref else None
    if images.array is not None:
        data = torch.utils.data.TensorDataset(
            torch.from_numpy(preprocess(images.array, spec, session=stain)), torch.from_numpy(images.labels)
        )
    else:
        data = _FolderData(images, spec, stain)
    return torch.utils.data.DataLoader(data, batch_size=256, num_workers=workers, persistent_workers=workers > 0)


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over a loader."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(torch.softmax(model(x), 1).numpy())
        labels.append(np.asarray(y))
    return np.concatenate(probs), np.concatenate(labels)


@dataclass
class _TrainData:
    """The training sources, concatenated, and how an epoch draws from them."""

    classes: tuple[str, ...]
    sources: list[Source]
    data: torch.utils.data.ConcatDataset  # every source's parts, in order
    weights: np.ndarray  # sampling weight of every image in ``data``
    samples: int  # samples per epoch
    plain: bool  # one part drawn once an epoch, unweighted: shuffled rather than sampled
    size: int  # the model's input side
    mean: tuple[float, ...]  # of the training pixels as the model sees them
    std: tuple[float, ...]
    stain: InputSpec  # the session stain normalisation the sources were trained with (its stain_* fields)


@dataclass
class _Net:
    """The model, the input it is trained on, and the training stages behind its initial weights (``--init``)."""

    model: nn.Module
    spec: InputSpec
    lineage: list[dict]


@dataclass
class _Loaders:
    train: torch.utils.data.DataLoader
    val: dict[str, torch.utils.data.DataLoader]  # per source that has a val split


@dataclass
class _Fit:
    """How the weights are fitted: optimizer, LR schedule, loss, the augmentation's generator and the EMA."""

    opt: torch.optim.Optimizer
    sched: Any  # the LR scheduler; None for schedule "none"
    per_step: bool  # the schedule steps every batch (else, plateau, once an epoch on the val accuracy)
    loss_fn: nn.Module
    gen: torch.Generator
    ema: Ema | None


@dataclass
class _RunState:
    """Where the run stands (saved in ``last.pt``): the first epoch to run, the best mean val accuracy, its epoch
    and the epochs since it improved."""

    start: int = 0
    best: float = -1.0
    best_epoch: int = -1
    stale: int = 0


@dataclass
class _Epoch:
    """One epoch's training numbers."""

    loss: float  # mean over the samples seen
    acc: float
    drawn: np.ndarray  # samples drawn from each source


def train(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Train; score each source's val split every epoch; write ``best.pt`` (best mean val accuracy over the sources
    that have one), ``final.pt`` (the last epoch's weights: with ``ema`` the run's model, no epoch picking) and a
    log line per epoch; resumable from ``out/last.pt``.

    Returns:
        A summary dict (best epoch, val accuracy per source, paths, minutes).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out = _start(recipe)
    d = _open_data(recipe)
    net = _build_model(recipe, d)
    loaders = _loaders(recipe, d, net.spec)
    fit = _fit(recipe, net.model, len(loaders.train))
    state = _resume(out / "last.pt", net.model, fit)
    meta = _checkpoint_meta(recipe, d, net)
    for s in d.sources:
        if s.dropped:
            print(f"{s.name}: classes not in the model, left out: {s.dropped}", file=sys.stderr)
    log = open(out / "train.log.jsonl", "a", encoding="utf-8")
    t0 = time.time()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        ep_task = bar.add_task("epochs", total=recipe.epochs, completed=state.start, info="")
        for epoch in range(state.start, recipe.epochs):
            ep = _train_epoch(recipe, net, loaders.train, fit, len(d.sources), bar, epoch)
            final = fit.ema.module if fit.ema is not None else net.model
            val = {name: _accuracy(final, vl) for name, vl in loaders.val.items()}
            val_acc = float(np.mean(list(val.values()))) if val else None
            state = _keep_best(out, epoch, final, fit, state, meta, val, val_acc)
            _log_epoch(log, epoch, ep, val, val_acc, d.sources, fit, state, t0)
            _save_epoch(out, epoch, net.model, final, fit, state, meta, val, val_acc)
            per_source = " ".join(f"{k} {v:.4f}" for k, v in val.items())
            bar.update(ep_task, advance=1, info=f"val {per_source or 'none'}")
            if progress:
                bar.console.print(f"epoch {epoch + 1}: loss {ep.loss:.3f}, val {per_source or '(no val split)'}")
            if recipe.early_stop and state.stale >= recipe.early_stop:
                break
            if recipe.max_minutes and (time.time() - t0) / 60 > recipe.max_minutes:
                break
    log.close()
    return {
        "best_checkpoint": str(out / "best.pt") if state.best_epoch >= 0 else None,
        "final_checkpoint": str(out / "final.pt"),
        "best_epoch": state.best_epoch + 1 if state.best_epoch >= 0 else None,
        "val_accuracy": state.best if state.best_epoch >= 0 else None,
        "minutes": round((time.time() - t0) / 60, 2),
        "log": str(out / "train.log.jsonl"),
    }


def _start(recipe: Recipe) -> Path:
    """Refuse a bad recipe, set the threads and seeds, and make the output folder (returned)."""
    check_aug(recipe.aug)
    if not 0 <= recipe.ema < 1:
        raise UsageError(f"--ema must be in [0, 1) (0: off), not {recipe.ema}")
    if recipe.aug_strength < 0:
        raise UsageError(f"--aug-strength must be >= 0, not {recipe.aug_strength}")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _stain_spec(recipe: Recipe, size: int, first: ImageSet) -> InputSpec:
    """The session stain normalisation the sources are trained with; with ``stain_hue`` the reference stains are
    the first source's own (its first part's)."""
    vectors: tuple = ()
    if recipe.stain_hue:
        if not recipe.stain_ref:
            raise UsageError(
                "--stain-hue maps each session's stains as part of --stain-norm: pass --stain-norm REF too"
            )
        ref = set_stain_vectors(first, InputSpec(height=size, width=size))
        if ref is None:
            raise UsageError(f"--stain-hue: too few stained pixels in {first.name} to measure its two stains")
        vectors = tuple(tuple(round(float(x), 6) for x in v / np.linalg.norm(v)) for v in ref)
    return InputSpec(
        height=size,
        width=size,
        stain_ref=recipe.stain_ref,
        stain_gain_range=tuple(recipe.stain_gain_range),
        stain_vectors=vectors,
        stain_hue_tolerance=recipe.stain_hue_tolerance if vectors else 0.0,
    )


def _open_data(recipe: Recipe) -> _TrainData:
    """Open every source, concatenate their training parts, weigh their images and measure the pixels' mean/std."""
    classes, sources = open_sources(recipe)
    first = sources[0].parts[0][0]
    size = recipe.img_size or DEFAULTS.get(recipe.arch, {}).get("input_size") or first.image(0).shape[0]
    parts = [p for s in sources for p, _ in s.parts]
    src_of = [k for k, s in enumerate(sources) for _ in s.parts]
    stain = _stain_spec(recipe, size, first)
    rot = "stainrot" in recipe.aug
    data = torch.utils.data.ConcatDataset(
        [_RawSet(p, size, k, stain=stain, measure_stains=rot) for p, k in zip(parts, src_of)]
    )
    weights = sample_weights(sources, recipe.balanced)
    samples = recipe.samples or int(round(sum(len(p) * r for s in sources for p, r in s.parts)))
    mean, std = _stats(data, weights, size, recipe.white_balance)
    plain = len(parts) == 1 and not recipe.balanced and samples == len(data)
    return _TrainData(classes, sources, data, weights, samples, plain, size, mean, std, stain)


def _build_model(recipe: Recipe, d: _TrainData) -> _Net:
    """Build the architecture; with ``--init`` start from another run's weights and keep their normalisation."""
    model = build(recipe.arch, len(d.classes), **recipe.arch_kwargs)
    mean, std = d.mean, d.std
    lineage: list[dict] = []
    if recipe.init:  # fine-tune: start from another run's weights (same architecture, same classes)
        init = checkpoint.load(recipe.init)
        lineage = stage_lineage(recipe.init, init)
        if init.get("classes") not in (None, list(d.classes)):
            raise UsageError(f"--init {recipe.init} was trained on classes {init['classes']}, not {list(d.classes)}")
        model.load_state_dict(init["state_dict"])
        if init.get("input"):  # keep the normalisation the weights were trained with
            mean, std = tuple(init["input"]["mean"]), tuple(init["input"]["std"])
    spec = InputSpec(
        height=d.size,
        width=d.size,
        mean=mean,
        std=std,
        white_balance=recipe.white_balance,
        **stain_fields(asdict(d.stain)),
    )
    return _Net(model, spec, lineage)


def _loaders(recipe: Recipe, d: _TrainData, spec: InputSpec) -> _Loaders:
    """The training batches (shuffled, or drawn by weight) and each source's validation batches."""
    gen_loader = torch.Generator().manual_seed(recipe.seed)
    sampler = (
        None
        if d.plain
        else torch.utils.data.WeightedRandomSampler(torch.from_numpy(d.weights), d.samples, generator=gen_loader)
    )
    tl = torch.utils.data.DataLoader(
        d.data,
        batch_size=recipe.batch,
        shuffle=d.plain,
        sampler=sampler,
        num_workers=recipe.workers,
        generator=gen_loader,
        persistent_workers=recipe.workers > 0,
    )
    vls = {s.name: _val_loader(s.val, spec, recipe.workers) for s in d.sources if s.val is not None}
    return _Loaders(tl, vls)


def _fit(recipe: Recipe, model: nn.Module, steps: int) -> _Fit:
    """The optimizer and LR schedule (``steps`` batches an epoch), the loss, augmentation generator and EMA."""
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=True
        )
    elif recipe.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    elif recipe.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        raise UsageError(f"optimizer must be sgd, adam or adamw, not {recipe.optimizer!r}")
    if recipe.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, epochs=recipe.epochs, steps_per_epoch=steps)
    elif recipe.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * steps)
    elif recipe.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=2)
    elif recipe.schedule == "none":
        sched = None
    else:
        raise UsageError(f"schedule must be onecycle, cosine, plateau or none, not {recipe.schedule!r}")
    per_step = recipe.schedule in ("onecycle", "cosine")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    ema = Ema(model, recipe.ema) if recipe.ema else None
    return _Fit(opt, sched, per_step, loss_fn, gen, ema)


def _resume(last: Path, model: nn.Module, fit: _Fit) -> _RunState:
    """Where to start: from scratch, or (``last`` exists) where the interrupted run stopped, its state restored."""
    if not last.exists():
        return _RunState()
    ck = torch.load(last, map_location="cpu", weights_only=False)
    model.load_state_dict(ck["state_dict"])
    fit.opt.load_state_dict(ck["optimizer"])
    if fit.sched is not None and ck.get("scheduler"):
        fit.sched.load_state_dict(ck["scheduler"])
    if fit.ema is not None and ck.get("ema_state_dict"):
        fit.ema.module.load_state_dict(ck["ema_state_dict"])
        fit.ema.t = ck["ema_steps"]
    fit.gen.set_state(ck["gen"])
    return _RunState(ck["epoch"] + 1, ck["best"], ck["best_epoch"], ck["stale"])


def _checkpoint_meta(recipe: Recipe, d: _TrainData, net: _Net) -> dict[str, Any]:
    """What every checkpoint records besides its weights: the model, its input, the data and the recipe."""
    first = d.sources[0]
    return dict(
        arch=recipe.arch,
        arch_kwargs=recipe.arch_kwargs,
        classes=list(d.classes),
        input=asdict(net.spec),
        data={
            "path": str(first.path),
            "train_digest": first.parts[0][0].digest,
            "val_digest": first.val.digest if first.val is not None else None,
            "extra": [
                {"path": str(p), "images": len(ex), "digest": ex.digest, "repeat": recipe.extra_repeat}
                for p, (ex, _) in zip(recipe.extra_data, first.parts[1:])
            ],
            "sources": [s.describe() for s in d.sources],
            "samples_per_epoch": d.samples,
        },
        recipe=asdict(recipe),
        lineage=net.lineage,
    )


def _train_epoch(
    recipe: Recipe,
    net: _Net,
    tl: torch.utils.data.DataLoader,
    fit: _Fit,
    n_sources: int,
    bar,  # noqa: ANN001 - rich.progress.Progress
    epoch: int,
) -> _Epoch:
    """One pass over the training batches: augment, step (and the per-step schedule), update the EMA."""
    model = net.model
    model.train()
    st = bar.add_task(f"epoch {epoch + 1}", total=len(tl), info="")
    tot, correct, seen = 0.0, 0, 0
    drawn = np.zeros(n_sources, np.int64)
    for x, y, src, stains in tl:
        x = to_model_input(  # sources were stain-normalised as sessions already (``_RawSet``): not again per batch
            augment(x.permute(0, 3, 1, 2).float() / 255, recipe.aug, fit.gen, recipe.aug_strength, stains),
            replace(net.spec, stain_ref=0.0),
        )
        logits = model(x)
        loss = fit.loss_fn(logits, y)
        fit.opt.zero_grad(set_to_none=True)
        loss.backward()
        fit.opt.step()
        if fit.per_step:
            fit.sched.step()
        if fit.ema is not None:
            fit.ema.update(model)
        drawn += np.bincount(src.numpy(), minlength=n_sources)
        tot += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.update(st, advance=1, info=f"loss {tot / seen:.3f} acc {correct / seen:.3f}")
    bar.remove_task(st)
    return _Epoch(tot / seen, correct / seen, drawn)


def _accuracy(model: nn.Module, loader) -> float:  # noqa: ANN001
    probs, labels = predict(model, loader)
    return float((probs.argmax(1) == labels).mean())


def _keep_best(
    out: Path,
    epoch: int,
    final: nn.Module,
    fit: _Fit,
    state: _RunState,
    meta: dict[str, Any],
    val: dict[str, float],
    val_acc: float | None,
) -> _RunState:
    """Step the plateau schedule; write ``best.pt`` when the mean val accuracy improved. Returns the new progress."""
    if fit.sched is not None and not fit.per_step and val_acc is not None:
        fit.sched.step(val_acc)
    if val_acc is not None and val_acc > state.best:
        checkpoint.save(
            out / "best.pt",
            **meta,
            state_dict=final.state_dict(),
            epoch=epoch,
            metrics={"val_accuracy": val_acc, "val_by_source": val},
        )
        return _RunState(state.start, val_acc, epoch, 0)
    return _RunState(state.start, state.best, state.best_epoch, state.stale + 1)


def _log_epoch(
    log,  # noqa: ANN001 - the open train.log.jsonl
    epoch: int,
    ep: _Epoch,
    val: dict[str, float],
    val_acc: float | None,
    sources: list[Source],
    fit: _Fit,
    state: _RunState,
    t0: float,
) -> None:
    """The epoch's line in ``train.log.jsonl``."""
    rec = {
        "epoch": epoch + 1,
        "train_loss": ep.loss,
        "train_acc": ep.acc,
        "val_acc": val_acc,
        "val_by_source": val,
        "drawn_by_source": {s.name: int(n) for s, n in zip(sources, ep.drawn)},
        "lr": fit.opt.param_groups[0]["lr"],
        "best": state.best,
        "seconds": round(time.time() - t0, 1),
    }
    log.write(json.dumps(rec) + "\n")
    log.flush()


def _save_epoch(
    out: Path,
    epoch: int,
    model: nn.Module,
    final: nn.Module,
    fit: _Fit,
    state: _RunState,
    meta: dict[str, Any],
    val: dict[str, float],
    val_acc: float | None,
) -> None:
    """Write ``last.pt`` (everything a resumed run needs) and ``final.pt`` (this epoch's evaluated weights)."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "ema_state_dict": fit.ema.module.state_dict() if fit.ema is not None else None,
            "ema_steps": fit.ema.t if fit.ema is not None else 0,
            "optimizer": fit.opt.state_dict(),
            "scheduler": fit.sched.state_dict() if fit.sched is not None else None,
            "epoch": epoch,
            "best": state.best,
            "best_epoch": state.best_epoch,
            "stale": state.stale,
            "gen": fit.gen.get_state(),
        },
        out / "last.pt",
    )
    checkpoint.save(
        out / "final.pt",
        **meta,
        state_dict=final.state_dict(),
        epoch=epoch,
        metrics={"val_accuracy": val_acc, "val_by_source": val},
    )
