"""Test-only stand-in for the segmenter: the synthetic source's own ground-truth white cells.

It lets counting, store and display tests run independently of detection
quality (and gives every counted cell a ground-truth identity). It is not
evidence that segmentation works; ``hemaedge.edge.segment`` has its own tests.
"""

from __future__ import annotations

from hemaedge.edge.records import Detection, Frame
from hemaedge.edge.segment import Quality


class TruthSegmenter:
    """Detections = the frame's ground-truth WBC boxes."""

    def detect(self, frame: Frame) -> list[Detection]:
        if frame.truth is None:
            return []
        return [
            Detection(tuple(float(v) for v in box), 1.0, "wbc")
            for box, kind in zip(frame.truth, frame.truth_kinds)
            if kind == "wbc"
        ]


def always_ok(frame: Frame) -> Quality:
    return Quality(True, "", 1.0, 128.0)


def make(name: str = "stain", **options: float) -> TruthSegmenter:
    """Stands in for ``hemaedge.edge.segment.make_segmenter``."""
    return TruthSegmenter()


def install() -> None:
    """Make the station commands use the truth segmenter (for a subprocess; in-process tests use monkeypatch)."""
    import hemaedge.edge.segment as seg

    seg.make_segmenter = make
