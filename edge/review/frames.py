"""A cell's source frame for the review page, with the cell's box drawn.

The station keeps crops, not frames. A frame can be shown again when its
source can give it back: image files still on disk (found by name), a video file
(seek to the frame), or the synthetic smear (deterministic). Live cameras
cannot: the page then says so.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.errors import HemaedgeError
from hemaedge.edge.store import StoredCell

MAX_WIDTH = 960


class FrameFinder:
    """Finds and renders source frames; remembers opened sources and file lists."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def frame(self, cell: StoredCell) -> tuple[np.ndarray | None, str]:
        """``(BGR frame, "")`` or ``(None, why not)``."""
        src = cell.source or ""
        try:
            if src.startswith("synthetic://"):
                return self._synthetic(src).frame(cell.frame_index).bgr(), ""
            from hemaedge.edge.sources.files import VIDEO_EXTENSIONS, expand_images, read_image

            if Path(src).suffix.lower() in VIDEO_EXTENSIONS and Path(src).is_file():
                return _video_frame(src, cell.frame_index)
            if "://" in src or src.isdigit() or src.startswith("/dev/"):
                return None, "live camera frames are not kept; the crop is what the classifier saw"
            with self._lock:
                files = self._cache.get(("files", src))
                if files is None:
                    files = {p.name: p for p in expand_images(src)}
                    self._cache[("files", src)] = files
            path = files.get(cell.frame_name)
            if path is None:
                return None, f"frame {cell.frame_name} is no longer where {src} pointed"
            return read_image(path), ""
        except (HemaedgeError, OSError) as exc:
            return None, f"the source frame cannot be read: {str(exc).splitlines()[0]}"

    def _synthetic(self, uri: str) -> Any:
        with self._lock:
            src = self._cache.get(uri)
            if src is None:
                from hemaedge.edge.sources import open_source

                src = open_source(uri)
                self._cache[uri] = src
            return src

    def jpeg(self, cell: StoredCell) -> tuple[bytes | None, str]:
        """The frame as JPEG (at most :data:`MAX_WIDTH` wide) with the cell's box drawn, or ``(None, why)``."""
        import cv2

        img, why = self.frame(cell)
        if img is None:
            return None, why
        img = np.ascontiguousarray(img).copy()
        x0, y0, x1, y1 = (int(round(v)) for v in cell.box)
        t = max(2, img.shape[1] // 300)
        cv2.rectangle(img, (x0 - t, y0 - t), (x1 + t, y1 + t), (0, 200, 255), t)
        if img.shape[1] > MAX_WIDTH:
            f = MAX_WIDTH / img.shape[1]
            img = cv2.resize(img, (MAX_WIDTH, max(1, round(img.shape[0] * f))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 82])
        return (buf.tobytes(), "") if ok else (None, "the frame cannot be encoded")


def _video_frame(path: str, index: int) -> tuple[np.ndarray | None, str]:
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(index))
        ok, img = cap.read()
    finally:
        cap.release()
    return (img, "") if ok else (None, f"frame {index} cannot be read from {path}")
