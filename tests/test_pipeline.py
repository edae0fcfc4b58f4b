"""The wired pipeline on synthetic frames: one batch per frame, skip policy, store-before-count, resume, commands."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import fake_segment
import numpy as np
import pytest
from hemaedge.edge.bundle import load_bundle
from hemaedge.edge.count import DifferentialCounter, SlideTracker
from hemaedge.edge.counting import CountingSession, restore
from hemaedge.edge.errors import BundleError, StoreError, UsageError
from hemaedge.edge.sources import open_source
from hemaedge.edge.station import CellFinder, Station, make_backend
from hemaedge.edge.store import SessionStore

URI = "synthetic://?seed=11&frames=1500&pan=4&wbc=4"


class Recording:
    """Wraps a backend: records batch sizes, optionally slow (to exercise the skip policy)."""

    def __init__(self, inner, delay: float = 0.0):
        self.inner, self.delay, self.batches = inner, delay, []
        self.name, self.precision = "recording", inner.precision

    def classify(self, batch):
        self.batches.append(len(batch))
        if self.delay:
            time.sleep(self.delay)
        return self.inner.classify(batch)


def truth_id(src, cell) -> int:
    f = src.frame(cell.frame_index)
    t = np.asarray(f.truth)
    b = np.asarray(cell.box)
    d = np.abs(t - b).sum(axis=1)
    assert d.min() < 1e-3  # the fake segmenter returns truth boxes
    return src.truth_ids(cell.frame_index)[int(d.argmin())]


def session(
    bundle, tmp_path, uri=URI, target=40, delay=0.0, store=None, counter=None, tracker=None, segmenter=None, **kw
):
    backend, _ = make_backend(bundle, "ort-cpu", "int8")
    backend.__enter__()
    rec = Recording(backend, delay)
    store = store or SessionStore.create(
        tmp_path / "s", {"classes": list(bundle.manifest.classes), "target": target, "review_threshold": 0.6}
    )
    counter = counter or DifferentialCounter(bundle.manifest.classes, target)
    finder = CellFinder(
        segmenter or fake_segment.TruthSegmenter(),
        bundle.manifest.crop,
        tracker or SlideTracker(),
        fake_segment.always_ok,
    )
    src = open_source(uri)
    station = Station(bundle, finder.segmenter, rec, "test")
    return CountingSession(src, station, store, counter, finder=finder, **kw), rec, store, src


def test_counts_to_target_each_cell_once_one_batch_per_frame(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    shown = []
    s, rec, store, src = session(bundle, tmp_path, on_cell=lambda c, b: shown.append(c.id))
    with src:
        res = s.run()
    assert res.state == "done" and s.counter.total == 40
    cells = store.read_cells()
    assert [c.id for c in cells] == shown, "shown cells must be exactly the stored ones, in order"
    physical = [truth_id(src, c) for c in cells]
    assert len(set(physical)) == len(physical)
    # one batch per frame with new cells: the batches hold exactly the frames' new cells
    per_frame = np.bincount([c.frame_index for c in cells])
    assert sum(rec.batches) >= len(cells) and len(rec.batches) >= len(per_frame[per_frame > 0])
    assert all((store.root / c.crop).is_file() for c in cells)
    st = s.status()
    assert st.frames == res.frames and st.snapshot.total == 40 and st.state == "done"


def test_a_slow_classifier_makes_live_capture_skip_frames_not_lose_cells(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    s, rec, store, src = session(bundle, tmp_path, target=30, delay=0.05, queue_frames=1, skip_when_busy=True)
    t0 = time.monotonic()
    with src:
        res = s.run()
    assert res.skipped.get("busy", 0) > 0, "capture should have skipped frames while the worker was busy"
    cells = store.read_cells()
    assert len(cells) == 30
    physical = [truth_id(src, c) for c in cells]
    assert len(set(physical)) == len(physical)
    assert res.frames / (time.monotonic() - t0) > 2 / 0.05  # capture ran faster than inference


def test_sources_that_can_wait_are_never_skipped(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    s, rec, store, src = session(bundle, tmp_path, target=1000, delay=0.02, queue_frames=1, max_frames=60)
    assert not s.skip_when_busy  # synthetic frames, like files and videos, are not live
    with src:
        res = s.run()
    assert res.frames == 60 and not res.skipped


def test_store_failure_stops_the_session_with_one_line_and_counts_nothing_unstored(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    s, rec, store, src = session(bundle, tmp_path, target=40)
    shown = []
    s.on_cell = lambda c, b: shown.append(c.id)
    original = store.add
    calls = {"n": 0}

    def failing(cells, keyframes=()):
        calls["n"] += 1
        if calls["n"] == 4:
            raise StoreError("session store cannot store 2 cell(s): database or disk is full")
        return original(cells, keyframes)

    store.add = failing
    with src, pytest.raises(StoreError):
        s.run()
    assert s.counter.total == len(store.read_cells()) == len(shown)


def test_reset_starts_over_in_a_new_epoch(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    s, rec, store, src = session(bundle, tmp_path, target=1000, max_frames=400)
    done = threading.Event()

    def on_cell(c, b):
        if c.id == 10 and not done.is_set():
            done.set()
            s.reset()

    s.on_cell = on_cell
    with src:
        s.run()
    assert store.epoch == 1
    assert len(store.read_cells(epoch=0)) >= 10
    assert s.counter.total == len(store.read_cells())


def test_pause_stops_reading_frames(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    s, rec, store, src = session(bundle, tmp_path, target=1000, max_frames=300)
    with src:
        s.start()
        time.sleep(0.3)
        assert s.toggle_pause() is True
        time.sleep(0.2)
        frames = s.status().frames
        time.sleep(0.3)
        assert s.status().frames <= frames + 1 and s.status().state == "paused"
        s.toggle_pause()
        s.stop()
        assert s.wait(30)
    assert s.result().state == "stopped"


def test_resume_rebuilds_the_count_and_the_slide_and_continues(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    s, _, store, src = session(bundle, tmp_path, target=20)
    with src:
        s.run()
    store.close()
    store = SessionStore.open(tmp_path / "s")
    counter = DifferentialCounter(bundle.manifest.classes, 45)
    tracker = SlideTracker()
    before = restore(store, counter, tracker)
    assert counter.total == 20 and len(tracker.cells) == 20 and tracker.registrar.keyframes
    s2, _, store, src = session(bundle, tmp_path, target=45, store=store, counter=counter, tracker=tracker)
    with src:  # the same frames from the start: the first 20 cells must be recognised, not recounted
        s2.run()
    cells = store.read_cells()
    assert len(cells) == 45 and [c.id for c in cells[:20]] == [c.id for c in before]
    physical = [truth_id(src, c) for c in cells]
    assert len(set(physical)) == len(physical)


# -- commands ------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def cli(monkeypatch):
    import hemaedge.edge.segment as seg

    monkeypatch.setattr(seg, "make_segmenter", fake_segment.make)
    from hemaedge.cli import main

    return main


def test_count_json_lists_totals_and_every_cell_with_its_frame(cli, tiny_bundle_dir, tmp_path, capsys):
    rc = cli(
        [
            "count",
            URI,
            "--bundle",
            str(tiny_bundle_dir),
            "--out",
            str(tmp_path),
            "--target",
            "15",
            "--json",
            "--save-crops",
            str(tmp_path / "calib"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)
    assert doc["differential"]["total_wbc"] == 15 and doc["differential"]["complete"]
    assert len(doc["cells"]) >= 15
    c = doc["cells"][0]
    assert {"frame", "frame_name", "box", "class", "confidence", "slide"} <= set(c)
    assert c["frame_name"].startswith("synthetic-")
    assert Path(doc["reports"]["report"]).is_file()
    assert len(list((tmp_path / "calib" / "unlabelled").glob("*.png"))) == len(doc["cells"])


def test_count_on_image_files_names_the_source_file(tiny_bundle_dir, tmp_path, capsys):
    """Still images through the real segmenter: each cell is reported with the file it came from."""
    import cv2

    from hemaedge.cli import main

    with open_source("synthetic://?seed=3&frames=3&wbc=5") as src:
        for f in src:
            cv2.imwrite(str(tmp_path / f"img{f.index}.png"), f.bgr())
    rc = main(
        [
            "count",
            str(tmp_path / "*.png"),
            "--bundle",
            str(tiny_bundle_dir),
            "--out",
            str(tmp_path / "o"),
            "--json",
            "--target",
            "100",
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and not doc["differential"]["complete"] and doc["frames"] == 3
    assert len(doc["cells"]) >= 3
    assert {c["frame_name"] for c in doc["cells"]} <= {"img0.png", "img1.png", "img2.png"}
    assert all(len(c["box"]) == 4 and c["class"] for c in doc["cells"])


def test_contradictory_options_are_refused_before_work(cli, tiny_bundle_dir, tmp_path, capsys):
    from hemaedge.edge.commands.count import configure, plan

    def args(*argv):
        import argparse

        p = argparse.ArgumentParser()
        configure(p)
        return p.parse_args(argv)

    with pytest.raises(UsageError):
        plan(args("--demo", "0"))
    with pytest.raises(UsageError):
        plan(args())
    with pytest.raises(UsageError):
        plan(args("0", "--by-class"))
    with pytest.raises(UsageError):
        plan(args("--demo", "--resume", "x"))
    # a session counted with one bundle cannot be resumed with another
    assert (
        cli(["count", URI, "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "o"), "--target", "3", "--no-tui"])
        == 0
    )
    (session,) = (tmp_path / "o").iterdir()
    from helpers import tiny_bundle

    other = tiny_bundle(tmp_path / "other", classes=("a", "b", "c"))
    with pytest.raises(UsageError, match="different model"):
        plan(args("--resume", str(session), "--bundle", str(other)))
    with pytest.raises(UsageError, match="review threshold"):
        plan(args("--resume", str(session), "--review-threshold", "0.8"))
    assert cli(["count", "--resume", str(session), "--bundle", str(other)]) == 2
    assert "different model" in capsys.readouterr().err


def test_demo_without_the_shipped_bundle_fails_with_one_clear_line(cli, monkeypatch, tmp_path, capsys):
    import hemaedge.edge.models

    monkeypatch.setattr(hemaedge.edge.models, "__file__", str(tmp_path / "nowhere" / "__init__.py"))
    rc = cli(["count", "--demo", "--no-tui", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == BundleError.exit_code and "shipped bundle" in err and "--bundle" in err


def test_collect_writes_the_runtime_crops_as_an_image_folder(cli, tiny_bundle_dir, tmp_path, capsys):
    rc = cli(
        ["collect", URI, "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "calib"), "--max", "12", "--json"]
    )
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["crops"] == 12
    files = sorted((tmp_path / "calib" / "unlabelled").glob("*.png"))
    assert len(files) == 12
    # the same pixels the runtime cuts: cut_crop with the bundle geometry around a detection
    import cv2
    from hemaedge.edge.bundle import cut_crop

    name = files[0].name
    frame_index = int(name.split("-")[2])
    src = open_source(URI)
    frame = src.frame(frame_index)
    bundle = load_bundle(tiny_bundle_dir)
    boxes = [d.box for d in fake_segment.TruthSegmenter().detect(frame)]
    crop = cv2.imread(str(files[0]))
    assert any(np.array_equal(cut_crop(frame.bgr(), b, bundle.manifest.crop), crop) for b in boxes)
    try:
        from hemaedge.calibration.datasets import load_folder
    except ImportError:  # pragma: no cover - the workstation half is not installed
        return
    assert len(load_folder(tmp_path / "calib")) == 12


def test_collect_by_class_uses_class_folders(cli, tiny_bundle_dir, tmp_path, capsys):
    rc = cli(
        [
            "collect",
            URI,
            "--bundle",
            str(tiny_bundle_dir),
            "--out",
            str(tmp_path / "c"),
            "--max",
            "10",
            "--by-class",
            "--review-threshold",
            "0.05",
            "--json",
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and sum(doc["folders"].values()) == 10
    names = load_bundle(tiny_bundle_dir).manifest.classes
    assert all(d.name in names for d in (tmp_path / "c").iterdir())


def test_a_camera_that_fails_for_good_still_leaves_a_report(cli, tiny_bundle_dir, tmp_path, monkeypatch, capsys):
    import hemaedge.edge.sources
    from hemaedge.edge.errors import SourceError
    from hemaedge.edge.sources.base import FrameSource

    real = open_source(URI)

    class Dying(FrameSource):
        live = True

        def _frames(self):
            for i in range(150):
                yield real.frame(i)
            raise SourceError("camera 0 failed for good after 5 reconnect attempts")

    monkeypatch.setattr(hemaedge.edge.sources, "open_source", lambda uri, **kw: Dying("0"))
    rc = cli(["count", "0", "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "o"), "--no-tui"])
    captured = capsys.readouterr()
    assert rc == SourceError.exit_code and "failed for good" in captured.err
    (session,) = (tmp_path / "o").iterdir()
    summary = json.loads((session / "summary.json").read_text())
    assert summary["error"].startswith("camera 0 failed") and summary["differential"]["total_wbc"] > 0
    assert captured.out.count("\ncell ") + captured.out.startswith("cell ") == summary["differential"]["total_wbc"]


def test_end_to_end_with_the_real_segmenter_counts_physical_cells_once(tiny_bundle_dir, tmp_path, capsys):
    """Real segmenter + quality check + tracker on a panning synthetic slide, judged against its ground truth."""
    from hemaedge.cli import main

    uri = "synthetic://?seed=22&frames=2000&pan=4&wbc=4"
    assert (
        main(["count", uri, "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "o"), "--target", "60", "--json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    src = open_source(uri)
    physical = []
    for c in doc["cells"]:
        f = src.frame(c["frame"])
        t, b = np.asarray(f.truth), np.asarray(c["box"])
        ix = np.clip(np.minimum(t[:, 2], b[2]) - np.maximum(t[:, 0], b[0]), 0, None)
        iy = np.clip(np.minimum(t[:, 3], b[3]) - np.maximum(t[:, 1], b[1]), 0, None)
        inside = ix * iy / ((b[2] - b[0]) * (b[3] - b[1]))  # share of the detection lying on a truth cell
        inside[[k != "wbc" for k in f.truth_kinds]] = 0
        assert inside.max() > 0.5, f"cell {c['id']} is not on a white cell"
        physical.append(src.truth_ids(c["frame"])[int(inside.argmax())])
    assert len(physical) == 60
    assert len(physical) - len(set(physical)) <= 1, "physical cells counted more than once"


def test_demo_runs_on_a_fresh_machine_with_the_shipped_bundle(tmp_path, capsys):
    """``hemaedge count --demo``: synthetic smear + shipped bundle, CPU only, ends with a report."""
    from hemaedge.edge.models import default_bundle_path

    from hemaedge.cli import main

    try:
        default_bundle_path()
    except BundleError as exc:
        pytest.skip(f"no shipped bundle in this checkout: {exc}")
    assert main(["count", "--demo", "--no-tui", "--json", "--target", "25", "--out", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["differential"]["complete"] and doc["differential"]["total_wbc"] == 25
    assert Path(doc["reports"]["report"]).is_file()


def test_camera_events_and_blurred_frames_become_warnings(tiny_bundle_dir, tmp_path):
    from hemaedge.edge.segment import Quality
    from hemaedge.edge.sources.base import FrameSource

    real = open_source(URI)
    seen = {}

    class Flaky(FrameSource):
        live = True

        def _frames(self):
            for i in range(40):
                if i == 20:
                    self.status = "reconnecting"
                    self.emit("reconnecting", "camera 0 lost; reconnecting (attempt 1 of 5)", attempt=1)
                    seen["warnings"] = session_.status().warnings
                    self.status = "ok"
                yield real.frame(i)

    bundle = load_bundle(tiny_bundle_dir)
    session_, rec, store, _ = session(bundle, tmp_path, target=1000)
    session_.source = Flaky("0")
    session_.source.on_event = session_._on_source_event
    session_.finder.quality = lambda f: Quality(
        f.index % 10 != 3, "out of focus" if f.index % 10 == 3 else "", 0.1, 128
    )
    with session_.source:
        res = session_.run()
    assert any("reconnecting" in w for w in seen["warnings"])
    assert res.skipped.get("quality") == 4
    assert any("out of focus" in w for w in session_.status().warnings)


def test_session_scale_crops_share_one_side_across_a_frames_cells():
    """With ``crop.scale == "session"`` the finder cuts every white cell at the session's typical side."""
    from hemaedge.edge.bundle import CropGeometry
    from hemaedge.edge.records import Detection, Frame

    class Two:
        def detect(self, frame):
            return [
                Detection((10.0, 10.0, 30.0, 30.0), 1.0, "wbc"),
                Detection((100.0, 100.0, 160.0, 160.0), 1.0, "wbc"),
            ]

    frame = Frame(np.full((240, 320, 3), 200, np.uint8), "RGB", 0.0, "test", 0)
    for scale, sides in (("session", {80}), ("cell", {40, 120})):
        finder = CellFinder(Two(), CropGeometry(cell_fraction=0.5, scale=scale), quality=fake_segment.always_ok)
        found = finder.find(frame)
        assert {c.pixels.shape[0] for c in found.crops} == sides, scale  # typical side = median(20, 60) = 40


def test_the_live_view_says_when_the_detector_check_took_both_segmenters(tiny_bundle_dir, tmp_path):
    from hemaedge.edge.segment.checked import CheckedSegmenter

    class Blind:
        def detect(self, frame):
            return []

    bundle = load_bundle(tiny_bundle_dir)
    checked = CheckedSegmenter(learned=Blind(), stain=fake_segment.TruthSegmenter())
    s, _, _, src = session(bundle, tmp_path, segmenter=checked)
    assert not any("both segmenters" in w for w in s.status().warnings)  # still checking
    with src:
        res = s.run()
    assert res.state == "done" and checked.decision == "both"  # counted from the stain segmenter's cells
    assert any("both segmenters are used" in w for w in s.status().warnings)
