"""The segmenter protocol and the small helpers every segmenter shares."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from hemaedge.edge.records import Detection, Frame


@runtime_checkable
class Segmenter(Protocol):
    """Finds white cells in a frame.

    ``detect`` returns one ``Detection`` per white cell, with ``box`` the whole
    cell (nucleus + cytoplasm) in frame pixels ``(x0, y0, x1, y1)``, a ``score``
    in ``[0, 1]`` and ``kind == "wbc"``.
    """

    name: str

    def detect(self, frame: Frame) -> list[Detection]: ...


def as_frame(image: Frame | np.ndarray, colour_order: str = "BGR") -> Frame:
    """Wrap a bare HxWx3 uint8 array as a ``Frame`` (``colour_order`` says what it holds)."""
    if isinstance(image, Frame):
        return image
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.shape[2] > 3:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Frame(np.ascontiguousarray(arr), colour_order, 0.0, "array", 0)


def boxes_of(detections: list[Detection]) -> np.ndarray:
    """The boxes of ``detections`` as an N x 4 float32 array."""
    return np.asarray([d.box for d in detections], np.float32).reshape(-1, 4)


def scores_of(detections: list[Detection]) -> np.ndarray:
    """The scores of ``detections`` as an N float32 array."""
    return np.asarray([d.score for d in detections], np.float32)


def touching(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each box of ``a`` (N x 4): does it touch or overlap some box of ``b`` (M x 4)?"""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), bool)
    return (
        (b[None, :, 0] <= a[:, None, 2])
        & (b[None, :, 2] >= a[:, None, 0])
        & (b[None, :, 1] <= a[:, None, 3])
        & (b[None, :, 3] >= a[:, None, 1])
    ).any(axis=1)
