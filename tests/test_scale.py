"""Scale awareness: pixels per micron measured on red cells, per frame and per session.

Fast tests use the synthetic smear, whose red-cell size is known; data tests check the measurement
against the red-cell labels of BCCD and TXL-PBC and skip when the data is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
from hemaedge.edge.segment.scale import (
    BLOB_TO_BOX,
    RBC_UM,
    Scale,
    SessionScale,
    combine,
    estimate_scale,
    field_mask,
    frame_guess,
    round_stop,
)
from hemaedge.edge.sources import SyntheticSource


def _frames(rbc_px: float, n: int = 3, seed: int = 3):
    return list(SyntheticSource(seed=seed, frames=n, rbc_px=rbc_px))


def _truth_rbc(frame) -> float:  # noqa: ANN001
    kinds = np.asarray(frame.truth_kinds)
    b = frame.truth[kinds == "rbc"]
    h, w = frame.pixels.shape[:2]
    inside = (b[:, 0] > 1) & (b[:, 1] > 1) & (b[:, 2] < w - 1) & (b[:, 3] < h - 1)
    b = b[inside]
    return float(np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))


@pytest.mark.parametrize("rbc_px", [14.0, 24.0, 40.0])
def test_red_cells_measure_the_scale_at_several_magnifications(rbc_px):
    for f in _frames(rbc_px):
        s = estimate_scale(f.bgr())
        assert s is not None and s.source == "measured"
        truth = _truth_rbc(f)
        assert 0.8 < s.rbc_px / truth < 1.35, (s.rbc_px, truth)
        assert s.px_per_um == pytest.approx(s.rbc_px / RBC_UM)


def test_the_measurement_follows_a_zoom():
    import cv2

    f = _frames(40.0, 1)[0].bgr()
    full = estimate_scale(f)
    half = estimate_scale(cv2.resize(f, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
    assert full is not None and half is not None
    assert half.px_per_um / full.px_per_um == pytest.approx(0.5, rel=0.15)


def test_a_blank_frame_says_nothing_and_the_session_falls_back_to_the_frame_size():
    blank = np.full((480, 640, 3), 230, np.uint8)
    assert estimate_scale(blank) is None
    session = SessionScale(frames=2)
    for _ in range(8):
        s = session.observe(blank)
    assert session.fixed and s.source == "frame"
    assert s.rbc_px == pytest.approx(frame_guess(blank.shape).rbc_px)


def test_a_stated_scale_is_used_as_stated():
    session = SessionScale(3.5)
    s = session.observe(_frames(30.0, 1)[0].bgr())
    assert session.fixed and s.source == "user" and s.px_per_um == 3.5
    assert "stated" in s.describe()
    with pytest.raises(ValueError):
        SessionScale(-1.0)


def test_the_session_scale_is_the_median_of_its_first_frames():
    frames = _frames(30.0, 4)
    session = SessionScale(frames=3)
    seen = [session.observe(f.bgr()) for f in frames]
    assert session.fixed and seen[-1] is seen[-2]  # fixed after three measured frames
    assert seen[-1].frames == 3 and seen[-1].source == "measured"
    d = seen[-1].as_dict()
    assert set(d) >= {"px_per_um", "rbc_px", "frames", "cells", "spread", "source"}
    assert combine([]) is None
    assert combine([Scale(2.0), Scale(4.0), Scale(3.0)]).px_per_um == 3.0


def test_an_eyepiece_field_stop_is_found_and_its_cells_measured():
    import cv2

    f = _frames(12.0, 1)[0].bgr().copy()
    mask = np.zeros(f.shape[:2], np.uint8)
    cv2.circle(mask, (320, 240), 220, 1, -1)
    f[mask == 0] = 10
    field = field_mask(f)
    assert field is not None and 0.47 < field.mean() < 0.52  # pi 220^2 / (640 x 480) = 0.495
    assert field_mask(_frames(12.0, 1)[0].bgr()) is None
    s = estimate_scale(f)
    assert s is not None and 0.75 < s.rbc_px / 12.0 < 1.5


def _rotated_onto_black(bgr: np.ndarray, angle: float) -> np.ndarray:
    import cv2

    h, w = bgr.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(bgr, m, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


@pytest.mark.parametrize("radius", [220, 290])  # a field stop inside the frame; one cut by the frame
def test_a_round_field_stop_is_told_from_the_straight_edges_of_padding(radius):
    import cv2

    f = _frames(12.0, 1)[0].bgr()
    stop = f.copy()
    mask = np.zeros(f.shape[:2], np.uint8)
    cv2.circle(mask, (320, 240), radius, 1, -1)
    stop[mask == 0] = 10
    field = field_mask(stop)
    assert field is not None and round_stop(field)
    rotated = field_mask(_rotated_onto_black(f, 30))  # an augmented single-cell image: its corners are black
    assert rotated is not None and not round_stop(rotated)
    bar = f.copy()
    bar[:, :120] = 0  # letter-boxed
    assert field_mask(bar) is not None and not round_stop(field_mask(bar))


# ---------------------------------------------------------------------------------------------------------------------
# data: against the red-cell labels
# ---------------------------------------------------------------------------------------------------------------------
def test_measurement_against_labelled_red_cells(data_root):
    """The blob diameter is BLOB_TO_BOX of a labelled red-cell box on every source (every 8th frame, full size)."""
    import cv2
    from conftest import need
    from hemaedge.evaluation.groundtruth import bccd_items, txl_items

    need(data_root / "txl-pbc")
    ratios: dict[str, list[float]] = {}
    items = (
        list(txl_items(data_root / "txl-pbc", "all", classes=(1,)))[::8]
        + list(bccd_items(data_root / "bccd", "val", ("RBC",)))[::8]
    )
    for it in items:
        img = cv2.imread(str(it.path))
        b = it.boxes
        h, w = img.shape[:2]
        b = b[(b[:, 0] > 2) & (b[:, 1] > 2) & (b[:, 2] < w - 2) & (b[:, 3] < h - 2)]
        if len(b) < 2:
            continue
        truth = float(np.median(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))))
        s = estimate_scale(img)
        if s is not None:
            ratios.setdefault(it.source, []).append(s.rbc_px * BLOB_TO_BOX / truth)
    assert set(ratios) >= {"PBC", "Raabin-WBC", "BCDD", "BCCD"}
    for src, r in ratios.items():
        med = float(np.median(r))
        assert 0.72 < med < 0.98, (src, med)  # blob / box per source 0.80-0.89 on all frames
        within = np.mean(np.abs(np.log(np.asarray(r) / med)) < np.log(1.2))
        assert within > 0.8, (src, within)
