"""Ground-truth readers for measuring white-cell detection (box matching: ``hemaedge.edge.segment.matching``).

Readers for the two labelled detection sets we measure on: BCCD (Pascal VOC
XML, ``WBC`` and ``Platelets`` objects) and TXL-PBC (YOLO text labels, class 0 =
WBC, 2 = platelet, with a ``sources.csv`` naming the microscope each image came from).
"""

from __future__ import annotations

import csv
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hemaedge.edge.segment.matching import match


@dataclass(frozen=True)
class Labelled:
    """One labelled image: path, WBC boxes (N x 4, x0 y0 x1 y1 pixels) and where it came from."""

    path: Path
    boxes: np.ndarray
    source: str = ""
    split: str = ""


def read_voc(xml_path: str | Path, names: Sequence[str] = ("WBC",)) -> np.ndarray:
    """Boxes of the named objects in a Pascal VOC annotation (N x 4 float32, x0 y0 x1 y1)."""
    root = ET.parse(str(xml_path)).getroot()
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in names:
            continue
        bb = obj.find("bndbox")
        if bb is None:
            continue
        boxes.append([float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")])
    return distinct_boxes(np.asarray(boxes, np.float32))


def read_yolo(txt_path: str | Path, width: int, height: int, classes: Sequence[int] = (0,)) -> np.ndarray:
    """Boxes of the given classes in a YOLO label file, in pixels (N x 4 float32)."""
    boxes = []
    p = Path(txt_path)
    if p.exists():
        for line in p.read_text().splitlines():
            parts = line.split()
            if len(parts) < 5 or int(float(parts[0])) not in classes:
                continue
            cx, cy, w, h = (float(v) for v in parts[1:5])
            boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
    return distinct_boxes(np.asarray(boxes, np.float32))


def distinct_boxes(boxes: np.ndarray) -> np.ndarray:
    """``boxes`` without exact repeats, in their first order.

    A label file that lists the same box twice is one cell labelled twice (TXL-PBC half "b" holds
    one image with a single white cell written six times): counting each copy would charge the
    detector with misses no detector could avoid. Overlapping but *different* boxes are kept.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes) < 2:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def hash_half(name: str) -> str:
    """A fixed split of file names into halves ``"a"`` / ``"b"`` (md5 of the name; stable everywhere)."""
    return "a" if hashlib.md5(name.encode()).digest()[0] % 2 == 0 else "b"


def bccd_items(root: str | Path, split: str = "val", names: Sequence[str] = ("WBC",)) -> Iterator[Labelled]:
    """BCCD images of ``split`` (``train``/``val``/``all``) with the boxes of objects ``names`` (``"Platelets"``)."""
    root = Path(root)
    if split == "all":
        stems = [p.stem for p in sorted((root / "Annotations").glob("*.xml"))]
    else:
        stems = [n.strip() for n in (root / f"{split}.txt").read_text().split() if n.strip()]
    for stem in stems:
        img = root / "JPEGImages" / f"{stem}.jpg"
        yield Labelled(img, read_voc(root / "Annotations" / f"{stem}.xml", names), "BCCD-VOC", split)


def txl_items(
    root: str | Path, split: str = "all", half: str | None = None, classes: Sequence[int] = (0,)
) -> Iterator[Labelled]:
    """TXL-PBC images (``split``: its own ``train``/``val`` folders or ``all``; ``half``: ``"a"``/``"b"`` by name hash).

    ``classes`` are the YOLO classes whose boxes are the truth: 0 white cells (default), 2 platelets.
    """
    import cv2

    root = Path(root)
    sources: dict[str, str] = {}
    src_csv = root / "sources.csv"
    if src_csv.exists():
        with src_csv.open() as fh:
            for row in csv.reader(fh):
                if len(row) >= 2:
                    sources[row[0]] = row[1]
    splits = ["train", "val"] if split == "all" else [split]
    for sp in splits:
        for img in sorted((root / "images" / sp).glob("*")):
            if half is not None and hash_half(img.name) != half:
                continue
            label = root / "labels" / sp / (img.stem + ".txt")
            h, w = _image_size(img, cv2)
            yield Labelled(img, read_yolo(label, w, h, classes), sources.get(img.name, "?"), sp)


def _image_size(path: Path, cv2) -> tuple[int, int]:  # noqa: ANN001
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return (0, 0) if img is None else img.shape[:2]


@dataclass
class Tally:
    """Detection counts for one group of images."""

    images: int = 0
    truth: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    seconds: float = 0.0

    @property
    def recall(self) -> float:
        """Share of true white cells found (1.0 when there were none)."""
        return self.tp / self.truth if self.truth else 1.0

    @property
    def precision(self) -> float:
        """Share of detections that are true white cells (1.0 when nothing was detected)."""
        return self.tp / (self.tp + self.fp) if (self.tp + self.fp) else 1.0

    def add(self, tp: int, fp: int, fn: int, seconds: float = 0.0) -> None:
        """Count one image."""
        self.images += 1
        self.truth += tp + fn
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.seconds += seconds

    def as_dict(self) -> dict:
        """Plain numbers for JSON."""
        return {
            "images": self.images,
            "truth": self.truth,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "recall": round(self.recall, 4),
            "precision": round(self.precision, 4),
            "ms_per_image": round(1000 * self.seconds / self.images, 2) if self.images else 0.0,
        }


def evaluate(
    segmenter,
    items: Iterator[Labelled] | Sequence[Labelled],
    iou: float = 0.5,  # noqa: ANN001
    on_image=None,
    kind: str | None = None,
    rule: str = "iou",  # noqa: ANN001
    rules: Sequence[str] = (),
) -> dict[str, Tally]:
    """Recall and precision of ``segmenter``'s boxes at ``iou``, per source and in total (key ``"all"``).

    Args:
        segmenter: Anything with ``detect(image) -> list[Detection]``.
        items: Labelled images (``bccd_items``, ``txl_items``).
        iou: Match threshold (one-to-one, greedy by score).
        on_image: Optional callback ``(item, detections, (tp, fp, fn))`` per image (progress, failure lists).
        kind: Score only detections of this kind (``"wbc"``, ``"platelet"``); None: all of them.
        rule: ``"iou"`` or ``"centre"`` (see :func:`match`).
        rules: More rules scored on the same detections (one detection pass), under keys
            ``"<source>|<rule>"`` (e.g. ``"all|centre"``).

    Returns:
        ``{source: Tally, ..., "all": Tally}``; unreadable images are skipped.
    """
    import time

    import cv2

    out: dict[str, Tally] = {"all": Tally()}
    for item in items:
        img = cv2.imread(str(item.path), cv2.IMREAD_COLOR)
        if img is None:
            continue
        t0 = time.process_time()
        dets = segmenter.detect(img)
        dt = time.process_time() - t0
        if kind is not None:
            dets = [d for d in dets if d.kind == kind]
        boxes = np.asarray([d.box for d in dets], np.float32).reshape(-1, 4)
        scores = np.asarray([d.score for d in dets], np.float32)
        tp, fp, fn = match(boxes, scores, item.boxes, iou, rule)
        out.setdefault(item.source, Tally()).add(tp, fp, fn, dt)
        out["all"].add(tp, fp, fn, dt)
        for extra in rules:
            counts = match(boxes, scores, item.boxes, iou, extra)
            out.setdefault(f"{item.source}|{extra}", Tally()).add(*counts, dt)
            out.setdefault(f"all|{extra}", Tally()).add(*counts, dt)
        if on_image is not None:
            on_image(item, dets, (tp, fp, fn))
    return out
