"""``hemaedge evaluate --detect DATA``: white-cell detection scored on labelled folders (cv2 + numpy only).

A labelled folder is one of:

* **Pascal VOC**: ``Annotations/*.xml`` beside ``JPEGImages/`` (BCCD's layout); white cells are objects
  named ``WBC`` (any case, or ``--names``); ``train.txt`` / ``val.txt`` / ``test.txt`` (or
  ``ImageSets/Main/<split>.txt``) choose a split, ``all`` takes every annotation;
* **YOLO**: ``images/`` and ``labels/`` (each optionally with split subfolders, TXL-PBC's layout); the
  white-cell class is the line ``WBC`` of ``classes.txt`` (else class 0); ``sources.csv`` (file name,
  source) splits the table by microscope.

Boxes are matched one-to-one, greedily by score, at IoU >= 0.5 (``hemaedge.edge.segment.matching.match``); a label file
that repeats a box exactly counts it once (``groundtruth.distinct_boxes``). The numbers are per source
and in total; ``--json`` prints them for machines.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.errors import InputError, UsageError
from hemaedge.edge.segment.matching import match
from hemaedge.evaluation.groundtruth import Labelled, Tally, distinct_boxes, hash_half, read_yolo

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
WBC_NAMES = ("wbc", "white blood cell", "white_blood_cell", "leukocyte", "leucocyte")


def folder_kind(root: Path) -> str:
    """``"voc"`` or ``"yolo"``: which layout a labelled folder has (InputError when neither)."""
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "yolo"
    raise InputError(
        f"{root} is neither a Pascal VOC folder (Annotations/ + JPEGImages/) nor a YOLO folder (images/ + labels/)"
    )


def _voc_boxes(xml: Path, names: Sequence[str]) -> np.ndarray:
    import xml.etree.ElementTree as ET

    wanted = {n.lower() for n in names}
    boxes = []
    for obj in ET.parse(str(xml)).getroot().iter("object"):
        if (obj.findtext("name") or "").strip().lower() not in wanted:
            continue
        bb = obj.find("bndbox")
        if bb is not None:
            boxes.append([float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")])
    return distinct_boxes(np.asarray(boxes, np.float32))


def _image_for(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for s in (suffix, suffix.upper()):
            p = folder / f"{stem}{s}"
            if p.is_file():
                return p
    return None


def voc_items(root: Path, split: str = "all", names: Sequence[str] = WBC_NAMES, source: str = "") -> Iterator[Labelled]:
    """Labelled images of a VOC folder (``split``: a ``<split>.txt`` list, or ``all``)."""
    ann = root / "Annotations"
    if split == "all":
        stems = [p.stem for p in sorted(ann.glob("*.xml"))]
    else:
        lst = next(
            (p for p in (root / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt") if p.is_file()), None
        )
        if lst is None:
            raise InputError(f"{root} has no {split}.txt split list (use --split all)")
        stems = [s.strip() for s in lst.read_text().split() if s.strip()]
    images = root / "JPEGImages" if (root / "JPEGImages").is_dir() else root
    for stem in stems:
        img = _image_for(images, stem)
        xml = ann / f"{stem}.xml"
        if img is None or not xml.is_file():
            continue
        yield Labelled(img, _voc_boxes(xml, names), source or root.name, split)


def _yolo_class(root: Path, names: Sequence[str]) -> int:
    p = root / "classes.txt"
    if p.is_file():
        wanted = {n.lower() for n in names}
        for i, line in enumerate(p.read_text().splitlines()):
            if line.strip().lower() in wanted:
                return i
    return 0


def yolo_items(
    root: Path, split: str = "all", half: str | None = None, names: Sequence[str] = WBC_NAMES
) -> Iterator[Labelled]:
    """Labelled images of a YOLO folder (``split``: a subfolder of ``images/`` or ``all``; ``half``: ``a``/``b`` by name hash)."""
    import cv2

    cls = _yolo_class(root, names)
    sources: dict[str, str] = {}
    if (root / "sources.csv").is_file():
        with (root / "sources.csv").open() as fh:
            for row in csv.reader(fh):
                if len(row) >= 2:
                    sources[row[0]] = row[1]
    subs = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    if split == "all":
        folders = subs or [""]
    elif split in subs:
        folders = [split]
    else:
        raise InputError(f"{root}/images has no {split}/ folder (it has: {', '.join(subs) or 'no split folders'})")
    for sub in folders:
        for img in sorted((root / "images" / sub).iterdir()):
            if img.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if half is not None and hash_half(img.name) != half:
                continue
            probe = cv2.imread(str(img), cv2.IMREAD_GRAYSCALE)
            h, w = probe.shape[:2] if probe is not None else (0, 0)
            label = root / "labels" / sub / (img.stem + ".txt")
            yield Labelled(img, read_yolo(label, w, h, (cls,)), sources.get(img.name, root.name), sub or split)


RBC_NAMES = ("rbc", "red blood cell", "red_blood_cell", "erythrocyte")


def folder_items(
    root: str | Path, split: str = "all", half: str | None = None, names: Sequence[str] = WBC_NAMES
) -> list[Labelled]:
    """Every labelled image of a VOC or YOLO folder, with the boxes of objects called ``names``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder")
    kind = folder_kind(root)
    if half is not None and kind != "yolo":
        raise UsageError("--half splits YOLO folders (by file-name hash); this is a VOC folder")
    items = list(voc_items(root, split, names) if kind == "voc" else yolo_items(root, split, half, names))
    if not items:
        raise InputError(f"no labelled images in {root} (split {split})")
    return items


