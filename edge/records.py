"""Plain records that flow one way through the station pipeline.

``Frame`` -> ``Detection`` -> ``Crop`` -> ``Prediction`` -> ``CountSnapshot``.
Frozen dataclasses of numpy arrays; no stage imports a later stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One camera frame.

    Attributes:
        pixels: HxWx3 uint8 image.
        colour_order: ``"RGB"`` or ``"BGR"``: the order of ``pixels``' channels.
        timestamp: Seconds (monotonic or epoch; per source).
        source_id: Which source produced it (URI).
        index: Frame number within the source.
        name: File name for file sources, else ``""``.
        truth: Optional ground-truth boxes (N x 4, x0 y0 x1 y1) for synthetic frames.
        truth_kinds: Kind of each ground-truth box (``"wbc"``, ``"rbc"``, ``"platelet"``).
    """

    pixels: np.ndarray
    colour_order: str
    timestamp: float
    source_id: str
    index: int
    name: str = ""
    truth: np.ndarray | None = None
    truth_kinds: tuple[str, ...] = ()

    def rgb(self) -> np.ndarray:
        """The pixels in RGB order."""
        if self.colour_order == "RGB":
            return self.pixels
        return np.ascontiguousarray(self.pixels[..., ::-1])

    def bgr(self) -> np.ndarray:
        """The pixels in BGR order (OpenCV's)."""
        if self.colour_order == "BGR":
            return self.pixels
        return np.ascontiguousarray(self.pixels[..., ::-1])


@dataclass(frozen=True)
class Detection:
    """A cell found in a frame: box in pixels ``(x0, y0, x1, y1)``."""

    box: tuple[float, float, float, float]
    score: float
    kind: str = "wbc"
    contour: np.ndarray | None = None


@dataclass(frozen=True)
class Crop:
    """A cell cut out of a frame, in RGB, before resizing to the model size."""

    pixels: np.ndarray
    detection: Detection
    frame_index: int
    frame_name: str = ""


@dataclass(frozen=True)
class Prediction:
    """A classification of one crop."""

    class_index: int
    class_name: str
    confidence: float
    probabilities: np.ndarray


@dataclass(frozen=True)
class CountSnapshot:
    """The differential count at one moment."""

    counts: dict[str, int]
    total: int
    target: int
    percentages: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    review: int
    flags: tuple[str, ...] = ()
    group_counts: dict[str, int] = field(default_factory=dict)
