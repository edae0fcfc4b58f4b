"""Labelled station data: where each labelled white cell is, and what it is.

Three layouts are read, chosen by what ``DATA`` holds:

* **single-cell images** ``DATA/<class>/*.jpg`` (or ``DATA/<split>/<class>/*``): each image is its own field
  holding one cell near its centre, as an analyser such as CellaVision exports them;
* **BCCD-style frames** ``DATA/JPEGImages/*.jpg`` + ``DATA/Annotations/*.xml`` (Pascal VOC, the white cell's box)
  + ``DATA/wbc_types.csv`` (``image,type``), optionally split by ``DATA/<split>.txt``;
* **frames with a label file** ``DATA/labels.csv`` with a header ``image,class`` and optionally
  ``x0,y0,x1,y1`` (the cell's box in pixels; without it the cell nearest the image centre is taken).

Every reader returns ``LabelledCell`` records; images are read later, by the evaluation.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hemaedge.edge.errors import InputError, UsageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LabelledCell:
    """One labelled white cell.

    Attributes:
        image: The image file holding it.
        label: Its class as the data set names it (a folder name, a BCCD type, a labels.csv entry).
        box: Its box in pixels ``(x0, y0, x1, y1)`` when the labels give one; None: the cell nearest the centre.
    """

    image: Path
    label: str
    box: tuple[float, float, float, float] | None = None


def layout(root: Path) -> str:
    """Which layout ``root`` holds: ``"bccd"``, ``"labels_csv"`` or ``"folders"``."""
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir() and (root / "wbc_types.csv").is_file():
        return "bccd"
    if (root / "labels.csv").is_file():
        return "labels_csv"
    return "folders"


def read_labelled(root: str | Path, split: str | None = None) -> tuple[list[LabelledCell], str]:
    """The labelled cells under ``root`` and the layout they were read from.

    Raises:
        InputError: nothing labelled there (one line saying what was looked for).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"labelled data {root} is not a folder")
    kind = layout(root)
    cells = {"bccd": bccd_cells, "labels_csv": csv_cells, "folders": folder_cells}[kind](root, split)
    if not cells:
        where = f" (split {split})" if split else ""
        raise InputError(
            f"no labelled cells in {root}{where}: expected DATA/<class>/*.jpg, BCCD's layout or DATA/labels.csv"
        )
    return cells, kind


def folder_cells(root: Path, split: str | None = None) -> list[LabelledCell]:
    """Single-cell images in class folders (``root/[split/]<class>/*``)."""
    base = root / split if split and (root / split).is_dir() else root
    if split and base == root and any((root / s).is_dir() for s in SPLITS):
        raise UsageError(f"{root} has no '{split}' split folder")
    if base == root and not split and any((root / s).is_dir() for s in SPLITS):
        have = [s for s in SPLITS if (root / s).is_dir()]
        raise UsageError(f"{root} holds splits {have}: choose one with --split")
    out = []
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for img in sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
            out.append(LabelledCell(img, d.name))
    return out


def _voc_box(xml: Path, name: str = "WBC") -> tuple[float, float, float, float] | None:
    """The largest box of an object called ``name`` in a Pascal VOC file (BCCD labels one white cell a frame)."""
    import xml.etree.ElementTree as ET

    boxes = []
    for obj in ET.parse(str(xml)).getroot().iter("object"):
        bb = obj.find("bndbox")
        if (obj.findtext("name") or "").strip() == name and bb is not None:
            boxes.append(tuple(float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")))
    if not boxes:
        return None
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))


def bccd_cells(root: Path, split: str | None = None) -> list[LabelledCell]:
    """BCCD-style frames: the white cell's VOC box and its type from ``wbc_types.csv``.

    Frames whose type names two cells (``"NEUTROPHIL, LYMPHOCYTE"``) or none are left out: their one labelled
    box cannot say which cell is which.
    """
    if split and not (root / f"{split}.txt").is_file():
        raise UsageError(
            f"{root} has no {split}.txt: splits here are {[s for s in SPLITS if (root / f'{s}.txt').is_file()]}"
        )
    names = None
    if split:
        names = {ln.strip() for ln in (root / f"{split}.txt").read_text().split() if ln.strip()}
    types: dict[str, str] = {}
    with open(root / "wbc_types.csv", newline="") as f:
        for row in csv.reader(f):
            named = [t.strip() for t in row[1:] if t.strip()]
            if len(row) >= 2 and len(named) == 1 and "," not in named[0] and row[0].strip().lower() != "image":
                types[row[0].strip()] = named[0].lower()
    out = []
    for name in sorted(types):
        if names is not None and name not in names:
            continue
        image, xml = root / "JPEGImages" / f"{name}.jpg", root / "Annotations" / f"{name}.xml"
        if not image.is_file() or not xml.is_file():
            continue
        box = _voc_box(xml)
        if box is not None:
            out.append(LabelledCell(image, types[name], box))
    return out


def csv_cells(root: Path, split: str | None = None) -> list[LabelledCell]:
    """Frames listed in ``root/labels.csv`` (``image,class[,x0,y0,x1,y1]``; image paths relative to ``root``)."""
    if split:
        raise UsageError("labels.csv data has no splits: drop --split")
    out = []
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows, start=2):
        image, label = (row.get("image") or "").strip(), (row.get("class") or "").strip()
        if not image or not label:
            raise InputError(f"{root / 'labels.csv'} line {i}: needs 'image' and 'class'")
        box = None
        if all((row.get(k) or "").strip() for k in ("x0", "y0", "x1", "y1")):
            box = tuple(float(row[k]) for k in ("x0", "y0", "x1", "y1"))
        out.append(LabelledCell(root / image, label, box))
    return out


def best_match(boxes: Sequence[Sequence[float]], truth: Sequence[float], min_iou: float = 0.5) -> int | None:
    """The index of the box that overlaps ``truth`` best with IoU >= ``min_iou``, else None."""
    if not len(boxes):
        return None
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    t = np.asarray(truth, np.float64)
    x0, y0 = np.maximum(b[:, 0], t[0]), np.maximum(b[:, 1], t[1])
    x1, y1 = np.minimum(b[:, 2], t[2]), np.minimum(b[:, 3], t[3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
    iou = inter / np.maximum(union, 1e-9)
    k = int(np.argmax(iou))
    return k if iou[k] >= min_iou else None
