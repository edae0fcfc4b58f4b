"""Counting: statistics, review bucket, flags, groups, and each physical cell counted once."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BLOODMNIST_CLASSES
from hemaedge.edge.count import CellMap, ClassGroups, DifferentialCounter, SlideRegistrar, SlideTracker, wilson_interval
from hemaedge.edge.sources import open_source


def onehot(i: int, p: float = 0.9, k: int = 8) -> np.ndarray:
    v = np.full(k, (1 - p) / (k - 1), np.float32)
    v[i] = p
    return v


# -- statistics --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (0, 100, 0.0, 3.70),  # Wald would say [0, 0]
        (50, 100, 40.38, 59.62),
        (100, 100, 96.30, 100.0),
        (2, 100, 0.55, 7.00),
        (1, 10, 1.79, 40.42),
    ],
)
def test_wilson_interval_matches_reference_values(k, n, lo, hi):
    a, b = wilson_interval(k, n)
    assert a == pytest.approx(lo, abs=0.02) and b == pytest.approx(hi, abs=0.02)


def test_wilson_interval_without_cells_is_uninformative_and_rejects_nonsense():
    assert wilson_interval(0, 0) == (0.0, 100.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


# -- counter -----------------------------------------------------------------------------------------------------------
def test_low_confidence_goes_to_review_not_a_forced_class():
    c = DifferentialCounter(BLOODMNIST_CLASSES, target=10, review_threshold=0.6)
    idx, name, conf, review = c.decide(onehot(6, 0.55))
    assert (name, review) == ("neutrophil", True)
    assert c.add(idx, review) == "review"
    idx, name, conf, review = c.decide(onehot(6, 0.95))
    assert c.add(idx, review) == "neutrophil"
    snap = c.snapshot()
    assert snap.review == 1 and snap.counts["neutrophil"] == 1 and snap.total == 2


def test_platelets_and_nucleated_red_cells_do_not_count_towards_the_target():
    c = DifferentialCounter(BLOODMNIST_CLASSES, target=3)
    for cls in ("platelet", "erythroblast", "platelet"):
        c.add(BLOODMNIST_CLASSES.index(cls), False)
    assert c.total == 0 and not c.done
    for cls in ("neutrophil", "lymphocyte"):
        c.add(BLOODMNIST_CLASSES.index(cls), False)
    c.add(0, True)  # a review cell is a white cell awaiting a person's decision: it counts
    assert c.total == 3 and c.done
    snap = c.snapshot()
    assert "platelet" not in snap.percentages and snap.counts["platelet"] == 2
    assert sum(snap.percentages.values()) == pytest.approx(100.0)
    assert any("Nucleated RBCs" in f for f in snap.flags)


def test_percentages_and_intervals_per_class():
    c = DifferentialCounter(BLOODMNIST_CLASSES, target=100)
    for _ in range(60):
        c.add(BLOODMNIST_CLASSES.index("neutrophil"), False)
    for _ in range(40):
        c.add(BLOODMNIST_CLASSES.index("lymphocyte"), False)
    snap = c.snapshot()
    assert snap.percentages["neutrophil"] == pytest.approx(60.0)
    lo, hi = snap.intervals["neutrophil"]
    assert lo < 60 < hi and (lo, hi) == pytest.approx(wilson_interval(60, 100))
    assert snap.group_counts["neutrophils"] == 60


def _count(**per_class: int) -> DifferentialCounter:
    c = DifferentialCounter(BLOODMNIST_CLASSES, target=100)
    for name, k in per_class.items():
        for _ in range(k):
            c.add(BLOODMNIST_CLASSES.index(name.replace("_", " ")), False)
    return c


def test_reference_range_flags_only_when_the_interval_excludes_the_range():
    # 80 % neutrophils of 100: CI ~71-87 overlaps 40-75 -> no flag (could be noise at n=100)
    flags = _count(neutrophil=80, lymphocyte=15, monocyte=5).snapshot().flags
    assert not any("Neutrophils" in f for f in flags)
    # 92 %: CI ~85-96 lies above 75 -> flagged, and the flag says it is the interval that decides
    flags = _count(neutrophil=92, lymphocyte=5, monocyte=3).snapshot().flags
    hi = [f for f in flags if f.startswith("Neutrophils high")]
    assert hi and "95% CI" in hi[0] and "40-75" in hi[0]
    assert any(f.startswith("Lymphocytes low") for f in flags)


def test_blasts_left_shift_and_review_flags():
    classes = ("myeloblast", "lymphoblast", "promyelocyte", "neutrophil", "lymphocyte")
    c = DifferentialCounter(classes, target=50, review_threshold=0.6)
    for i in (0, 1, 2, 3, 3, 3, 4, 4):
        c.add(i, False)
    for _ in range(2):
        c.add(3, True)
    flags = c.snapshot().flags
    assert any(f.startswith("BLASTS present: 2 cells") for f in flags)
    assert any("left shift" in f for f in flags)
    review = [f for f in flags if f.startswith("Review: 2 cells (20 %)")]
    assert review and "check the gallery" in review[0] and "may be unlike" not in review[0]
    assert c.snapshot().group_counts["blasts"] == 2


def test_a_count_mostly_in_review_is_flagged_first_as_doubtful():
    c = DifferentialCounter(("neutrophil", "lymphocyte", "basophil"), target=20, review_threshold=0.6)
    for i in (0, 0, 1, 2, 2, 2, 2):
        c.add(i, False)
    for _ in range(3):
        c.add(0, True)  # 3 of 10: over the 25 % of UNFAMILIAR_REVIEW_SHARE
    flags = c.snapshot().flags
    assert flags[0].startswith("Review: 3 cells (30 %)") and "may be unlike those the model was trained" in flags[0]
    assert "hemaedge evaluate --station" in flags[0]
    assert any(f.startswith("Basophils high") for f in flags[1:])  # the flags it qualifies follow it
    assert sum(f.startswith("Review:") for f in flags) == 1
    blasts = DifferentialCounter(("blast", "lymphocyte"), target=20, review_threshold=0.6)
    for i, review in ((0, False), (1, False), (1, True), (1, True)):
        blasts.add(i, review)
    flags = blasts.snapshot().flags
    assert flags[0].startswith("BLASTS present") and flags[1].startswith("Review: 2 cells (50 %)")


def test_manifest_class_groups_win_over_the_name_rules():
    g = ClassGroups.build(("A", "B", "C"), {"blasts": ["A"], "neutrophils": ["B", "C"]})
    assert g.groups == {"blasts": ("A",), "neutrophils": ("B", "C")}
    assert g.labels["blasts"] == "Blasts"
    d = ClassGroups.build(BLOODMNIST_CLASSES)
    assert d.groups["immature_granulocytes"] == ("immature granulocyte",)
    assert [c for c, x in zip(BLOODMNIST_CLASSES, d.differential) if not x] == ["erythroblast", "platelet"]


# -- each physical cell once -------------------------------------------------------------------------------------------
def test_registration_follows_the_stage_on_a_panning_synthetic_slide():
    reg = SlideRegistrar()
    with open_source("synthetic://?seed=2&frames=120&pan=3") as src:
        errors = []
        for frame in src:
            r = reg.register(frame.pixels)
            ox, oy = src.field_origin(frame.index)
            if frame.index == 0:
                x0, y0 = ox - r.ox, oy - r.oy
            errors.append((r.ox + x0 - ox, r.oy + y0 - oy))
            assert r.field == 1
    err = np.abs(np.array(errors))
    assert err.max() < 8.0, err.max()  # cells are ~45 px across; matching tolerates half a diameter
    assert 2 < len(reg.keyframes) < 120


def test_unrelated_frames_start_new_fields_and_replayed_frames_relocalise():
    reg = SlideRegistrar()
    with open_source("synthetic://?seed=4&frames=6") as src:  # no pan: every frame a different field
        frames = list(src)
    fields = [reg.register(f.pixels).field for f in frames]
    assert fields == [1, 2, 3, 4, 5, 6]
    replay = [reg.register(f.pixels) for f in frames]
    assert [r.field for r in replay] == fields
    assert all(r.how in ("tracked", "relocalised") and abs(r.ox) < 1 and abs(r.oy) < 1 for r in replay)


def test_cell_map_keeps_touching_cells_apart_and_matches_within_half_a_diameter():
    m = CellMap()
    a = m.add(1, 100, 100, 40, 40)
    b = m.add(1, 140, 100, 40, 40)  # touching neighbour
    assert m.match(1, [(102, 99, 40, 40), (138, 101, 40, 40)]) == [a, b]
    assert m.match(1, [(200, 200, 40, 40)]) == [None]
    assert m.match(1, [(120, 160, 40, 40)]) == [None]  # nearby but a different cell
    assert m.match(2, [(100, 100, 40, 40)]) == [None]  # another field is another coordinate system


def test_pieces_of_a_known_cell_are_not_new_cells_and_a_whole_cell_is_not_its_piece_again():
    m = CellMap()
    whole = m.add(1, 100, 100, 60, 60)
    # the segmenter splits the cell into two lobes in a later frame: both are the known cell
    assert m.match(1, [(85, 100, 24, 40), (115, 100, 24, 40)]) == [whole, whole]
    m2 = CellMap()
    piece = m2.add(1, 120, 100, 24, 40)  # only a piece was seen while the cell entered the view
    assert m2.match(1, [(100, 100, 60, 60)]) == [piece]
    m2.update(piece, 100, 100, 60, 60)  # from now on the whole cell is what is known
    assert m2.match(1, [(80, 100, 20, 40)]) == [piece]


def _truth_wbc(frame):
    keep = [i for i, k in enumerate(frame.truth_kinds) if k == "wbc"]
    return keep, [tuple(frame.truth[i]) for i in keep]


def test_each_physical_cell_counted_once_while_the_slide_moves():
    tracker = SlideTracker()
    counted: list[int] = []
    visible: set[int] = set()
    with open_source("synthetic://?seed=5&frames=300&pan=5&wbc=4") as src:
        for frame in src:
            keep, boxes = _truth_wbc(frame)
            ids = src.truth_ids(frame.index)
            res = tracker.observe(frame.pixels, boxes)
            counted += [ids[keep[t.index]] for t in res.new]
            h, w = frame.pixels.shape[:2]
            visible |= {ids[i] for i, b in zip(keep, boxes) if b[0] > 2 and b[1] > 2 and b[2] < w - 3 and b[3] < h - 3}
    assert len(counted) == len(set(counted)), "a cell was counted twice"
    assert set(counted) == visible, "a cell fully in view was never counted"
    assert len(counted) > 40


def test_cells_cut_by_the_border_wait_until_fully_in_view_unless_asked():
    tracker = SlideTracker(edge_margin=2)
    frame = np.full((100, 100, 3), 200, np.uint8)
    res = tracker.observe(frame, [(0, 10, 20, 30), (40, 40, 60, 60)])
    assert res.at_edge == 1 and len(res.new) == 1
    res = SlideTracker(edge_margin=-1).observe(frame, [(0, 10, 20, 30)])
    assert len(res.new) == 1


@pytest.mark.data
def test_different_views_with_a_white_cell_in_the_same_place_are_not_one_view(data_root):
    """BCCD 00017 and 00036 show different eosinophils at a similar spot: phase correlation alone peaks
    (response ~0.3), the aligned red cells do not line up. 00037 and 00038 are the same view twice."""
    import cv2
    from conftest import need

    def img(n):
        return cv2.imread(str(need(data_root / "bccd" / "JPEGImages" / f"BloodImage_{n:05d}.jpg")))

    reg = SlideRegistrar()
    a, b = reg.register(img(17)), reg.register(img(36))
    assert a.field != b.field
    c, d = reg.register(img(37)), reg.register(img(38))
    assert c.field == d.field and d.how == "tracked" and abs(d.ox - c.ox + 5) < 3


def test_review_weighs_the_top_class_s_group_not_the_class_alone():
    """Unsure only between band and segmented neutrophil: still a neutrophil in the differential, not a review cell;
    unsure between a neutrophil and a blast: review."""
    import numpy as np
    from hemaedge.edge.records import Prediction

    classes = ["blast", "neutrophil_band", "neutrophil_segmented", "lymphocyte"]
    groups = {
        "blasts": ["blast"],
        "neutrophils": ["neutrophil_band", "neutrophil_segmented"],
        "lymphocytes": ["lymphocyte"],
    }
    c = DifferentialCounter(classes, 10, 0.6, groups)
    split = np.array([0.05, 0.45, 0.40, 0.10], np.float32)
    assert c.decide(split) == (1, "neutrophil_band", pytest.approx(0.45), False)
    assert not c.is_review(Prediction(1, "neutrophil_band", 0.45, split))
    torn = np.array([0.40, 0.45, 0.05, 0.10], np.float32)
    assert c.decide(torn)[3] and c.is_review(Prediction(1, "neutrophil_band", 0.45, torn))
    assert c.group_confidence(0, torn) == pytest.approx(0.40)
