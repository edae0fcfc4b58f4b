"""Sources read through an OpenCV ``VideoCapture``-like object.

``CaptureSource`` takes an *opener* (a function returning an object with
``isOpened()``, ``read() -> (ok, image)`` and ``release()``), so the timeout
and reconnect logic is the same for USB cameras, V4L2 devices, RTSP streams,
Jetson CSI cameras and video files, and can be tested with a fake capture.

Live sources: a failed read while the capture is still open is a timeout
(skipped, reported); ``lost_after`` failed reads in a row, or a capture that
reports itself closed, is a drop-out: the capture is released and reopened
with exponential back-off (``backoff_s * 2**(attempt-1)``, capped at
``backoff_max_s``, at most ``max_retries`` attempts). The session goes on
after a successful reopen; after the last failed attempt the source raises
``SourceError``. File sources: a failed read is the end of the stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
from hemaedge.edge.errors import HemaedgeError, SourceError
from hemaedge.edge.records import Frame
from hemaedge.edge.sources.base import EventCallback, FrameSource


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` we use."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name

    def read(self) -> tuple[bool, Any]: ...

    def release(self) -> None: ...


def as_bgr(img: np.ndarray) -> np.ndarray:
    """Make any decoded image an HxWx3 uint8 array (grey -> 3 channels, alpha dropped, 16-bit scaled)."""
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        else:
            img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


class CaptureSource(FrameSource):
    """Frames from a ``VideoCapture``-like object, with timeouts and reconnects.

    Args:
        uri: The source's URI (``Frame.source_id``).
        opener: Returns a new, opened capture (called again on reconnect).
        live: Cameras and streams: retry on drop-out. Files: end on a failed read.
        on_event: Receives ``SourceEvent``s (default: warnings to stderr).
        colour_order: Channel order of what ``read()`` returns (OpenCV: ``"BGR"``).
        lost_after: Failed reads in a row that count as a drop-out (live only).
        max_retries: Reopen attempts before giving up (live only).
        backoff_s: First back-off delay in seconds; doubles each attempt.
        backoff_max_s: Upper bound of the back-off delay.
        max_frames: Stop after this many frames (``None``: no limit).
        sleep: ``time.sleep`` (tests pass a fake).
        clock: ``time.time`` (tests pass a fake).
    """

    def __init__(
        self,
        uri: str,
        opener: Callable[[], Capture],
        *,
        live: bool = True,
        on_event: EventCallback | None = None,
        colour_order: str = "BGR",
        lost_after: int = 5,
        max_retries: int = 8,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        max_frames: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(uri, on_event)
        self._opener = opener
        self.live = live
        self.colour_order = colour_order
        self.lost_after = max(1, int(lost_after))
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_frames = max_frames
        self._sleep = sleep
        self._clock = clock
        self._cap: Capture | None = None
        self.reconnects = 0
        self.timeouts = 0

    # -- lifecycle -----------------------------------------------------------
    def _try_open(self) -> Capture | None:
        try:
            cap = self._opener()
        except HemaedgeError:  # a missing dependency or a refused setup: retrying will not help
            raise
        except Exception:  # noqa: BLE001 - any driver failure means "not opened"; reported by the caller
            return None
        if cap is None or not cap.isOpened():
            if cap is not None:
                _release(cap)
            return None
        return cap

    def _open(self) -> None:
        cap = self._try_open()
        if cap is None:
            raise SourceError(f"cannot open {self.uri}")
        self._cap = cap
        self.emit("opened", f"opened {self.uri}")

    def _close(self) -> None:
        if self._cap is not None:
            _release(self._cap)
            self._cap = None

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (1-based)."""
        return min(self.backoff_max_s, self.backoff_s * (2 ** (attempt - 1)))

    def _reconnect(self) -> None:
        """Reopen a dropped live source with exponential back-off, or raise ``SourceError``."""
        self._close()
        self.status = "reconnecting"
        for attempt in range(1, self.max_retries + 1):
            delay = self.backoff_delay(attempt)
            self.emit(
                "reconnecting",
                f"{self.uri}: camera lost, reconnecting (attempt {attempt}/{self.max_retries}, waiting {delay:.1f} s)",
                attempt=attempt,
                delay_s=delay,
            )
            self._sleep(delay)
            cap = self._try_open()
            if cap is not None:
                self._cap = cap
                self.reconnects += 1
                self.status = "ok"
                self.emit("reconnected", f"{self.uri}: reconnected after {attempt} attempt(s)", attempt=attempt)
                return
        self.status = "failed"
        self.emit("failed", f"{self.uri}: gave up after {self.max_retries} reconnect attempts")
        raise SourceError(f"{self.uri}: camera lost and not back after {self.max_retries} reconnect attempts")

    # -- frames --------------------------------------------------------------
    def _read(self) -> tuple[bool, np.ndarray | None]:
        assert self._cap is not None
        try:
            ok, img = self._cap.read()
        except Exception:  # noqa: BLE001 - a driver error on read is a failed read
            return False, None
        if not ok or img is None or getattr(img, "size", 0) == 0:
            return False, None
        return True, img

    def _timestamp(self) -> float:
        return self._clock()

    def _frames(self) -> Iterator[Frame]:
        index = 0
        failures = 0
        while self.max_frames is None or index < self.max_frames:
            if self._cap is None:  # closed under us
                return
            ok, img = self._read()
            if ok:
                failures = 0
                if self.status != "ok":
                    self.status = "ok"
                yield Frame(as_bgr(img), self.colour_order, self._timestamp(), self.uri, index)
                index += 1
                continue
            if not self.live:
                self.status = "ended"
                self.emit("ended", f"{self.uri}: end of stream after {index} frames")
                return
            failures += 1
            still_open = _is_open(self._cap)
            if still_open and failures < self.lost_after:
                self.timeouts += 1
                self.emit("timeout", f"{self.uri}: read timed out ({failures} in a row); skipped")
                continue
            self.emit("lost", f"{self.uri}: camera dropped out")
            self._reconnect()
            failures = 0