def score_detections(
    detect: Callable[[np.ndarray], list],
    items: Sequence[Labelled],
    iou: float = 0.5,
    on_image: Callable | None = None,
) -> dict[str, Tally]:
    """Recall and precision of ``detect(bgr) -> detections`` per source and in total (key ``"all"``)."""
    import time

    import cv2

    out: dict[str, Tally] = {"all": Tally()}
    for it in items:
        img = cv2.imread(str(it.path), cv2.IMREAD_COLOR)
        if img is None:
            continue
        t0 = time.process_time()
        dets = [d for d in detect(img) if getattr(d, "kind", "wbc") == "wbc"]
        dt = time.process_time() - t0
        boxes = np.asarray([d.box for d in dets], np.float32).reshape(-1, 4)
        scores = np.asarray([d.score for d in dets], np.float32)
        counts = match(boxes, scores, it.boxes, iou)
        out.setdefault(it.source, Tally()).add(*counts, dt)
        out["all"].add(*counts, dt)
        if on_image is not None:
            on_image(it, dets, counts)
    return out


def config_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as ``SegmenterConfig`` overrides of the stain segmenter (typed like the field)."""
    from hemaedge.edge.segment.stain import SegmenterConfig

    fields = SegmenterConfig.__dataclass_fields__
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise UsageError(f"unknown stain segmenter setting {key!r}; one of: {', '.join(fields)}")
        kind = type(getattr(SegmenterConfig(), key))
        try:
            out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            raise UsageError(f"--set {pair}: {key} takes a {kind.__name__}") from None
    return out


def report_table(title: str, results: dict[str, dict[str, Any]]) -> Any:
    """A rich table of ``{set label: {source: Tally.as_dict()}}``."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("set", "source", "images", "cells", "TP", "FP", "FN", "recall", "precision", "ms/img"):
        table.add_column(col, justify="left" if col in ("set", "source") else "right")
    for label, groups in results.items():
        for name, r in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
            table.add_row(
                label,
                name,
                str(r["images"]),
                str(r["truth"]),
                str(r["tp"]),
                str(r["fp"]),
                str(r["fn"]),
                f"{r['recall']:.4f}",
                f"{r['precision']:.4f}",
                f"{r['ms_per_image']:.1f}",
                style="bold" if name == "all" else None,
            )
    return table


__all__ = [
    "RBC_NAMES",
    "config_overrides",
    "WBC_NAMES",
    "folder_items",
    "folder_kind",
    "report_table",
    "score_detections",
    "voc_items",
    "yolo_items",
]
