"""Frame sources: synthetic determinism, image folders, URI parsing, timeouts and reconnect back-off."""

from __future__ import annotations

import numpy as np
import pytest
from hemaedge.edge.errors import SourceError, UsageError
from hemaedge.edge.records import Frame
from hemaedge.edge.sources import (
    CaptureSource,
    FrameSource,
    ImageFilesSource,
    SyntheticSource,
    csi_pipeline,
    open_images,
    open_source,
    parse_uri,
)

# -- synthetic ------------------------------------------------------------------


def test_synthetic_is_deterministic_by_seed():
    a = [f.pixels for f in open_source("synthetic://?seed=5&frames=3&width=320&height=240")]
    b = [f.pixels for f in open_source("synthetic://?seed=5&frames=3&width=320&height=240")]
    c = [f.pixels for f in open_source("synthetic://?seed=6&frames=3&width=320&height=240")]
    assert len(a) == 3
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_synthetic_frames_carry_truth_and_metadata():
    with open_source("synthetic://?seed=1&frames=4&wbc=3") as src:
        frames = list(src)
    assert len(frames) == 4
    for i, f in enumerate(frames):
        assert isinstance(f, Frame)
        assert f.pixels.shape == (480, 640, 3) and f.pixels.dtype == np.uint8
        assert f.colour_order == "BGR" and f.index == i
        assert f.truth is not None and f.truth.shape == (len(f.truth_kinds), 4)
        assert f.truth_kinds.count("wbc") == 3  # non-pan frames hold exactly `wbc` whole white cells
        assert set(f.truth_kinds) <= {"wbc", "rbc", "platelet"}
        assert (f.truth[:, 0] >= 0).all() and (f.truth[:, 2] <= 640).all()
        assert (f.truth[:, 2] > f.truth[:, 0]).all()
    assert src.status == "closed"


def test_synthetic_random_access_matches_iteration():
    src = SyntheticSource(seed=2, frames=5, width=256, height=192, pan=1)
    frames = list(src)
    again = src.frame(3)
    assert np.array_equal(frames[3].pixels, again.pixels)
    assert np.array_equal(frames[3].truth, again.truth)


def test_synthetic_pan_shifts_the_same_cells():
    src = SyntheticSource(seed=3, frames=10, pan=1)
    x0, y0 = src.field_origin(4)
    x1, y1 = src.field_origin(5)
    dx, dy = x1 - x0, y1 - y0
    assert 0 < abs(dx) + abs(dy) < 40  # a smooth drift, not a jump
    ids4, ids5 = src.truth_ids(4), src.truth_ids(5)
    f4, f5 = src.frame(4), src.frame(5)
    shared = set(ids4) & set(ids5)
    assert len(shared) > 10
    # an interior cell seen in both frames moved by exactly the stage shift
    for uid in shared:
        b4 = f4.truth[ids4.index(uid)]
        b5 = f5.truth[ids5.index(uid)]
        if b4[0] > 50 and b4[2] < 590 and b4[1] > 50 and b4[3] < 430 and b5[0] > 0 and b5[1] > 0:
            assert np.allclose(b5, b4 - [dx, dy, dx, dy], atol=1e-3)
            break
    else:  # pragma: no cover - the field is dense, this does not happen
        pytest.fail("no interior cell shared by consecutive frames")
    # and the pixels moved with them (compare an interior patch)
    patch4 = f4.pixels[150:250, 200:300].astype(int)
    patch5 = f5.pixels[150 - dy : 250 - dy, 200 - dx : 300 - dx].astype(int)
    assert np.abs(patch4 - patch5).mean() < 12  # same slide, different noise/illumination position


def test_synthetic_endless_and_options():
    src = open_source("synthetic://?frames=0&width=128&height=96", max_frames=7)
    assert len(list(src)) == 7
    with pytest.raises(UsageError):
        open_source("synthetic://?bogus=1")


# -- files ----------------------------------------------------------------------


def _write(path, img):
    import cv2

    assert cv2.imwrite(str(path), img)
    return path


def test_image_folder_skips_a_corrupt_file(tmp_path, capsys):
    img = np.full((40, 50, 3), 200, np.uint8)
    _write(tmp_path / "a.png", img)
    (tmp_path / "b.jpg").write_bytes(b"not an image at all")
    _write(tmp_path / "c.png", img[:, :, 0])  # grey is fine too
    (tmp_path / "notes.txt").write_text("ignored")
    events = []
    with open_source(str(tmp_path), on_event=events.append) as src:
        frames = list(src)
    assert [f.name for f in frames] == ["a.png", "c.png"]
    assert all(f.pixels.shape == (40, 50, 3) for f in frames)
    assert [f.index for f in frames] == [0, 1]
    skipped = [e for e in events if e.kind == "skipped"]
    assert len(skipped) == 1 and "b.jpg" in skipped[0].message and "\n" not in skipped[0].message
    assert isinstance(src, ImageFilesSource) and len(src.failed) == 1


