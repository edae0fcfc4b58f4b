"""The one preprocessing function: crop -> resize -> normalise -> NCHW float32.

Training-time evaluation, INT8 calibration and the station all call
``preprocess``; calibration data preprocessed differently from runtime data is
the most common cause of INT8 accuracy loss in the field.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hemaedge.edge.bundle.manifest import CropGeometry, InputSpec

_INTERP = {"area": 3, "linear": 1, "cubic": 2, "nearest": 0}  # cv2 constants


def _resize(img: np.ndarray, h: int, w: int, method: str) -> np.ndarray:
    if img.shape[0] == h and img.shape[1] == w:
        return img
    try:
        import cv2
    except ImportError:  # pure-numpy fallback: box filter on integer ratios, else nearest
        ys = (np.arange(h) + 0.5) * img.shape[0] / h
        xs = (np.arange(w) + 0.5) * img.shape[1] / w
        return img[ys.astype(int)][:, xs.astype(int)]
    interp = _INTERP.get(method, 3)
    if interp == 3 and (img.shape[0] < h or img.shape[1] < w):
        interp = 1  # INTER_AREA is for shrinking; enlarge bilinearly
    return cv2.resize(img, (w, h), interpolation=interp)


WB_PERCENTILE = 80.0
WB_TARGET = 235.0


def _background(flat: np.ndarray) -> np.ndarray:
    """Per image (``N x P x 3``) its background colour: the mean of the pixels brighter than its
    ``WB_PERCENTILE``-th brightness percentile (slide glass between cells)."""
    bright = flat.mean(axis=2)
    cut = np.percentile(bright, WB_PERCENTILE, axis=1)[:, None]
    mask = (bright >= cut)[..., None]
    return (flat * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)


def white_balance(images: np.ndarray) -> np.ndarray:
    """Scale each image's channels so its bright background becomes neutral grey ``WB_TARGET``.

    Args:
        images: ``N x H x W x 3`` float32 in 0..255 (modified in place and returned).
    """
    n = images.shape[0]
    bg = _background(images.reshape(n, -1, 3))
    gain = WB_TARGET / np.maximum(bg, 1.0)
    images *= gain[:, None, None, :]
    np.clip(images, 0, 255, out=images)
    return images


STAIN_PERCENTILE = 97.0  # a crop's stain strength: this percentile of its summed optical density (its nucleus)


def optical_density(images: np.ndarray) -> np.ndarray:
    """``N x P x 3`` optical density ``-log10(I / background)`` of each image against its own background (>= 0)."""
    n = images.shape[0]
    flat = images.reshape(n, -1, 3)
    bg = np.maximum(_background(flat), 1.0)[:, None, :].astype(np.float32)
    return np.maximum(-np.log10(np.maximum(flat, np.float32(1.0)) / bg), np.float32(0.0))


def stain_strength(images: np.ndarray) -> np.ndarray:
    """Per image (``N x H x W x 3`` float32 0..255) its stain strength: the ``STAIN_PERCENTILE``-th percentile of
    the summed optical density, i.e. how dark its nucleus is stained."""
    return _strengths(optical_density(images))


def _strengths(od: np.ndarray) -> np.ndarray:
    return np.percentile(od.sum(axis=2), STAIN_PERCENTILE, axis=1)


def stain_gain(strength: float | None, spec: InputSpec) -> float:
    """The factor on optical density that brings a session of this ``strength`` to the bundle's ``stain_ref``."""
    if not spec.stain_ref or not strength:
        return 1.0
    lo, hi = spec.stain_gain_range
    return float(np.clip(spec.stain_ref / max(float(strength), 1e-3), lo, hi))


def normalise_stain(images: np.ndarray, gain: float) -> np.ndarray:
    """Multiply each image's optical density by ``gain``, against a neutral background ``WB_TARGET`` (so it is
    white-balanced too). ``N x H x W x 3`` float32 0..255, modified in place and returned."""
    od = optical_density(images) * np.float32(gain)
    images[...] = np.clip(WB_TARGET * np.power(np.float32(10.0), -od), 0, 255).reshape(images.shape)
    return images


def normalise_stain_u8(pixels: np.ndarray, gain: float) -> np.ndarray:
    """``normalise_stain`` on uint8 ``N x H x W x 3`` pixels, back as uint8 (training's raw pixels, normalised as one
    session before augmentation); a gain of exactly 1 leaves them as they are."""
    if gain == 1.0:
        return pixels
    return np.rint(normalise_stain(pixels.astype(np.float32), gain)).astype(np.uint8)


class SessionStain:
    """The session's stain strength: the median over its recent white-cell crops (``kept`` of them).

    One slide is stained once, so its cells share one strength; a cell type's own darkness (a basophil's
    granules, a lymphocyte's dense nucleus) stays, because every crop of the session gets the same gain.
    Until the first crops are in, the strength is that of the crops seen so far.
    """

    def __init__(self, kept: int = 500):
        import collections

        self._seen: collections.deque = collections.deque(maxlen=kept)

    def add(self, strengths: Sequence[float] | np.ndarray) -> None:
        self._seen.extend(float(v) for v in np.ravel(strengths))

    def add_crops(self, crops: Sequence[np.ndarray], spec: InputSpec, colour_order: str = "RGB") -> None:
        """Measure white-cell crops (uint8, any size: resized as ``preprocess`` resizes them) and add them."""
        if len(crops):
            self.add(stain_strength(resized(crops, spec, colour_order)))

    @property
    def strength(self) -> float | None:
        return float(np.median(self._seen)) if self._seen else None

    def __len__(self) -> int:
        return len(self._seen)


