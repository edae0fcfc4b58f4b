"""The detector checked against the stain segmenter on each session's first white cells (``edge/segment/checked.py``).

The decision is tested with scripted segmenters (what each "finds" per frame is given); the station's use of it with
the hand-made detector and the synthetic smear; the shipped detector on real frames with the shared data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_detector_bundle
from hemaedge.edge.records import Detection
from hemaedge.edge.segment.checked import CHECK_CELLS, CHECK_FRAMES, CheckedSegmenter, covered

FRAME = np.full((120, 160, 3), 200, np.uint8)


def _cell(x: float, kind: str = "wbc") -> Detection:
    return Detection((x, 10.0, x + 20.0, 30.0), 0.9, kind)


class Scripted:
    """A segmenter that finds the cells at the given x positions, the same on every frame."""

    def __init__(self, xs: list[float], platelets: list[float] = ()):
        self.xs, self.platelet_xs, self.calls = list(xs), list(platelets), 0

    def detect(self, frame):  # noqa: ANN001, ANN201
        self.calls += 1
        return [_cell(x) for x in self.xs] + [_cell(x, "platelet") for x in self.platelet_xs]

    def with_platelets(self, on: bool = True):  # noqa: ANN201
        return self


def _run(det: Scripted, stain: Scripted, frames: int, platelets: bool = False) -> tuple[CheckedSegmenter, list]:
    seg = CheckedSegmenter(learned=det, stain=stain, platelets=platelets)
    out = [seg.detect(FRAME) for _ in range(frames)]
    return seg, out


def test_boxes_are_one_cell_when_they_overlap_or_one_holds_the_others_centre():
    a = np.array([[0, 0, 20, 20], [100, 100, 110, 110], [200, 200, 260, 260]], np.float32)
    b = np.array([[2, 2, 22, 22], [90, 90, 130, 130], [300, 300, 320, 320]], np.float32)
    # IoU 0.67; a small box inside a large one (IoU 0.06, but it holds the centre); no overlap at all
    assert covered(a, b).tolist() == [True, True, False]
    assert covered(b, a).tolist() == [True, True, False]
    assert covered(a, np.zeros((0, 4), np.float32)).tolist() == [False, False, False]


def test_a_detector_that_misses_the_stain_segmenters_cells_makes_the_session_take_both():
    det, stain = Scripted([0, 40]), Scripted([0, 40, 80, 120])  # the detector finds half of them
    seg, out = _run(det, stain, frames=CHECK_CELLS // 4 + 3)
    deciding = CHECK_CELLS // 4 - 1  # the frame on which the stain segmenter's cells reach CHECK_CELLS
    assert all(len(cells) == 2 for cells in out[:deciding])  # the detector alone while checking
    assert len(out[deciding]) == 4
    assert seg.decision == "both" and seg.check["detector_found"] == 0.5 and seg.check["stain_found"] == 1.0
    assert sorted(d.box[0] for d in out[-1]) == [0, 40, 80, 120]  # its cells plus the stain segmenter's others
    assert "takes the white cells of both" in seg.check["describe"]


def test_a_detector_that_finds_the_stain_segmenters_cells_is_kept_alone():
    det, stain = Scripted([0, 40, 80]), Scripted([0, 40, 80, 300])  # 3 of 4: over the 0.75 asked
    seg, out = _run(det, stain, frames=CHECK_CELLS // 4 + 5)
    assert seg.decision == "detector" and len(out[-1]) == 3
    calls = stain.calls
    seg.detect(FRAME)
    assert stain.calls == calls  # decided: without platelets the stain segmenter no longer runs


def test_a_stain_segmenter_that_sees_few_of_the_detectors_cells_does_not_overrule_it():
    # a blurred low-magnification picture: the stain segmenter finds one cell the detector does not have, and
    # none of the detector's eight; the detector is not the one missing cells
    det, stain = Scripted([0, 30, 60, 90, 120, 150, 180, 210]), Scripted([500])
    seg, _ = _run(det, stain, frames=CHECK_CELLS + 1)
    assert seg.decision == "detector"
    assert seg.check["detector_found"] == 0.0 and seg.check["stain_found"] == 0.0


def test_a_session_without_enough_cells_to_judge_keeps_the_detector():
    seg, _ = _run(Scripted([0]), Scripted([]), frames=CHECK_FRAMES)
    assert seg.decision == "detector" and seg.check["stain_cells"] == 0
    assert "not checked" in seg.check["describe"]
    assert CheckedSegmenter(learned=Scripted([]), stain=Scripted([])).check["decision"] == "checking"


def test_platelets_come_from_the_stain_segmenter_outside_every_white_cell():
    det, stain = Scripted([0, 40]), Scripted([0, 40, 80, 120], platelets=[85, 400])
    seg, out = _run(det, stain, frames=CHECK_CELLS // 4 + 1, platelets=True)
    assert seg.decision == "both"
    kinds = [(d.kind, d.box[0]) for d in out[-1]]
    assert ("platelet", 400) in kinds and ("platelet", 85) not in kinds  # 85 lies on the white cell at 80
    seg = CheckedSegmenter(learned=Scripted([0]), stain=Scripted([0]), platelets=False).with_platelets(True)
    assert seg.platelets


# ---------------------------------------------------------------------------------------------------------------------
# the station
# ---------------------------------------------------------------------------------------------------------------------
def _count(tmp_path, bundle_dir, monkeypatch, detector, frames: int, target: int) -> tuple[Path, dict]:  # noqa: ANN001
    """``hemaedge count`` of the synthetic smear with ``detector`` as the shipped detector: (session, summary)."""
    from hemaedge.edge import models

    from hemaedge.cli import main

    monkeypatch.setattr(models, "default_detector_path", lambda: detector)
    out = tmp_path / "s"
    args = ["count", f"synthetic://?seed=4&frames={frames}", "--bundle", str(bundle_dir), "--out", str(out)]
    assert main([*args, "--no-tui", "--target", str(target)]) == 0
    (session,) = out.iterdir()
    return session, json.loads((session / "summary.json").read_text())


def test_count_checks_the_detector_by_default_and_a_short_session_says_its_check_is_unfinished(
    tmp_path, tiny_bundle_dir, monkeypatch
):
    _, summary = _count(tmp_path, tiny_bundle_dir, monkeypatch, tiny_detector_bundle(tmp_path / "d"), 20, 5)
    assert summary["segmenter"] == "checked"
    check = summary["detector_check"]
    assert check["decision"] == "checking" and 0 < check["stain_cells"] < CHECK_CELLS
    assert "so far" in check["describe"]


# ---------------------------------------------------------------------------------------------------------------------
# real frames
# ---------------------------------------------------------------------------------------------------------------------
DATA = Path(os.environ.get("HEMAEDGE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_on_a_microscope_the_shipped_detector_knows_the_check_changes_nothing():
    """BCCD val (the detector never trained on these frames, but on this microscope): checked = learned."""
    if not (DATA / "bccd").is_dir():
        pytest.skip(f"BCCD not found under HEMAEDGE_DATA ({DATA})")
    from hemaedge.edge.models import default_detector_path
    from hemaedge.edge.segment import LearnedSegmenter
    from hemaedge.evaluation.frames import folder_items

    try:
        default_detector_path()
    except Exception as exc:  # noqa: BLE001 - any reason the shipped detector is not here
        pytest.skip(f"shipped detector not installed: {exc}")
    import cv2

    items = folder_items(DATA / "bccd", "val", None)[:40]
    checked, learned = CheckedSegmenter(scale="frame"), LearnedSegmenter(scale="frame")
    for it in items:
        bgr = cv2.imread(str(it.path))
        assert [d.box for d in checked.detect(bgr)] == [d.box for d in learned.detect(bgr)]
    assert checked.decision == "detector" and checked.check["detector_found"] >= 0.9


def test_a_detector_that_finds_nothing_here_is_caught_and_the_session_counts_the_stain_segmenters_cells(
    tmp_path, tiny_bundle_dir, monkeypatch, capsys
):
    blind = tiny_detector_bundle(tmp_path / "detector", threshold=0.999999)  # never sure of anything
    session, summary = _count(tmp_path, tiny_bundle_dir, monkeypatch, blind, 40, 30)
    check = summary["detector_check"]
    assert check["decision"] == "both" and check["detector_found"] == 0.0 and check["stain_cells"] >= CHECK_CELLS
    assert summary["differential"]["total_wbc"] >= 30  # counted from the stain segmenter's cells
    assert "takes the white cells of both" in " ".join(capsys.readouterr().err.split())  # however it was wrapped
    assert "white cells: the detector found 0%" in (session / "report.html").read_text()
