"""Still images: one file, a folder, a glob, or a list of them.

A file that cannot be decoded is reported with one line (a ``skipped`` event)
and skipped; the rest are still read. ``Frame.name`` is the file name.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from hemaedge.edge.errors import InputError, SourceError
from hemaedge.edge.records import Frame
from hemaedge.edge.sources.base import EventCallback, FrameSource
from hemaedge.edge.sources.capture import as_bgr

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm", ".pgm", ".ppm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".h264", ".ts")


def is_glob(text: str) -> bool:
    """Whether ``text`` has glob wildcards."""
    return any(ch in text for ch in "*?[")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def expand_images(spec: str | os.PathLike[str]) -> list[Path]:
    """The image files named by a file path, a folder or a glob (sorted).

    A folder that holds no images itself but has subfolders that do (an analyser's export by class, one folder
    per patient) is read with all its subfolders.

    Raises:
        SourceError: Nothing exists there, or a folder / glob holds no images.
    """
    text = os.fspath(spec)
    if is_glob(text):
        paths = sorted(Path(p) for p in _glob.glob(text, recursive=True) if Path(p).is_file())
        paths = [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS] or paths
        if not paths:
            raise SourceError(f"no files match {text}")
        return paths
    path = Path(text).expanduser()
    if path.is_dir():
        paths = _images_in(path)
        if not paths:
            paths = _images_below(path)
        if not paths:
            raise SourceError(f"no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) in folder {path} or its subfolders")
        return paths
    if path.is_file():
        return [path]
    raise SourceError(f"not found: {text}")


def _images_below(root: Path) -> list[Path]:
    """Every image file in ``root``'s subfolders, sorted; linked folders are followed (each real folder once)."""
    seen: set[str] = set()
    out: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree: do not go round
            dirs[:] = []
            continue
        seen.add(real)
        out += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in out if p.is_file())


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 BGR.

    Raises:
        InputError: Missing, unreadable or not a decodable image (one line).
    """
    import cv2

    p = Path(path)
    try:
        data = np.fromfile(str(p), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    if data.size == 0:
        raise InputError(f"{p}: empty file")
    truncated = _truncated(data)
    if truncated:
        raise InputError(f"{p}: {truncated}")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise InputError(f"{p}: not a readable image (corrupt or unsupported format)")
    return as_bgr(img)


def _truncated(data: np.ndarray) -> str:
    """Why a JPEG or PNG file is cut short (``""`` when it ends as it should, or is another format).

    A decoder fills a cut JPEG with grey and only warns on the terminal; counting cells in half a picture
    would be wrong, so such a file is refused with this reason instead.
    """
    head = bytes(data[:8])
    tail = bytes(data[-4096:])
    if head[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in tail:
        return "truncated JPEG (the file ends before the image does: an interrupted copy or transfer?)"
    if head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        return "truncated PNG (the file ends before the image does: an interrupted copy or transfer?)"
    return ""


class ImageFilesSource(FrameSource):
    """Frames from still image files, in order; corrupt files are skipped with a warning.

    Args:
        paths: The files (see ``expand_images`` for folders and globs).
        uri: ``Frame.source_id`` (default: the first path's folder).
        on_event: Receives ``SourceEvent``s (default: warnings to stderr).
        max_frames: Stop after this many frames.

    Attributes:
        failed: ``(path, reason)`` of every file skipped so far.
        consumed: Files tried so far (read or skipped); ``unread()`` is how many are left.
    """

    live = False
    colour_order = "BGR"

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        uri: str | None = None,
        on_event: EventCallback | None = None,
        max_frames: int | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        super().__init__(uri or (str(self.paths[0].parent) if self.paths else "images"), on_event)
        self.max_frames = max_frames
        self.failed: list[tuple[Path, str]] = []
        self.consumed = 0
        self._common: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _name(self, path: Path) -> str:
        """The name a frame carries: the file name, with its subfolder when the files come from several."""
        if self._common is None:
            parents = {p.parent for p in self.paths}
            self._common = next(iter(parents)) if len(parents) == 1 else Path(os.path.commonpath(list(parents)))
        try:
            return path.relative_to(self._common).as_posix()
        except ValueError:
            return path.name

    def unread(self) -> int:
        """Files never tried (the reader stopped first, e.g. because the count reached its target)."""
        return len(self.paths) - self.consumed

    def _frames(self) -> Iterator[Frame]:
        index = 0
        for path in self.paths:
            if self.max_frames is not None and index >= self.max_frames:
                return
            self.consumed += 1
            try:
                img = read_image(path)
            except InputError as exc:
                self.failed.append((path, str(exc)))
                self.emit("skipped", f"{exc}; skipped", subject=self._name(path))
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                mtime = 0.0
            yield Frame(img, "BGR", mtime, self.uri, index, name=self._name(path))
            index += 1
        self.status = "ended"
        self.emit("ended", f"{self.uri}: {index} images read, {len(self.failed)} skipped")


def open_images(
    specs: Sequence[str | os.PathLike[str]] | str, on_event: EventCallback | None = None, max_frames: int | None = None
) -> ImageFilesSource:
    """An ``ImageFilesSource`` over files, folders and globs (each expanded, order kept).

    Files that do not exist are not an error here: they are reported and
    skipped when read, so one bad path does not stop a batch.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    paths: list[Path] = []
    for spec in specs:
        text = os.fspath(spec)
        if is_glob(text) or Path(text).is_dir():
            paths.extend(expand_images(text))
        else:
            paths.append(Path(text))
    uri = os.fspath(specs[0]) if len(specs) == 1 else "images"
    return ImageFilesSource(paths, uri=uri, on_event=on_event, max_frames=max_frames)
