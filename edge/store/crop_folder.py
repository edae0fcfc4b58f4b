"""Crops as an image folder that ``export-model --calib DIR`` reads (calibrate INT8 on the station's own camera).

The crops are exactly what the runtime feeds the shared ``preprocess``: the
square cut by ``cut_crop`` with the bundle's crop geometry, before resizing,
so calibration sees the same pixels, scale and colour as counting does.
Layout: ``DIR/unlabelled/*.png``, or with ``by_class`` ``DIR/<predicted class>/*.png``
(low-confidence cells go to ``unlabelled/``; folder names are the bundle's class
names, which the image-folder reader matches against the model's classes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from hemaedge.edge.errors import StoreError
from hemaedge.edge.store.session import write_png

UNLABELLED = "unlabelled"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "frame"


class CropFolder:
    """Writes crops into an image-folder tree.

    Args:
        root: The output directory (created).
        by_class: One folder per predicted class instead of ``unlabelled/``.
        prefix: Prepended to every file name (e.g. a session id), so several runs can share a folder.
    """

    def __init__(self, root: str | os.PathLike, by_class: bool = False, prefix: str = ""):
        self.root = Path(root)
        self.by_class = by_class
        self.prefix = prefix
        self.written = 0
        self._made: set[Path] = set()

    def write(
        self, rgb: np.ndarray, frame_index: int, frame_name: str, cell: int, class_name: str | None = None
    ) -> Path:
        """Write one RGB crop; returns its path.

        Raises:
            StoreError: the folder cannot be written (one line).
        """
        folder = self.root / (class_name if self.by_class and class_name else UNLABELLED)
        stem = _safe(Path(frame_name).stem) if frame_name else f"f{frame_index:06d}"
        path = folder / f"{self.prefix}{stem}-{frame_index:06d}-c{cell:03d}.png"
        try:
            if folder not in self._made:
                folder.mkdir(parents=True, exist_ok=True)
                self._made.add(folder)
            write_png(path, rgb, sync=False)
        except OSError as exc:
            raise StoreError(f"cannot write crops to {folder}: {exc.strerror or exc}") from exc
        self.written += 1
        return path
