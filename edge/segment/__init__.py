"""White-cell segmentation, frame quality and crop geometry (cv2 + numpy only).

* ``Segmenter`` - the protocol: ``detect(frame) -> list[Detection]`` (whole-cell boxes).
* ``StainSegmenter`` - stain-aware thresholding of nuclei, lobes grouped into cells (needs no model).
* ``LearnedSegmenter`` - a detector bundle (``"task": "detect"``) run with ONNX Runtime at the session's scale.
* ``CheckedSegmenter`` - the detector, checked against the stain segmenter on each session's first white cells
  (the default): where it misses the cells the stain segmenter finds, the session takes both.
* ``SessionScale`` / ``estimate_scale`` - pixels per micron measured on the red cells.
* ``assess_quality`` / ``QualityMonitor`` - out-of-focus and exposure checks.
* ``cut_crops`` / ``measure_cell_fraction`` - crops with the bundle's geometry, and measuring it.
* ``make_segmenter(name)`` - by name, for command-line options.
"""

from __future__ import annotations

from hemaedge.edge.segment.base import Segmenter, as_frame, boxes_of, scores_of
from hemaedge.edge.segment.checked import CheckedSegmenter
from hemaedge.edge.segment.crops import cell_fractions, central_detection, cut_crops, measure_cell_fraction
from hemaedge.edge.segment.learned import LearnedSegmenter
from hemaedge.edge.segment.quality import Quality, QualityConfig, QualityMonitor, assess_quality
from hemaedge.edge.segment.scale import Scale, SessionScale, estimate_scale
from hemaedge.edge.segment.stain import SegmenterConfig, StainSegmenter

SEGMENTERS = {"stain": StainSegmenter, "learned": LearnedSegmenter, "checked": CheckedSegmenter}
DETECTOR_SEGMENTERS = ("learned", "checked")  # the ones that run a detector bundle
DEFAULT_SEGMENTER = "checked"  # when the detector's bundle is installed (edge/models/wbcnet); else the stain segmenter
FALLBACK_SEGMENTER = "stain"  # needs no model


def default_segmenter_name() -> str:
    """``DEFAULT_SEGMENTER`` when it can run here (the detector needs its shipped bundle), else ``stain``."""
    if DEFAULT_SEGMENTER in DETECTOR_SEGMENTERS:
        from hemaedge.edge.errors import BundleError
        from hemaedge.edge.models import default_detector_path

        try:
            default_detector_path()
        except BundleError:
            return FALLBACK_SEGMENTER
    return DEFAULT_SEGMENTER


def make_segmenter(name: str | None = None, **options: object) -> Segmenter:
    """A segmenter by name (``"stain"``, ``"learned"``, ``"checked"``; None: ``default_segmenter_name()``), with its
    options.

    ``stain`` takes ``SegmenterConfig`` overrides; ``learned`` and ``checked`` take ``bundle`` (a detector bundle,
    default the shipped one), ``scale`` (pixels per micron, ``"frame"``, or None to measure the session) and
    ``threshold``.
    Options left at None are not passed.
    """
    from hemaedge.edge.errors import UsageError

    if name is None:
        name = default_segmenter_name()
        if name not in DETECTOR_SEGMENTERS:  # the fallback takes no detector options
            options = {k: v for k, v in options.items() if k not in ("bundle", "threshold")}
    try:
        cls = SEGMENTERS[name]
    except KeyError:
        raise UsageError(f"unknown segmenter {name!r}; choose from {', '.join(SEGMENTERS)}") from None
    return cls(**{k: v for k, v in options.items() if v is not None})


__all__ = [
    "CheckedSegmenter",
    "DEFAULT_SEGMENTER",
    "DETECTOR_SEGMENTERS",
    "FALLBACK_SEGMENTER",
    "default_segmenter_name",
    "SEGMENTERS",
    "LearnedSegmenter",
    "Scale",
    "SessionScale",
    "estimate_scale",
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
