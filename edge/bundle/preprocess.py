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


def white_balance(images: np.ndarray) -> np.ndarray:
    """Scale each image's channels so its bright background becomes neutral grey ``WB_TARGET``.

    The background colour is the mean of the pixels brighter than the image's
    ``WB_PERCENTILE``-th brightness percentile (slide glass between cells).

    Args:
        images: ``N x H x W x 3`` float32 in 0..255 (modified in place and returned).
    """
    n = images.shape[0]
    flat = images.reshape(n, -1, 3)
    bright = flat.mean(axis=2)
    cut = np.percentile(bright, WB_PERCENTILE, axis=1)[:, None]
    mask = (bright >= cut)[..., None]
    bg = (flat * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
    gain = WB_TARGET / np.maximum(bg, 1.0)
    images *= gain[:, None, None, :]
    np.clip(images, 0, 255, out=images)
    return images


def to_model_colour(img: np.ndarray, have: str, spec: InputSpec) -> np.ndarray:
    """Reorder channels from ``have`` ("RGB"/"BGR") to the model's colour order."""
    return img if have == spec.colour_order else img[..., ::-1]


def preprocess(images: Sequence[np.ndarray] | np.ndarray, spec: InputSpec, colour_order: str = "RGB") -> np.ndarray:
    """Turn uint8 HxWx3 images into the model's ``N x C x H x W`` float32 batch.

    Args:
        images: A list of HxWx3 uint8 images (any size; resized here) or an
            ``N x H x W x 3`` uint8 array.
        spec: The bundle's input specification.
        colour_order: Channel order of ``images`` (``"RGB"`` or ``"BGR"``).

    Returns:
        Contiguous float32 array ``N x C x H x W``, ``(x/255 - mean) / std``.
    """
    n = len(images)
    out = np.empty((n, spec.height, spec.width, spec.channels), dtype=np.float32)
    for i in range(n):
        img = np.asarray(images[i])
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = to_model_colour(img, colour_order, spec)
        out[i] = _resize(img, spec.height, spec.width, spec.resize)
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
