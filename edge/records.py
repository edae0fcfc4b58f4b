"""Plain records that flow one way through the station pipeline.

``Frame`` -> ``Detection`` -> ``Crop`` -> ``Prediction`` -> ``CountSnapshot``.
Frozen dataclasses of numpy arrays; no stage imports a later stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class StrEnum(str, Enum):
    """An enum whose members are their string values (JSON, SQLite and f-strings see ``"wbc"``, not ``CellKind.WBC``).

    ``enum.StrEnum`` needs Python 3.11; the station runtime runs on 3.8.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class CellKind(StrEnum):
    """What a detection is."""

    WBC = "wbc"
    RBC = "rbc"
    PLATELET = "platelet"


class SessionState(StrEnum):
    """Where a counting session is."""

    STARTING = "starting"
    COUNTING = "counting"
    PAUSED = "paused"
    STOPPING = "stopping"
    DONE = "done"  # the target was reached
    ENDED = "ended"  # the source ran out before the target
    STOPPED = "stopped"  # stopped by the user (q, Ctrl-C, SIGTERM)
    FAILED = "failed"


class SkipReason(StrEnum):
    """Why a frame or an input was not used (``summary.json`` and the report name each)."""

    QUALITY = "quality"  # out of focus, badly exposed, greyscale, too small: see the detail
    BUSY = "busy"  # a live frame skipped while the classifier caught up (skip policy)
    UNPLACED = "unplaced"  # could not be placed on the slide
    UNREADABLE = "unreadable"  # not an image, corrupt, truncated, empty, missing
    NOT_READ = "not_read"  # never read: the target was reached first


@dataclass(frozen=True)
class SkippedInput:
    """An input (an image file, or a frame of a still-image set) that was not used, and why."""

    name: str
    reason: SkipReason
    detail: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"name": self.name, "reason": str(self.reason), "detail": self.detail}


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
    kind: CellKind = CellKind.WBC
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
    """A classification of one crop: the top class, its probability, and every class's probability."""

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