def to_model_colour(img: np.ndarray, have: str, spec: InputSpec) -> np.ndarray:
    """Reorder channels from ``have`` ("RGB"/"BGR") to the model's colour order."""
    return img if have == spec.colour_order else img[..., ::-1]


def resized(images: Sequence[np.ndarray] | np.ndarray, spec: InputSpec, colour_order: str = "RGB") -> np.ndarray:
    """The images at the model's size and colour order: ``N x H x W x C`` float32 0..255 (step 1 of ``preprocess``)."""
    n = len(images)
    out = np.empty((n, spec.height, spec.width, spec.channels), dtype=np.float32)
    for i in range(n):
        img = np.asarray(images[i])
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = to_model_colour(img, colour_order, spec)
        out[i] = _resize(img, spec.height, spec.width, spec.resize)
    return out


def preprocess(
    images: Sequence[np.ndarray] | np.ndarray,
    spec: InputSpec,
    colour_order: str = "RGB",
    session: SessionStain | float | None = None,
) -> np.ndarray:
    """Turn uint8 HxWx3 images into the model's ``N x C x H x W`` float32 batch.

    Resize, then (``spec.stain_ref``) the session's stain normalisation, then (``spec.white_balance``) white
    balance, then ``(x/255 - mean) / std``.

    Args:
        images: A list of HxWx3 uint8 images (any size; resized here) or an
            ``N x H x W x 3`` uint8 array.
        spec: The bundle's input specification.
        colour_order: Channel order of ``images`` (``"RGB"`` or ``"BGR"``).
        session: Only for bundles with ``spec.stain_ref``: the session these crops belong to (a
            ``SessionStain``, which the crops are added to first), or its stain strength as a number. Without
            one the batch is taken as one session (a folder of one microscope's cells, as in calibration).

    Returns:
        Contiguous float32 array ``N x C x H x W``, ``(x/255 - mean) / std``.
    """
    out = resized(images, spec, colour_order)
    n = len(out)
    if spec.stain_ref and n:
        od = optical_density(out)  # once: it gives the strengths and is then scaled
        if isinstance(session, SessionStain):
            session.add(_strengths(od))
            strength = session.strength
        elif session is not None:
            strength = float(session)
        else:
            strength = float(np.median(_strengths(od)))
        od *= np.float32(stain_gain(strength, spec))
        out[...] = np.clip(WB_TARGET * np.power(np.float32(10.0), -od), 0, 255).reshape(out.shape)
    if spec.white_balance:
        white_balance(out)
    mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
    std = np.asarray(spec.std, dtype=np.float32) * 255.0
    out -= mean
    out /= std
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def crop_box(
    box: Sequence[float], frame_shape: tuple[int, ...], geom: CropGeometry, typical_side: float | None = None
) -> tuple[int, int, int]:
    """The square crop ``(cx, cy, side)`` in pixels for a detection box.

    With ``geom.scale == "session"`` the side follows ``typical_side`` (the session's typical
    white-cell box side) instead of this box; without one it falls back to this box.
    """
    x0, y0, x1, y1 = box
    cell = typical_side if geom.scale == "session" and typical_side else max(x1 - x0, y1 - y0)
    side = cell / geom.cell_fraction
    side = int(round(max(side, geom.min_side_px)))
    return int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2)), side


def cut_crop(
    frame: np.ndarray, box: Sequence[float], geom: CropGeometry, typical_side: float | None = None
) -> np.ndarray:
    """Cut the square crop around ``box`` with the bundle's crop geometry.

    Parts outside the frame are filled by ``geom.pad`` (``reflect`` or ``constant``).
    ``typical_side``: the session's typical white-cell box side, used when ``geom.scale`` is
    ``"session"`` (see ``CropGeometry``).
    """
    cx, cy, side = crop_box(box, frame.shape, geom, typical_side)
    h, w = frame.shape[:2]
    x0, y0 = cx - side // 2, cy - side // 2
    x1, y1 = x0 + side, y0 + side
    pads = (max(0, -y0), max(0, y1 - h), max(0, -x0), max(0, x1 - w))
    inner = frame[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    if not any(pads):
        return np.ascontiguousarray(inner)
    mode = "reflect" if geom.pad == "reflect" and min(inner.shape[:2]) > max(pads) else "edge"
    if geom.pad == "constant":
        return np.pad(inner, ((pads[0], pads[1]), (pads[2], pads[3]), (0, 0)), mode="constant", constant_values=255)
    return np.pad(inner, ((pads[0], pads[1]), (pads[2], pads[3]), (0, 0)), mode=mode)
