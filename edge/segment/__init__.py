"""White-cell segmentation, frame quality and crop geometry (cv2 + numpy only).

* ``Segmenter`` - the protocol: ``detect(frame) -> list[Detection]`` (whole-cell boxes).
* ``StainSegmenter`` - stain-aware thresholding of nuclei, lobes grouped into cells.
* ``assess_quality`` / ``QualityMonitor`` - out-of-focus and exposure checks.
* ``cut_crops`` / ``measure_cell_fraction`` - crops with the bundle's geometry, and measuring it.
* ``make_segmenter(name)`` - by name, for command-line options.
"""

from __future__ import annotations

from hemaedge.edge.segment.base import Segmenter, as_frame, boxes_of, scores_of
from hemaedge.edge.segment.crops import cell_fractions, central_detection, cut_crops, measure_cell_fraction
from hemaedge.edge.segment.quality import Quality, QualityConfig, QualityMonitor, assess_quality
from hemaedge.edge.segment.stain import SegmenterConfig, StainSegmenter

SEGMENTERS = {"stain": StainSegmenter}


def make_segmenter(name: str = "stain", **options: float) -> Segmenter:
    """A segmenter by name (``"stain"``), with config overrides."""
    from hemaedge.edge.errors import UsageError

    try:
        cls = SEGMENTERS[name]
    except KeyError:
        raise UsageError(f"unknown segmenter {name!r}; choose from {', '.join(SEGMENTERS)}") from None
    return cls(**options)


__all__ = [
    "SEGMENTERS",
    "Quality",
    "QualityConfig",
    "QualityMonitor",
    "Segmenter",
    "SegmenterConfig",
    "StainSegmenter",
    "as_frame",
    "assess_quality",
    "boxes_of",
    "cell_fractions",
    "central_detection",
    "cut_crops",
    "make_segmenter",
    "measure_cell_fraction",
    "scores_of",
]
