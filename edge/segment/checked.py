"""The learned detector, checked against the stain segmenter on each session's first white cells.

The detector holds on the microscopes and stains it was trained on; on a stain it never saw it can miss half the
white cells (``docs/detection.md``: trained without BCDD, it finds 0.56 of BCDD's white cells where the stain
segmenter finds 0.95). The stain segmenter needs no training and fails in other places (blurred pictures at low
magnification, where it finds almost nothing). So a session runs both on its first frames and matches their white
cells (a box overlapping the other's by ``MATCH_IOU``, or holding its centre):

* ``detector_found``: the share of the stain segmenter's cells the detector found;
* ``stain_found``: the share of the detector's cells the stain segmenter found.

Once the stain segmenter has found ``CHECK_CELLS`` white cells the session decides, once: when the detector found
less than ``MIN_AGREEMENT`` of them and the stain segmenter found a larger share of the detector's cells than the
reverse (the detector is the one missing cells; the stain segmenter is not seeing cells that are not there), the
rest of the session takes the white cells of **both** (the detector's, plus the stain segmenter's that no detector
box covers), and the session's summary and terminal say so. Otherwise, and when ``CHECK_FRAMES`` frames pass
without enough cells to judge, the detector alone. Until the decision the detector alone is used, so a session on
a microscope the detector knows counts exactly what ``--segmenter learned`` counts.

The stain segmenter already runs on every frame when platelets are counted (it finds them); without platelets it
runs only while checking, and for the rest of a session that takes both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hemaedge.edge.records import Detection, Frame
from hemaedge.edge.segment.base import as_frame, boxes_of, touching
from hemaedge.edge.segment.matching import centre_matrix, iou_matrix

CHECK_CELLS = 20  # white cells found by the stain segmenter before the session decides
CHECK_FRAMES = 100  # frames after which a session without enough of them keeps the detector alone
MIN_AGREEMENT = 0.75  # the detector must find at least this share of the stain segmenter's white cells
MATCH_IOU = 0.3  # two boxes are one cell when they overlap this much (or one holds the other's centre)


def covered(a: np.ndarray, b: np.ndarray, iou: float = MATCH_IOU) -> np.ndarray:
    """For each box of ``a`` (N x 4), is it one cell with some box of ``b`` (M x 4)? IoU >= ``iou``, or either box
    holds the other's centre."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), bool)
    one = (iou_matrix(a, b) >= iou) | (centre_matrix(a, b) > 0) | (centre_matrix(b, a) > 0).T
    return one.any(axis=1)


class CheckedSegmenter:
    """The learned detector with the session check of the module docstring.

    Args:
        platelets: Also return the stain segmenter's platelets (outside every white-cell box).
        learned, stain: Ready segmenters to use instead of building them (tests).
        detector: ``LearnedSegmenter``'s options (``bundle``, ``scale``, ``precision``, ``threads``,
            ``threshold``); a stated scale is the stain segmenter's too.
    """

    name = "checked"

    def __init__(self, platelets: bool = False, learned: Any = None, stain: Any = None, **detector: Any):
        from hemaedge.edge.segment.learned import LearnedSegmenter
        from hemaedge.edge.segment.stain import StainSegmenter

        scale = detector.get("scale")
        self.learned = learned or LearnedSegmenter(**detector)
        self.stain = stain or StainSegmenter(scale=None if isinstance(scale, str) else scale, platelets=platelets)
        self.platelets = platelets
        self.frames = 0
        self.stain_cells = 0  # white cells the stain segmenter found while checking
        self.detector_cells = 0
        self.stain_found_by_detector = 0
        self.detector_found_by_stain = 0
        self.decision: str | None = None  # None while checking; then "detector" or "both"

    def __getattr__(self, item: str) -> Any:  # scale, bundle, spec, session ... of the detector
        if item == "learned":  # not set yet (during __init__): no recursion
            raise AttributeError(item)
        return getattr(self.learned, item)

    def with_platelets(self, on: bool = True) -> CheckedSegmenter:
        """This segmenter with the stain segmenter's platelets on (or off); the white cells do not change."""
        if on != self.platelets:
            self.stain = self.stain.with_platelets(on)
            self.platelets = on
        return self

    @property
    def check(self) -> dict[str, Any]:
        """What the session's check saw and decided (for the summary)."""
        out: dict[str, Any] = {
            "decision": self.decision or "checking",
            "frames": self.frames,
            "stain_cells": self.stain_cells,
            "detector_cells": self.detector_cells,
            "detector_found": _share(self.stain_found_by_detector, self.stain_cells),
            "stain_found": _share(self.detector_found_by_stain, self.detector_cells),
        }
        out["describe"] = describe(out)
        return out

    def _observe(self, det: np.ndarray, stain: np.ndarray) -> None:
        self.frames += 1
        self.stain_cells += len(stain)
        self.detector_cells += len(det)
        self.stain_found_by_detector += int(covered(stain, det).sum())
        self.detector_found_by_stain += int(covered(det, stain).sum())
        if self.stain_cells >= CHECK_CELLS:
            d = self.stain_found_by_detector / self.stain_cells
            s = self.detector_found_by_stain / self.detector_cells if self.detector_cells else 1.0
            self.decision = "both" if d < MIN_AGREEMENT and s > d else "detector"
        elif self.frames >= CHECK_FRAMES:
            self.decision = "detector"

    def detect(self, frame: Frame | np.ndarray) -> list[Detection]:
        """The detector's white cells (with the stain segmenter's after a failed check), then platelets if asked."""
        fr = as_frame(frame)
        cells = [d for d in self.learned.detect(fr) if d.kind == "wbc"]
        if not self.platelets and self.decision == "detector":
            return cells
        found = self.stain.detect(fr)
        wbc = [d for d in found if d.kind == "wbc"]
        det_boxes, stain_boxes = boxes_of(cells), boxes_of(wbc)
        if self.decision is None:
            self._observe(det_boxes, stain_boxes)
        out = list(cells)
        if self.decision == "both":
            out += [d for d, hit in zip(wbc, covered(stain_boxes, det_boxes)) if not hit]
        if self.platelets:
            boxes = boxes_of(out)
            plt = [d for d in found if d.kind == "platelet"]
            out += [d for d, hit in zip(plt, touching(boxes_of(plt), boxes)) if not hit]
        return out


def _share(k: int, n: int) -> float | None:
    return round(k / n, 3) if n else None


def describe(check: dict[str, Any]) -> str:
    """One line for the terminal and the report."""
    d, s, n = check["detector_found"], check["stain_found"], check["stain_cells"]
    if check["decision"] == "both":
        return (
            f"the detector found {d:.0%} of the {n} white cells the stain segmenter found on the first "
            f"{check['frames']} frames: this session takes the white cells of both (check the detector on this "
            "microscope: hemaedge evaluate --detect)"
        )
    if check["decision"] == "checking":
        return f"checking the detector against the stain segmenter ({n} of {CHECK_CELLS} white cells so far)"
    if n < CHECK_CELLS:
        return f"detector not checked: the stain segmenter found {n} white cells in {check['frames']} frames"
    return f"the detector found {d:.0%} of the stain segmenter's {n} white cells (the stain segmenter {s:.0%} of its)"
