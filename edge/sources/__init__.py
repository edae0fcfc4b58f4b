"""Frame sources behind one call: ``open_source(uri, **opts)``.

URIs (as in jetson-inference's videoSource):

* ``synthetic://?seed=N&frames=N&width=640&height=480&wbc=K&pan=1`` - procedural smear with ground truth
* ``path/to/image.png``, ``path/to/folder``, ``'path/*.jpg'`` - still images (``Frame.name`` = file name)
* ``path/to/video.mp4`` (or ``file://...``) - a video file
* ``0``, ``1``, ... - a USB camera by index; ``v4l2:///dev/video0`` - a V4L2 device
* ``rtsp://...``, ``http(s)://...`` - a network stream
* ``csi://0`` - a Jetson CSI camera (GStreamer ``nvarguscamerasrc`` through OpenCV)
* ``picam://0`` - a Raspberry Pi camera (picamera2)

Query parameters in the URI and keyword options mix (keywords win). Common
options: ``on_event`` (callback receiving ``SourceEvent``s), ``max_frames``.
Cameras: ``width``, ``height``, ``fps``; reconnect: ``lost_after``,
``max_retries``, ``backoff_s``, ``backoff_max_s``.

Every source is a context manager and an iterable of ``hemaedge.edge.records.Frame``::

    with open_source("synthetic://?seed=1&frames=10") as src:
        for frame in src:
            ...
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from hemaedge.edge.errors import SourceError, UsageError
from hemaedge.edge.sources.base import EVENT_KINDS, EventCallback, FrameSource, SourceEvent, print_warning
from hemaedge.edge.sources.capture import (
    CaptureSource,
    VideoFileSource,
    csi_pipeline,
    gstreamer_opener,
    rtsp_opener,
    usb_opener,
)
from hemaedge.edge.sources.files import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ImageFilesSource,
    expand_images,
    is_glob,
    open_images,
    read_image,
)
from hemaedge.edge.sources.synthetic import SmearModel, SyntheticSource

__all__ = [
    "EVENT_KINDS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "CaptureSource",
    "EventCallback",
    "FrameSource",
    "ImageFilesSource",
    "SmearModel",
    "SourceEvent",
    "SyntheticSource",
    "VideoFileSource",
    "csi_pipeline",
    "expand_images",
    "is_glob",
    "open_images",
    "open_source",
    "parse_uri",
    "print_warning",
    "read_image",
]

_CAPTURE_OPTS = ("lost_after", "max_retries", "backoff_s", "backoff_max_s", "sleep", "clock")
_SYNTH_OPTS = {
    "seed": int,
    "frames": int,
    "width": int,
    "height": int,
    "wbc": float,
    "pan": float,
    "rbc_px": float,
    "blur": float,
    "noise": float,
    "fps": float,
    "lymph": float,
}


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def parse_uri(uri: str) -> tuple[str, str, dict[str, Any]]:
    """Split a source URI into ``(scheme, target, query options)``; a plain path has scheme ``""``."""
    text = str(uri).strip()
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", text)
    if not m:
        return "", text, {}
    scheme = m.group(1).lower()
    parts = urlsplit(text)
    opts = {k: _number(v) for k, v in parse_qsl(parts.query, keep_blank_values=True)}
    target = (parts.netloc + parts.path) if scheme not in ("rtsp", "rtsps", "http", "https", "rtmp") else text
    return scheme, target, opts


def _pick(opts: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: opts.pop(k) for k in names if k in opts}


def open_source(uri: str | os.PathLike[str] | int, **opts: Any) -> FrameSource:
    """Open a frame source by URI (cheap: hardware is touched on ``__enter__``).

    Args:
        uri: See the module docstring. An ``int`` is a USB camera index.
        **opts: Source options (override the URI's query parameters).

    Returns:
        A ``FrameSource``: use it as a context manager and iterate ``Frame``s.

    Raises:
        SourceError: The URI names nothing usable (missing path, unknown scheme).
        UsageError: An option is not understood.
    """
    on_event: EventCallback | None = opts.pop("on_event", None)
    max_frames = opts.pop("max_frames", None)
    if isinstance(uri, int):
        uri = str(uri)
    text = os.fspath(uri)
    scheme, target, query = parse_uri(text)
    query.update(opts)
    opts = query

    if scheme == "synthetic":
        unknown = sorted(set(opts) - set(_SYNTH_OPTS))
        if unknown:
            raise UsageError(
                f"synthetic:// does not understand {', '.join(unknown)}; options: {', '.join(_SYNTH_OPTS)}"
            )
        kw = {k: _SYNTH_OPTS[k](v) for k, v in opts.items()}
        if max_frames is not None:
            kw["frames"] = int(max_frames)
        return SyntheticSource(uri=text, on_event=on_event, **kw)

    cap_opts = _pick(opts, _CAPTURE_OPTS)
    width, height, fps = opts.pop("width", None), opts.pop("height", None), opts.pop("fps", None)

    if scheme == "" and re.fullmatch(r"\d+", target):
        _no_more(opts, text)
        return CaptureSource(
            text,
            usb_opener(int(target), width, height, fps),
            live=True,
            on_event=on_event,
            max_frames=max_frames,
            **cap_opts,
        )
    if scheme == "v4l2":
        dev = target if target.startswith("/") else "/" + target
        m = re.fullmatch(r"/dev/video(\d+)", dev)
        device: int | str = dev if os.name == "posix" or not m else int(m.group(1))
        _no_more(opts, text)
        return CaptureSource(
            text,
            usb_opener(device, width, height, fps, api="v4l2"),
            live=True,
            on_event=on_event,
            max_frames=max_frames,
            **cap_opts,
        )
    if scheme in ("rtsp", "rtsps", "http", "https", "rtmp"):
        timeout_s = float(opts.pop("timeout_s", 5.0))
        _no_more(opts, text)
        return CaptureSource(
            text, rtsp_opener(text, timeout_s), live=True, on_event=on_event, max_frames=max_frames, **cap_opts
        )
    if scheme == "csi":
        sensor = int(target or 0) if re.fullmatch(r"\d*", target) else None
        if sensor is None:
            raise SourceError(f"csi:// wants a sensor number, e.g. csi://0, not {text!r}")
        pipeline = csi_pipeline(
            sensor,
            int(width or 1280),
            int(height or 720),
            int(fps or 30),
            int(opts.pop("flip", 0)),
            opts.pop("out_width", None),
            opts.pop("out_height", None),
        )
        _no_more(opts, text)
        return CaptureSource(
            text, gstreamer_opener(pipeline), live=True, on_event=on_event, max_frames=max_frames, **cap_opts
        )
    if scheme == "picam":
        from hemaedge.edge.sources.picam import picam_source

        num = int(target or 0) if re.fullmatch(r"\d*", target) else None
        if num is None:
            raise SourceError(f"picam:// wants a camera number, e.g. picam://0, not {text!r}")
        fmt = str(opts.pop("format", "RGB888"))
        timeout_s = float(opts.pop("timeout_s", 2.0))
        _no_more(opts, text)
        return picam_source(
            num,
            width=int(width or 640),
            height=int(height or 480),
            fmt=fmt,
            timeout_s=timeout_s,
            on_event=on_event,
            max_frames=max_frames,
            **cap_opts,
        )
    if scheme == "file":
        scheme, target = "", target
    if scheme:
        raise SourceError(
            f"unknown source scheme {scheme}:// in {text!r} (synthetic, v4l2, rtsp, csi, picam, file or a path)"
        )

    _no_more(opts, text)
    path = Path(target).expanduser()
    if path.suffix.lower() in VIDEO_EXTENSIONS and not is_glob(target):
        if not path.is_file():
            raise SourceError(f"video file not found: {target}")
        return VideoFileSource(str(path), on_event=on_event, max_frames=max_frames)
    if is_glob(target) or path.is_dir():
        return ImageFilesSource(expand_images(target), uri=text, on_event=on_event, max_frames=max_frames)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS or path.suffix == "":
            return ImageFilesSource([path], uri=text, on_event=on_event, max_frames=max_frames)
        return VideoFileSource(str(path), on_event=on_event, max_frames=max_frames)
    raise SourceError(f"not found: {target} (a camera is 0, v4l2:///dev/video0, csi://0 or picam://0)")


def _no_more(opts: dict[str, Any], uri: str) -> None:
    if opts:
        raise UsageError(f"{uri}: option(s) not understood: {', '.join(sorted(opts))}")
