"""The station's capture side: the backend seam, frame quality, and ``CellFinder`` (frame -> new cells + crops).

``hemaedge.edge.counting`` runs these stages in the counting threads; ``count``, ``collect``, ``bench`` and the
evaluations all get them from here, so a change of crop geometry or segmentation reaches every path.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from hemaedge.edge.bundle import Bundle
from hemaedge.edge.bundle.class_groups import default_class_groups
from hemaedge.edge.bundle.manifest import CropGeometry
from hemaedge.edge.bundle.preprocess import cut_crop
from hemaedge.edge.count import SlideTracker
from hemaedge.edge.count.tracking import Registration, TrackedDetection
from hemaedge.edge.records import Crop, Detection, Frame
from hemaedge.edge.segment.crops import cut_crops

# A platelet crop is cut as large as a white cell's crop would be in that frame (the training images of platelets,
# PBC / BloodMNIST, are taken at the white cells' magnification, so a platelet is small in its crop). The white-cell
# box side is the median of those seen recently; before any has been seen, it is the platelet box side times this
# ratio: the median over frames of (median white-cell box side / platelet box side) of StainSegmenter's own
# detections on BCCD train + TXL-PBC half "a" was 4.28 (IQR 3.5-5.3; per source BCCD 4.2-4.7, PBC 4.2, Raabin 4.9).
PLATELET_TO_WBC = 4.3
WBC_SIDES_KEPT = 50  # recent white-cell box sides: their median is the session scale (platelet and "session" crops)


class SegmenterLike(Protocol):
    """What the pipeline needs from a segmenter (``hemaedge.edge.segment``)."""

    def detect(self, frame: Frame) -> list[Detection]: ...


# ---------------------------------------------------------------------------------------------------------------------
# backend seam
# ---------------------------------------------------------------------------------------------------------------------
def make_backend(
    bundle: Bundle, preference: str = "auto", precision: str = "auto", threads: int = 0
) -> tuple[Any, str]:
    """The classification backend for a bundle: ``(backend not yet entered, one line saying why)``.

    The one seam between the pipeline and backend choice: ``hemaedge.edge.classify.select``
    picks among TensorRT / ONNX Runtime providers when it is installed.
    """
    try:
        from hemaedge.edge.classify.select import select_backend
    except ImportError:  # pragma: no cover - select.py ships with the package
        from hemaedge.edge.classify.onnxruntime import OrtBackend

        prec = "int8" if precision == "auto" and "int8" in bundle.manifest.precisions() else precision
        prec = "fp32" if prec == "auto" else prec
        return OrtBackend(bundle, prec, threads=threads), f"ONNX Runtime ({prec})"
    return select_backend(bundle, preference, precision, threads=threads)


def is_stills(source: Any) -> bool:
    """Is the source a set of still images (no later view of a cell cut by the border)?"""
    from hemaedge.edge.sources import ImageFilesSource

    return isinstance(source, ImageFilesSource)


def make_quality_check(source: Any) -> Callable[[Frame], Any]:
    """The frame-quality check for a source.

    A stream (camera, video, synthetic slide) gets a ``QualityMonitor``, which learns
    this camera's in-focus sharpness and flags frames well below it; a set of still
    images (possibly from several microscopes) gets the absolute ``assess_quality``.
    """
    from hemaedge.edge.segment import QualityMonitor, assess_quality

    return assess_quality if is_stills(source) else QualityMonitor()


# ---------------------------------------------------------------------------------------------------------------------
# capture side: frame -> new cells
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Found:
    """What one frame yielded.

    Attributes:
        frame: The frame.
        registration: Where it lies on the slide (None: could not be placed).
        new: Cells not seen before (to classify and count).
        crops: Their crops (RGB, cut with the bundle's geometry), same order as ``new``.
        seen: Detections of cells already known.
        at_edge: Detections cut by the frame border (counted later, when fully in view).
        skipped: ``""``, or why the frame was not segmented (``quality``, ``busy``, ``unplaced``).
        reason: The quality problem, for a warning.
    """

    frame: Frame
    registration: Registration | None
    new: tuple[TrackedDetection, ...] = ()
    crops: tuple[Crop, ...] = ()
    seen: int = 0
    at_edge: int = 0
    skipped: str = ""
    reason: str = ""


def platelet_classes(bundle: Bundle) -> tuple[str, ...]:
    """The bundle's platelet classes (its ``class_groups["platelets"]``, else the default grouping of its classes)."""
    m = bundle.manifest
    groups = m.class_groups or default_class_groups(m.classes)
    return tuple(groups.get("platelets", ()))


class CellFinder:
    """Finds the new white cells (and, when asked, platelets) of a frame and cuts their crops.

    Args:
        segmenter: Has ``detect(frame) -> list[Detection]``; ``kind == "wbc"`` detections are used, and
            ``kind == "platelet"`` ones with ``platelets``.
        geometry: The bundle's crop geometry.
        tracker: De-duplicates cells across frames (default: a fresh :class:`SlideTracker`).
        quality: ``f(frame) -> Quality`` with ``ok`` and ``reason``; None accepts every frame.
        platelets: Also find platelets (see :meth:`use_platelets`).
    """

    def __init__(
        self,
        segmenter: SegmenterLike,
        geometry: CropGeometry,
        tracker: SlideTracker | None = None,
        quality: Callable[[Frame], Any] | None = None,
        platelets: bool = False,
    ):
        self.segmenter = segmenter
        self.geometry = geometry
        self.tracker = tracker or SlideTracker()
        self.quality = quality
        self.platelets = False
        self._wbc_sides: collections.deque = collections.deque(maxlen=WBC_SIDES_KEPT)
        if platelets:
            self.use_platelets(True)

    def use_platelets(self, on: bool = True) -> None:
        """Find platelets too (or not): a segmenter with ``with_platelets`` (``StainSegmenter``) is switched
        over; any other segmenter's ``kind == "platelet"`` detections are simply kept."""
        switch = getattr(self.segmenter, "with_platelets", None)
        if switch is not None:
            self.segmenter = switch(on)
        self.platelets = on

    @property
    def typical_side(self) -> float | None:
        """The median side of the recent white-cell boxes (the session's scale), None before any."""
        return float(np.median(self._wbc_sides)) if self._wbc_sides else None

    def platelet_side(self, box: tuple[float, float, float, float]) -> float:
        """The white-cell box side that sizes a platelet's crop (see ``PLATELET_TO_WBC``)."""
        typical = self.typical_side
        return typical if typical else PLATELET_TO_WBC * max(box[2] - box[0], box[3] - box[1])

    def cut(self, frame: Frame, detections: list[Detection]) -> tuple[Crop, ...]:
        """Crops of ``detections``: white cells with the bundle's geometry (at the session's scale when
        ``geometry.scale == "session"``), platelets as large as a white cell's."""
        typical = self.typical_side
        if all(d.kind != "platelet" for d in detections):
            return tuple(cut_crops(frame, detections, self.geometry, typical))
        rgb = frame.rgb()
        out = []
        for d in detections:
            box = d.box
            if d.kind == "platelet":
                cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, self.platelet_side(box) / 2
                box = (cx - half, cy - half, cx + half, cy + half)
                out.append(Crop(cut_crop(rgb, box, replace(self.geometry, scale="cell")), d, frame.index, frame.name))
            else:
                out.append(Crop(cut_crop(rgb, box, self.geometry, typical), d, frame.index, frame.name))
        return tuple(out)

    def find(self, frame: Frame, segment: bool = True) -> Found:
        """Process one frame; with ``segment=False`` only register its motion (skip policy)."""
        q = self.quality(frame) if self.quality is not None else None
        ok = bool(q.ok) if q is not None else True
        reason = str(getattr(q, "reason", "") or "") if q is not None else ""
        reg = self.tracker.register(frame.pixels, may_start_field=ok)
        if not ok:
            return Found(frame, reg, skipped="quality", reason=reason or "poor image quality")
        if not segment:
            return Found(frame, reg, skipped="busy")
        if reg is None:  # pragma: no cover - a good frame always gets a field
            return Found(frame, None, skipped="unplaced")
        kinds = ("wbc", "platelet") if self.platelets else ("wbc",)
        dets = [d for d in self.segmenter.detect(frame) if d.kind in kinds]
        # every white cell in view (counted before or not) tells the session's scale
        self._wbc_sides.extend(max(d.box[2] - d.box[0], d.box[3] - d.box[1]) for d in dets if d.kind == "wbc")
        res = self.tracker.place(reg, frame.pixels.shape, [d.box for d in dets])
        crops = self.cut(frame, [dets[t.index] for t in res.new]) if res.new else ()
        return Found(frame, reg, res.new, crops, res.seen, res.at_edge)


__all__ = ["CellFinder", "Found", "is_stills", "make_backend", "make_quality_check", "platelet_classes"]
