"""The learned white-cell detector: decoding, the detector bundle contract, the segmenter, evaluation folders,
training canvases, synthetic phone frames, export with its gate, and the station commands with ``--segmenter learned``.

Fast tests use a hand-made detector (``helpers.tiny_detector_bundle``: one convolution that fires on nuclei) and
the synthetic smear; data tests use the shared data and the shipped detector, and skip when they are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_detector_bundle
from hemaedge.edge.bundle import load_bundle
from hemaedge.edge.errors import AccuracyGateError, BundleError, InputError, UsageError
from hemaedge.edge.segment import CheckedSegmenter, LearnedSegmenter, make_segmenter
from hemaedge.edge.segment.learned import DetectorSpec, decode, nms, prepare, to_frame
from hemaedge.edge.segment.scale import estimate_scale
from hemaedge.edge.sources import SyntheticSource


@pytest.fixture()
def detector_dir(tmp_path: Path) -> Path:
    return tiny_detector_bundle(tmp_path / "detector")


def _wbc(frame) -> np.ndarray:  # noqa: ANN001
    kinds = np.asarray(frame.truth_kinds)
    return frame.truth[kinds == "wbc"]


# ---------------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------------
def test_decode_turns_a_heatmap_peak_into_a_box():
    spec = DetectorSpec(px_per_um=1.75, stride=4, threshold=0.5)
    out = np.zeros((5, 16, 20), np.float32)
    out[0] = -8.0
    out[0, 5, 7] = 3.0
    out[1, 5, 7] = np.log(6.0)  # 24 px wide
    out[2, 5, 7] = np.log(4.0)  # 16 px high
    out[3, 5, 7] = 0.5
    out[4, 5, 7] = 0.25
    boxes, scores = decode(out, spec, (64, 80))
    assert len(boxes) == 1 and scores[0] == pytest.approx(1 / (1 + np.exp(-3.0)), rel=1e-4)
    cx, cy = (7 + 0.5) * 4, (5 + 0.25) * 4
    np.testing.assert_allclose(boxes[0], [cx - 12, cy - 8, cx + 12, cy + 8], atol=1e-4)
    # boxes leave the image: clipped; nothing above the threshold: nothing
    out[0, 5, 7] = -1.0
    assert len(decode(out, spec, (64, 80))[0]) == 0
    assert len(decode(out, spec, (64, 80), threshold=0.2)[0]) == 1


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.asarray([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    keep = nms(boxes, np.asarray([0.6, 0.9, 0.5], np.float32), 0.5)
    assert keep.tolist() == [1, 2]


def test_prepare_resizes_white_balances_and_pads():
    spec = DetectorSpec(px_per_um=2.0, pad_multiple=16)
    img = np.full((100, 130, 3), (200, 180, 190), np.uint8)
    x, size = prepare(img, 0.5, spec, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert size == (50, 65) and x.shape == (1, 3, 64, 80) and x.dtype == np.float32
    assert np.allclose(x[0, :, :50, :65], (235 / 255 - 0.5) / 0.25, atol=0.02)  # white-balanced background
    np.testing.assert_allclose(to_frame(np.asarray([[0, 0, 65, 50]], np.float32), size, (100, 130)), [[0, 0, 130, 100]])


@pytest.mark.parametrize("factor", [0.5, 0.61, 1.0, 1.3])
@pytest.mark.parametrize("scene", ["smear", "black"])
def test_prepare_computes_exactly_what_balancing_then_normalising_each_pixel_gives(factor, scene):
    # prepare folds the white balance and the normalisation into one look-up table for speed: the detector must
    # still see the very values the step-by-step computation gives (its golden outputs and gates were made so)
    import cv2
    from hemaedge.edge.segment.learned import BACKGROUND
    from hemaedge.edge.segment.stain import white_balance

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (97, 131, 3), np.uint8) if scene == "smear" else np.zeros((97, 131, 3), np.uint8)
    if scene == "smear":
        img[rng.random((97, 131)) < 0.5] = (210, 190, 230)  # a tinted background for the balance to remove
    spec = DetectorSpec(px_per_um=2.0, pad_multiple=16)
    mean, std = (0.6, 0.5, 0.4), (0.2, 0.25, 0.3)
    x, size = prepare(img, factor, spec, mean, std)
    h, w = img.shape[:2]
    nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
    small = (
        img
        if (nw, nh) == (w, h)
        else cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    )
    small = white_balance(small)
    small = cv2.copyMakeBorder(small, 0, -nh % 16, 0, -nw % 16, cv2.BORDER_CONSTANT, value=(BACKGROUND,) * 3)
    want = small[:, :, ::-1].astype(np.float32)
    want *= np.float32(1.0 / 255.0)
    want -= np.asarray(mean, np.float32)
    want /= np.asarray(std, np.float32)
    assert size == (nh, nw) and x.flags.c_contiguous
    np.testing.assert_array_equal(x, want.transpose(2, 0, 1)[None])


# ---------------------------------------------------------------------------------------------------------------------
# the bundle contract and the segmenter
# ---------------------------------------------------------------------------------------------------------------------
def test_a_classifier_bundle_is_not_a_detector(tiny_bundle_dir):
    with pytest.raises(BundleError, match="not a detector bundle"):
        LearnedSegmenter(tiny_bundle_dir)


def test_a_detector_bundle_loads_and_says_what_it_is(detector_dir):
    b = load_bundle(detector_dir)
    spec = DetectorSpec.from_manifest(b.manifest)
    assert b.manifest.extra["task"] == "detect" and spec.px_per_um == 1.75 and spec.stride == 4
    assert b.manifest.classes == ("wbc",)


def test_learned_segmenter_finds_nuclei_at_the_session_scale(detector_dir):
    seg = make_segmenter("learned", bundle=detector_dir)
    assert seg.name == "learned" and seg.precision == "fp32"
    tp = n = 0
    from hemaedge.edge.segment.matching import match

    for f in SyntheticSource(seed=5, frames=12, rbc_px=30):
        dets = seg.detect(f)
        assert all(d.kind == "wbc" and 0 <= d.score <= 1 for d in dets)
        boxes = np.asarray([d.box for d in dets], np.float32).reshape(-1, 4)
        t, _, fn = match(boxes, None, _wbc(f), rule="centre")
        tp, n = tp + t, n + t + fn
    assert n and tp / n > 0.7  # a one-convolution "detector": the plumbing is what is tested
    assert seg.scale is not None and seg.scale.source == "measured" and seg.session.fixed
    assert 0.7 < seg.scale.rbc_px / 30 < 1.5


def test_a_stated_scale_sets_the_working_size(detector_dir):
    seg = LearnedSegmenter(detector_dir, scale=3.5)
    f = next(iter(SyntheticSource(seed=1, frames=1)))
    seg.detect(f)
    assert seg.scale.source == "user" and seg.scale.px_per_um == 3.5
    _, _, factor = seg.run(f.bgr(), seg.scale)
    assert factor == pytest.approx(1.75 / 3.5)
    with pytest.raises(UsageError):
        LearnedSegmenter(detector_dir, scale="sometimes")


def test_white_cells_check_the_red_cell_scale(tmp_path, monkeypatch):
    """A detector whose cells come out half their usual size says the scale is off by 2x: a session corrects it
    once, from ten pooled cells; a still image corrects its own; a stated scale is never corrected."""
    small = tiny_detector_bundle(tmp_path / "small", box_cells=3.0)  # 12 working px: 6.9 um instead of 13.8
    frames = list(SyntheticSource(seed=5, frames=16, rbc_px=30))
    seg = LearnedSegmenter(small)
    for f in frames:
        seg.detect(f)
    assert seg.scale.source == "measured+wbc" and seg.session.fixed
    measured = LearnedSegmenter(small, scale="frame")
    corrected = 0
    for f in SyntheticSource(seed=5, frames=4, rbc_px=30, wbc=9):  # frames with five or more cells correct their own
        measured.detect(f)
        if measured.last_scale.source == "measured+wbc":
            corrected += 1
            assert measured.last_scale.px_per_um < 0.6 * estimate_scale(f.bgr()).px_per_um
    assert corrected
    stated = LearnedSegmenter(small, scale=4.0)
    for f in frames[:12]:
        stated.detect(f)
    assert stated.scale.source == "user" and stated.scale.px_per_um == 4.0
    normal = LearnedSegmenter(tiny_detector_bundle(tmp_path / "normal"))
    for f in frames:
        normal.detect(f)
    assert normal.scale.source == "measured"


def test_a_picture_through_an_eyepiece_is_searched_for_its_scale(detector_dir):
    import cv2

    f = next(iter(SyntheticSource(seed=6, frames=1, rbc_px=16))).bgr().copy()
    plain = LearnedSegmenter(detector_dir, scale="frame")
    s = plain.frame_scale(f)
    assert plain.eyepiece_search(f, s) is s  # no field stop: a microscope camera, nothing searched
    mask = np.zeros(f.shape[:2], np.uint8)
    cv2.circle(mask, (320, 240), 230, 1, -1)
    f[mask == 0] = 8
    s = plain.frame_scale(f)
    found = plain.eyepiece_search(f, s)
    assert any(found.px_per_um == pytest.approx(s.px_per_um * k) for k in (1.0, 0.7, 0.5))
    stated = LearnedSegmenter(detector_dir, scale=2.0)
    assert stated.eyepiece_search(f, stated.frame_scale(f)).px_per_um == 2.0
    h, w = f.shape[:2]  # a camera picture rotated onto black (augmented copies): dark corners, no field stop
    padded = cv2.warpAffine(
        next(iter(SyntheticSource(seed=6, frames=1, rbc_px=16))).bgr(),
        cv2.getRotationMatrix2D((w / 2, h / 2), 30, 1.0),
        (w, h),
    )
    runs = []
    real_run = plain.run
    plain.run = lambda *a, **k: runs.append(1) or real_run(*a, **k)
    s = plain.frame_scale(padded)
    assert plain.eyepiece_search(padded, s) is s and not runs  # not searched at all
    plain.eyepiece_search(f, plain.frame_scale(f))
    assert len(runs) == 3  # the field stop is searched: the red-cell scale and two smaller ones
    session = LearnedSegmenter(detector_dir)
    for _ in range(12):
        session.detect(f)
    assert session.session.fixed and session._eyepiece_done


def test_the_checked_detector_is_the_default_and_stain_the_fallback(monkeypatch):
    from hemaedge.edge import models
    from hemaedge.edge.segment import StainSegmenter, default_segmenter_name

    if default_segmenter_name() == "checked":  # the detector, checked against the stain segmenter
        seg = make_segmenter()
        assert isinstance(seg, CheckedSegmenter) and isinstance(seg.learned, LearnedSegmenter)

    def missing():
        raise BundleError("no detector bundle here")

    monkeypatch.setattr(models, "default_detector_path", missing)
    assert default_segmenter_name() == "stain"
    assert isinstance(make_segmenter(None, threshold=0.3), StainSegmenter)  # detector options are dropped
    for name in ("learned", "checked"):
        with pytest.raises(BundleError):
            make_segmenter(name)  # asked for by name: no silent fallback


def test_platelets_with_the_learned_detector_come_from_the_stain_segmenter():
    from hemaedge.edge.models import default_detector_path

    try:
        seg = LearnedSegmenter(default_detector_path())
    except BundleError:
        pytest.skip("no detector bundle shipped in edge/models")
    both = seg.with_platelets(True)
    assert both.with_platelets(False) is seg and seg.with_platelets(False) is seg
    frames = list(SyntheticSource(seed=1, frames=12, rbc_px=144))  # the platelet tests' magnified smear
    kinds = [d.kind for f in frames for d in both.detect(f)]
    assert "wbc" in kinds and "platelet" in kinds
    assert both.scale is not None  # the detector's session scale shows through


def test_make_segmenter_refuses_unknown_names():
    with pytest.raises(UsageError, match="unknown segmenter"):
        make_segmenter("magic")


# ---------------------------------------------------------------------------------------------------------------------
# evaluation folders (hemaedge evaluate --detect)
# ---------------------------------------------------------------------------------------------------------------------
def _write_voc(root: Path, frames) -> None:  # noqa: ANN001
    import cv2

    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(root / "JPEGImages" / f"f{i}.jpg"), f.bgr())
        objs = "".join(
            f"<object><name>WBC</name><bndbox><xmin>{b[0]:.0f}</xmin><ymin>{b[1]:.0f}</ymin>"
            f"<xmax>{b[2]:.0f}</xmax><ymax>{b[3]:.0f}</ymax></bndbox></object>"
            for b in _wbc(f)
        )
        (root / "Annotations" / f"f{i}.xml").write_text(f"<annotation>{objs}</annotation>")
    (root / "val.txt").write_text("\n".join(f"f{i}" for i in range(len(frames))))


def _write_yolo(root: Path, frames) -> None:  # noqa: ANN001
    import cv2

    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("RBC\nWBC\n")
    rows = []
    for i, f in enumerate(frames):
        h, w = f.pixels.shape[:2]
        cv2.imwrite(str(root / "images" / "val" / f"f{i}.png"), f.bgr())
        lines = [
            f"1 {(b[0] + b[2]) / 2 / w} {(b[1] + b[3]) / 2 / h} {(b[2] - b[0]) / w} {(b[3] - b[1]) / h}"
            for b in _wbc(f)
        ]
        (root / "labels" / "val" / f"f{i}.txt").write_text("\n".join(lines))
        rows.append(f"f{i}.png,{'scopeA' if i % 2 else 'scopeB'}")
    (root / "sources.csv").write_text("\n".join(rows))


def test_evaluate_detect_reads_voc_and_yolo_folders_with_sources(tmp_path, capsys):
    from hemaedge.evaluation.frames import folder_items, folder_kind

    from hemaedge.cli import main

    frames = list(SyntheticSource(seed=2, frames=4))
    _write_voc(tmp_path / "voc", frames)
    _write_yolo(tmp_path / "yolo", frames)
    assert folder_kind(tmp_path / "voc") == "voc" and folder_kind(tmp_path / "yolo") == "yolo"
    voc, yolo = folder_items(tmp_path / "voc", "val"), folder_items(tmp_path / "yolo", "all")
    assert len(voc) == len(yolo) == 4
    for a, b in zip(voc, yolo):  # class 1 is WBC by classes.txt
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1.0)
    assert {it.source for it in yolo} == {"scopeA", "scopeB"}
    with pytest.raises(InputError):
        folder_kind(tmp_path)
    code = main(
        ["evaluate", "--detect", str(tmp_path / "voc"), str(tmp_path / "yolo"), "--segmenter", "stain", "--json"]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["segmenter"] == "stain" and len(doc["results"]) == 2
    yolo_res = next(v for k, v in doc["results"].items() if k.startswith("yolo"))
    assert set(yolo_res) == {"all", "scopeA", "scopeB"}
    assert yolo_res["all"]["truth"] == sum(len(_wbc(f)) for f in frames)
    assert yolo_res["all"]["recall"] > 0.9  # the stain segmenter on the synthetic smear


def args_of(tmp_path: Path, detector_dir: Path) -> list[str]:
    return ["evaluate", "--detect", str(tmp_path / "voc"), "--detector", str(detector_dir)]


def test_evaluate_detect_runs_the_learned_detector(tmp_path, detector_dir, capsys):
    from hemaedge.cli import main

    _write_voc(tmp_path / "voc", list(SyntheticSource(seed=2, frames=3)))
    code = main([*args_of(tmp_path, detector_dir), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    # a detector given without --segmenter is checked against the stain segmenter, as the station runs it (each
    # source one session); --segmenter learned scores the detector alone
    assert doc["segmenter"] == "checked" and doc["scale"] == "frame"
    checked = next(iter(doc["results"].values()))["all"]
    assert checked["images"] == 3 and checked["truth"] > 0
    assert main([*args_of(tmp_path, detector_dir), "--segmenter", "learned", "--json"]) == 0
    alone = next(iter(json.loads(capsys.readouterr().out)["results"].values()))["all"]
    assert alone["truth"] == checked["truth"] and alone["tp"] <= checked["tp"]
    args = ["evaluate", "--detect", str(tmp_path / "voc"), "--segmenter", "stain", "--threshold", "0.3"]
    assert main(args) == 2  # the stain segmenter has no threshold


# ---------------------------------------------------------------------------------------------------------------------
# the station with the learned detector
# ---------------------------------------------------------------------------------------------------------------------
def test_count_with_the_learned_detector_records_the_scale(tmp_path, detector_dir, tiny_bundle_dir, monkeypatch):
    from hemaedge.edge import models

    from hemaedge.cli import main

    monkeypatch.setattr(models, "default_detector_path", lambda: detector_dir)
    out = tmp_path / "s"
    code = main(
        [
            "count",
            "synthetic://?seed=4&frames=20",
            "--segmenter",
            "learned",
            "--bundle",
            str(tiny_bundle_dir),
            "--out",
            str(out),
            "--no-tui",
            "--target",
            "5",
        ]
    )
    assert code == 0
    (session,) = out.iterdir()
    summary = json.loads((session / "summary.json").read_text())
    assert summary["segmenter"] == "learned"
    assert summary["scale"]["source"] == "measured" and summary["scale"]["px_per_um"] > 0
    assert "px/um" in (session / "report.html").read_text()


def test_count_takes_a_stated_scale(tmp_path, tiny_bundle_dir):
    from hemaedge.cli import main

    out = tmp_path / "s"
    code = main(
        [
            "count",
            "synthetic://?seed=4&frames=10",
            "--px-per-um",
            "6.5",
            "--bundle",
            str(tiny_bundle_dir),
            "--out",
            str(out),
            "--no-tui",
        ]
    )
    assert code == 0
    (session,) = out.iterdir()
    summary = json.loads((session / "summary.json").read_text())
    assert summary["scale"]["source"] == "user"
    assert summary["scale"]["px_per_um"] == 6.5
    with pytest.raises(SystemExit) as exc:  # argparse refuses it
        main(["count", "--demo", "--px-per-um", "-2"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------------------------------
# training canvases and synthetic phone frames (workstation)
# ---------------------------------------------------------------------------------------------------------------------
def _fake_frames(n: int = 6):
    from hemaedge.export.detector.data import LabelledFrame

    out = []
    for i, f in enumerate(SyntheticSource(seed=9, frames=n, rbc_px=26)):
        out.append(LabelledFrame(f"f{i}", "synthetic", "train", f.bgr(), _wbc(f), 1.0, 3.5, "measured"))
    return out


def test_canvases_and_targets():
    pytest.importorskip("torch")
    from hemaedge.export.detector.augment import make_canvas, targets

    frames = _fake_frames()
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(12):
        img, boxes, ignore = make_canvas(frames, rng, 128, 2.0, phone_p=0.5)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        assert (boxes >= 0).all() and (boxes <= 128).all()
        heat, reg, mask, weight = targets(boxes, ignore, 128)
        assert heat.shape == (32, 32) and reg.shape == (4, 32, 32)
        assert int(mask.sum()) <= len(boxes) and heat.max() <= 1.0
        seen += len(boxes)
    assert seen > 0


def test_training_loss_falls_on_a_tiny_net():
    torch = pytest.importorskip("torch")
    from hemaedge.export.detector.model import WBCNet
    from hemaedge.export.detector.train import DetectorRecipe, _sampler, batch, losses

    torch.manual_seed(0)
    r = DetectorRecipe(batch=4, canvas=64, widths=(4, 8, 8, 8), head=4)
    rng = np.random.default_rng(0)
    draw = _sampler(_fake_frames(), 0.5, rng)
    x, heat, reg, mask, weight = batch(draw, rng, r)
    net = WBCNet(r.widths, r.head)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for _ in range(15):
        loss = losses(net(x), heat, reg, mask, weight)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or float(loss)
    assert float(loss) < first


def test_phone_frames_have_a_field_stop_small_cells_and_ignore_regions(tmp_path):
    pytest.importorskip("torch")
    import cv2
    from hemaedge.export.detector.phone import Tile, phone_set, score_phone

    tiles = []
    for i, f in enumerate(SyntheticSource(seed=3, frames=4, rbc_px=40)):
        p = tmp_path / f"t{i}.png"
        cv2.imwrite(str(p), f.bgr())
        kinds = np.asarray(f.truth_kinds)
        tiles.append(Tile(str(p), f.truth[kinds == "wbc"], f.truth[kinds == "rbc"], "synthetic"))
    frames = phone_set(tiles, 2, seed=1)
    for pf in frames:
        assert pf.pixels.shape == (480, 640, 3)
        assert 15 <= pf.wbc_px <= 25
        sides = np.maximum(pf.boxes[:, 2] - pf.boxes[:, 0], pf.boxes[:, 3] - pf.boxes[:, 1])
        assert len(sides) and np.median(sides) < 40
        assert pf.pixels[0, 0].max() < 60  # the dark surround
    perfect = score_phone(lambda img: (frames[0].boxes, np.ones(len(frames[0].boxes))), frames[:1])
    assert perfect["all"]["recall"] == 1.0 and perfect["all"]["precision"] == 1.0
    if len(frames[0].ignore):  # a detection centred in an ignore region is neither a hit nor a false alarm
        extra = np.concatenate([frames[0].boxes, frames[0].ignore[:1]])
        res = score_phone(lambda img: (extra, np.ones(len(extra))), frames[:1])
        assert res["all"]["fp"] == 0


def test_detection_gate():
    from hemaedge.export.detector.export import detection_gate

    detection_gate({"recall": 0.98, "precision": 0.97}, {"recall": 0.975, "precision": 0.965}, 1.0)
    with pytest.raises(AccuracyGateError, match="precision"):
        detection_gate({"recall": 0.98, "precision": 0.97}, {"recall": 0.98, "precision": 0.95}, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# data: export through export-model, and the shipped detector
# ---------------------------------------------------------------------------------------------------------------------
def test_export_model_builds_a_gated_detector_bundle(tmp_path, data_root, capsys):
    torch = pytest.importorskip("torch")
    from conftest import need
    from hemaedge.export.detector.model import WBCNet
    from hemaedge.export.detector.train import DetectorRecipe, save

    from hemaedge.cli import export_model_main

    need(data_root / "bccd")
    need(data_root / "txl-pbc")
    torch.manual_seed(0)
    ck = tmp_path / "det.pt"
    save(WBCNet((4, 8, 8, 8), 4), DetectorRecipe(widths=(4, 8, 8, 8), head=4), ck, 1, {"synthetic": 1})
    out = tmp_path / "bundle"
    code = export_model_main(
        [
            str(ck),
            "--int8",
            "--out",
            str(out),
            "--data",
            str(data_root),
            "--calib-size",
            "6",
            "--threshold",
            "0.3",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "detect" and summary["gate"] == "passed"
    b = load_bundle(out)
    m = b.manifest
    assert m.extra["task"] == "detect" and m.extra["detector"]["threshold"] == 0.3
    assert {a.file for a in m.artifacts} >= {"model.onnx", "model.int8.onnx", "golden.npz"}
    assert m.calibration["num_images"] == 6 and m.provenance["training_recipe"]["widths"] == [4, 8, 8, 8]
    seg = LearnedSegmenter(out)
    assert isinstance(seg.detect(next(iter(SyntheticSource(frames=1)))), list)
    assert export_model_main([str(ck), "--out", str(tmp_path / "x"), "--search", "--int8"]) == 2


def test_shipped_detector_on_bccd_val(data_root):
    """The shipped detector through the product path on BCCD val (never trained on): the bar is 0.97 / 0.95."""
    from conftest import need
    from hemaedge.edge.models import default_detector_path
    from hemaedge.evaluation.frames import folder_items, score_detections

    try:
        path = default_detector_path()
    except BundleError:
        pytest.skip("no detector bundle shipped in edge/models")
    need(data_root / "bccd")
    seg = LearnedSegmenter(path, scale="frame")
    t = score_detections(seg.detect, folder_items(data_root / "bccd", "val"))["all"]
    assert t.recall >= 0.97 and t.precision >= 0.95, t.as_dict()
