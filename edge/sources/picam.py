"""Raspberry Pi cameras through picamera2 (``picam://N``); picamera2 is imported only here.

picamera2 names formats after the libcamera/DRM convention, which is the
reverse of the byte order NumPy sees: ``"RGB888"`` arrays are ordered
``[B, G, R]`` (and ``"BGR888"`` arrays ``[R, G, B]``). We ask for ``RGB888``
and label the frames ``"BGR"``, so they go to OpenCV and to the model
preprocessing without a copy and without swapped colours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hemaedge.edge.errors import require
from hemaedge.edge.sources.base import EventCallback
from hemaedge.edge.sources.capture import CaptureSource

#: picamera2 format name -> channel order of the NumPy array it yields.
PICAMERA2_ARRAY_ORDER = {"RGB888": "BGR", "BGR888": "RGB", "XRGB8888": "BGR", "XBGR8888": "RGB"}


class _PicamCapture:
    """Adapts a started ``Picamera2`` to the capture interface ``CaptureSource`` drives."""

    def __init__(self, camera_num: int, width: int, height: int, fmt: str, timeout_s: float) -> None:
        picamera2 = require("picamera2", "pi", "picam:// (Raspberry Pi camera)")
        self._cam: Any = picamera2.Picamera2(camera_num)
        config = self._cam.create_video_configuration(
            main={"size": (int(width), int(height)), "format": fmt}, buffer_count=4
        )
        self._cam.configure(config)
        self._cam.start()
        self._fmt = fmt
        self._timeout_s = timeout_s
        self._open = True

    def isOpened(self) -> bool:  # noqa: N802 - matches cv2.VideoCapture
        return self._open

    def read(self) -> tuple[bool, np.ndarray | None]:
        try:
            try:
                arr = self._cam.capture_array("main", wait=self._timeout_s)
            except TypeError:  # picamera2 before 'wait' existed
                arr = self._cam.capture_array("main")
        except TimeoutError:
            return False, None
        except Exception:  # noqa: BLE001 - the camera went away: report closed so the source reconnects
            self._open = False
            return False, None
        if arr is None:
            return False, None
        if arr.ndim == 3 and arr.shape[2] == 4:  # X???8888 formats carry a padding byte
            arr = arr[:, :, :3]
        return True, arr

    def release(self) -> None:
        self._open = False
        try:
            self._cam.stop()
        finally:
            self._cam.close()


def picam_source(
    camera_num: int = 0,
    *,
    width: int = 640,
    height: int = 480,
    fmt: str = "RGB888",
    timeout_s: float = 2.0,
    on_event: EventCallback | None = None,
    **capture_opts: Any,
) -> CaptureSource:
    """A live source for Raspberry Pi camera ``camera_num`` (needs ``hemaedge[pi]`` / ``python3-picamera2``)."""
    if fmt not in PICAMERA2_ARRAY_ORDER:
        from hemaedge.edge.errors import UsageError

        raise UsageError(f"picam format {fmt!r} not supported; use one of {', '.join(PICAMERA2_ARRAY_ORDER)}")
    return CaptureSource(
        f"picam://{camera_num}",
        lambda: _PicamCapture(camera_num, width, height, fmt, timeout_s),
        live=True,
        on_event=on_event,
        colour_order=PICAMERA2_ARRAY_ORDER[fmt],
        **capture_opts,
    )