def test_default_event_handler_prints_one_line_warning(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    _write(tmp_path / "ok.png", np.zeros((8, 8, 3), np.uint8))
    frames = list(open_source(str(tmp_path)))
    assert len(frames) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "bad.png" in err[0]


def test_glob_and_single_file_and_missing(tmp_path):
    for n in ("x1.png", "x2.png", "y.png"):
        _write(tmp_path / n, np.zeros((10, 10, 3), np.uint8))
    assert [f.name for f in open_source(str(tmp_path / "x*.png"))] == ["x1.png", "x2.png"]
    assert [f.name for f in open_source(str(tmp_path / "y.png"))] == ["y.png"]
    with pytest.raises(SourceError):
        open_source(str(tmp_path / "missing.png"))
    with pytest.raises(SourceError):
        open_source(str(tmp_path / "z*.png"))
    with pytest.raises(SourceError):
        open_source("gopher://x")


def test_open_images_keeps_order_and_reports_missing(tmp_path):
    _write(tmp_path / "b.png", np.zeros((10, 10, 3), np.uint8))
    _write(tmp_path / "a.png", np.zeros((10, 10, 3), np.uint8))
    events = []
    src = open_images([tmp_path / "b.png", tmp_path / "nope.png", tmp_path / "a.png"], on_event=events.append)
    assert [f.name for f in src] == ["b.png", "a.png"]
    assert any(e.kind == "skipped" and "nope.png" in e.message for e in events)


def test_video_file_ends_at_end_of_stream(tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    if not writer.isOpened():  # pragma: no cover - depends on the OpenCV build
        pytest.skip("this OpenCV cannot write MJPG avi")
    for i in range(5):
        writer.write(np.full((48, 64, 3), i * 40, np.uint8))
    writer.release()
    events = []
    with open_source(str(path), on_event=events.append) as src:
        frames = list(src)
    assert len(frames) == 5 and frames[0].pixels.shape == (48, 64, 3)
    assert events[-1].kind == "ended" and src.status in ("ended", "closed")


# -- URIs -----------------------------------------------------------------------


def test_parse_uri():
    assert parse_uri("synthetic://?seed=3&pan=1") == ("synthetic", "", {"seed": 3, "pan": 1})
    assert parse_uri("v4l2:///dev/video1")[:2] == ("v4l2", "/dev/video1")
    assert parse_uri("csi://0")[:2] == ("csi", "0")
    assert parse_uri("rtsp://cam.local:554/s1")[1] == "rtsp://cam.local:554/s1"
    assert parse_uri("images/*.png") == ("", "images/*.png", {})


def test_camera_uris_build_lazily_without_hardware():
    # constructing a camera source touches no hardware; opening would
    for uri in ("0", "v4l2:///dev/video9", "rtsp://127.0.0.1:1/x", "csi://0"):
        src = open_source(uri)
        assert isinstance(src, CaptureSource) and src.live and src.status == "idle"
    src = open_source(3)
    assert src.uri == "3"
    with pytest.raises(UsageError):
        open_source("v4l2:///dev/video0?colour=odd")


def test_picam_is_bgr_and_needs_picamera2():
    src = open_source("picam://0")
    assert src.colour_order == "BGR"  # picamera2's "RGB888" arrays are ordered B, G, R
    try:
        import picamera2  # noqa: F401
    except ImportError:
        from hemaedge.edge.errors import MissingDependencyError

        with pytest.raises(MissingDependencyError, match="pi"):
            src.open()


def test_csi_pipeline_names_the_sensor_and_ends_in_bgr_appsink():
    p = csi_pipeline(1, 1280, 720, 30)
    assert p.startswith("nvarguscamerasrc sensor-id=1 ")
    assert "format=(string)BGR ! appsink" in p and "drop=true" in p


# -- live capture: timeouts and reconnect ---------------------------------------


class FakeCapture:
    """A scripted stand-in for cv2.VideoCapture: 'f' frame, 't' timeout (still open), 'x' dropped (closed)."""

    def __init__(self, script: str, opened: bool = True):
        self.script = list(script)
        self.opened = opened
        self.released = False

    def isOpened(self):  # noqa: N802
        return self.opened

    def read(self):
        if not self.script:
            self.opened = False
            return False, None
        step = self.script.pop(0)
        if step == "f":
            return True, np.zeros((4, 6, 3), np.uint8)
        if step == "x":
            self.opened = False
        return False, None

    def release(self):
        self.released = True
        self.opened = False


class Opener:
    """Hands out scripted captures in turn (None = the camera is not there yet)."""

    def __init__(self, *captures):
        self.captures = list(captures)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        cap = self.captures.pop(0) if self.captures else None
        return cap if cap is not None else FakeCapture("", opened=False)


def test_timeouts_are_skipped_and_counted():
    opener = Opener(FakeCapture("ftftff"))
    events = []
    src = CaptureSource("fake://", opener, on_event=events.append, lost_after=5, max_frames=4, sleep=lambda s: None)
    with src:
        frames = list(src)
    assert len(frames) == 4 and [f.index for f in frames] == [0, 1, 2, 3]
    assert src.timeouts == 2 and src.reconnects == 0
    assert [e.kind for e in events].count("timeout") == 2


def test_dropped_camera_reconnects_with_exponential_backoff():
    first = FakeCapture("ffx")
    opener = Opener(first, None, None, FakeCapture("fff"))
    sleeps, events = [], []
    src = CaptureSource(
        "fake://cam",
        opener,
        on_event=events.append,
        backoff_s=0.5,
        backoff_max_s=10,
        max_retries=5,
        max_frames=5,
        sleep=sleeps.append,
    )
    with src:
        frames = list(src)
    assert len(frames) == 5  # the session went on after the drop-out
    assert sleeps == [0.5, 1.0, 2.0]  # two failed reopen attempts, the third worked
    assert first.released
    kinds = [e.kind for e in events]
    assert kinds[0] == "opened" and "lost" in kinds and kinds.count("reconnecting") == 3 and "reconnected" in kinds
    rec = [e for e in events if e.kind == "reconnecting"]
    assert [e.attempt for e in rec] == [1, 2, 3] and [e.delay_s for e in rec] == [0.5, 1.0, 2.0]
    assert src.reconnects == 1 and src.status == "closed"


def test_status_shows_reconnecting_while_it_waits():
    seen = []
    src = CaptureSource(
        "fake://",
        Opener(FakeCapture("fx"), FakeCapture("f")),
        max_frames=2,
        sleep=lambda s: seen.append(src.status),
        on_event=lambda e: None,
    )
    assert len(list(src)) == 2
    assert seen == ["reconnecting"]


def test_too_many_timeouts_count_as_a_drop_out():
    opener = Opener(FakeCapture("fttt"), FakeCapture("f"))
    events = []
    src = CaptureSource("fake://", opener, on_event=events.append, lost_after=3, max_frames=2, sleep=lambda s: None)
    assert len(list(src)) == 2
    kinds = [e.kind for e in events]
    assert kinds.count("timeout") == 2 and "lost" in kinds and "reconnected" in kinds


def test_gives_up_after_bounded_retries():
    opener = Opener(FakeCapture("fx"))  # never comes back
    sleeps, events = [], []
    src = CaptureSource(
        "fake://", opener, on_event=events.append, max_retries=4, backoff_s=1, backoff_max_s=3, sleep=sleeps.append
    )
    got = []
    with pytest.raises(SourceError, match="4 reconnect attempts"):
        for f in src:
            got.append(f)
    assert len(got) == 1
    assert sleeps == [1, 2, 3, 3]  # capped back-off
    assert src.status == "failed" and events[-1].kind == "failed"


def test_cannot_open_is_a_clear_error():
    src = CaptureSource("fake://none", Opener(None), on_event=lambda e: None)
    with pytest.raises(SourceError, match="cannot open fake://none"):
        src.open()


def test_driver_exception_on_read_is_a_failed_read():
    class Raising(FakeCapture):
        def read(self):
            raise RuntimeError("driver hiccup")

    src = CaptureSource(
        "fake://",
        Opener(Raising(""), FakeCapture("ff")),
        lost_after=1,
        max_frames=2,
        sleep=lambda s: None,
        on_event=lambda e: None,
    )
    assert len(list(src)) == 2


def test_file_capture_ends_instead_of_reconnecting():
    events = []
    src = CaptureSource(
        "fake.mp4",
        Opener(FakeCapture("fff")),
        live=False,
        on_event=events.append,
        sleep=lambda s: pytest.fail("must not sleep"),
    )
    assert len(list(src)) == 3
    assert events[-1].kind == "ended"


def test_every_source_is_a_frame_source():
    assert isinstance(open_source("synthetic://?frames=1"), FrameSource)
    assert issubclass(ImageFilesSource, FrameSource) and issubclass(CaptureSource, FrameSource)