class VideoFileSource(CaptureSource):
    """A video file read with OpenCV; timestamps are the stream's own (seconds)."""

    def __init__(self, path: str, *, on_event: EventCallback | None = None, max_frames: int | None = None) -> None:
        import cv2

        self.path = path
        super().__init__(path, lambda: cv2.VideoCapture(path), live=False, on_event=on_event, max_frames=max_frames)

    def _open(self) -> None:
        import os

        if not os.path.exists(self.path):
            raise SourceError(f"video file not found: {self.path}")
        super()._open()

    def _timestamp(self) -> float:
        import cv2

        try:
            return float(self._cap.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001
            return self._clock()


def _release(cap: Capture) -> None:
    try:
        cap.release()
    except Exception:  # noqa: BLE001 - releasing a dead capture may raise; nothing to do
        pass


def _is_open(cap: Capture) -> bool:
    try:
        return bool(cap.isOpened())
    except Exception:  # noqa: BLE001
        return False


# -- openers for the camera kinds ------------------------------------------------


def _set_props(cap: Any, width: int | None, height: int | None, fps: float | None) -> Any:
    import cv2

    if width:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, int(width))
    if height:
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, int(height))
    if fps:
        cap.set(cv2.CAP_PROP_FPS, float(fps))
    return cap


def usb_opener(
    device: int | str, width: int | None = None, height: int | None = None, fps: float | None = None, api: str = "any"
) -> Callable[[], Capture]:
    """An opener for a USB / V4L2 camera (an index or a ``/dev/videoN`` path)."""

    def open_() -> Capture:
        import cv2

        backend = cv2.CAP_V4L2 if api == "v4l2" else cv2.CAP_ANY
        cap = cv2.VideoCapture(device, backend)
        if cap.isOpened():
            _set_props(cap, width, height, fps)
        return cap

    return open_


def rtsp_opener(url: str, timeout_s: float = 5.0) -> Callable[[], Capture]:
    """An opener for a network stream through FFmpeg, with open and read timeouts."""

    def open_() -> Capture:
        import cv2

        params: list[int] = []
        for name, value in (("CAP_PROP_OPEN_TIMEOUT_MSEC", timeout_s), ("CAP_PROP_READ_TIMEOUT_MSEC", timeout_s)):
            prop = getattr(cv2, name, None)
            if prop is not None:
                params += [prop, int(value * 1000)]
        try:
            return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
        except TypeError:  # old OpenCV without the params overload
            return cv2.VideoCapture(url, cv2.CAP_FFMPEG)

    return open_


def csi_pipeline(
    sensor_id: int = 0,
    width: int = 1280,
    height: int = 720,
    fps: int = 30,
    flip: int = 0,
    out_width: int | None = None,
    out_height: int | None = None,
) -> str:
    """The GStreamer pipeline for a Jetson CSI camera (``nvarguscamerasrc``) ending in a BGR ``appsink``."""
    ow, oh = out_width or width, out_height or height
    return (
        f"nvarguscamerasrc sensor-id={int(sensor_id)} ! "
        f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, framerate=(fraction){int(fps)}/1 ! "
        f"nvvidconv flip-method={int(flip)} ! video/x-raw, width=(int){ow}, height=(int){oh}, format=(string)BGRx ! "
        "videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1 sync=false"
    )


def gstreamer_opener(pipeline: str) -> Callable[[], Capture]:
    """An opener for a GStreamer pipeline through OpenCV (needs an OpenCV built with GStreamer)."""

    def open_() -> Capture:
        import cv2

        info = cv2.getBuildInformation()
        line = next((ln for ln in info.splitlines() if "GStreamer" in ln), "")
        if "YES" not in line:
            raise SourceError(
                "this OpenCV has no GStreamer support, which csi:// needs; on a Jetson use JetPack's "
                "python3-opencv (deploy/jetson/install.sh), not the pip opencv wheel"
            )
        return cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)

    return open_
