"""Labelled detection frames for training the white-cell detector, at the working scale, and the training canvases.

Frames come from the shared data sets (``$HEMAEDGE_DATA``):

* ``txl-pbc``: YOLO labels (0 white cell, 1 red cell, 2 platelet), ``sources.csv`` names each frame's
  microscope (PBC, Raabin-WBC, BCDD, BCCD); its own train and val folders are pooled.
* ``bccd``: Pascal VOC (``WBC``, ``RBC``), ``train.txt`` / ``val.txt``.

TXL-PBC's BCCD-source frames are BCCD frames relabelled. ``bccd_duplicates`` matches them to BCCD by
pixels (a 16 x 12 grey thumbnail, correlation > 0.98): all 116 here are BCCD train (79) or val (37)
frames; BCCD val frames are never trained on, in either labelling, so BCCD val stays held out, and a
BCCD-source frame that matches neither split (none here: a BCCD test frame) would be left out too.

Every frame is brought to the detector's working scale by the runtime's own measurement of its red
cells (``hemaedge.edge.segment.scale.estimate_scale``; the frame-size guess where it finds none), so
training sees what the station will feed the detector, then kept at ``KEEP`` times that scale so that
zoom augmentation has pixels to spare.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hemaedge.edge.segment.scale import estimate_scale, frame_guess
from hemaedge.edge.segment.stain import white_balance
from hemaedge.evaluation.groundtruth import read_voc, read_yolo

KEEP = 2.0  # frames are stored at this multiple of the working scale
SOURCES = ("PBC", "Raabin", "BCDD", "BCCD")


@dataclass
class LabelledFrame:
    """One frame at ``KEEP`` x working scale: white-balanced BGR pixels, white-cell boxes, where it came from."""

    name: str
    source: str
    split: str
    pixels: np.ndarray
    boxes: np.ndarray
    factor: float  # frame pixels * factor = stored pixels
    px_per_um: float
    scale_source: str
    extra: dict = field(default_factory=dict)


def source_of(name: str) -> str:
    """Short source name (``Raabin-WBC`` -> ``Raabin``, ``BCCD-VOC`` -> ``BCCD``)."""
    return {"Raabin-WBC": "Raabin", "BCCD-VOC": "BCCD"}.get(name, name)


def _thumb(bgr: np.ndarray) -> np.ndarray:
    import cv2

    g = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), (16, 12), interpolation=cv2.INTER_AREA).astype(np.float32)
    g = g.ravel() - g.mean()
    return g / max(float(np.linalg.norm(g)), 1e-6)


def bccd_duplicates(root: Path) -> dict[str, str]:
    """TXL-PBC BCCD-source file name -> the BCCD split whose frame it is (``train``/``val``), or ``none``.

    Matched by pixels (see the module docstring), not by the file name ``sources.csv`` gives.
    """
    import cv2

    bccd = root / "bccd"
    names, thumbs, splits = [], [], []
    for split in ("train", "val"):
        for stem in (bccd / f"{split}.txt").read_text().split():
            img = cv2.imread(str(bccd / "JPEGImages" / f"{stem}.jpg"))
            if img is None:
                continue
            names.append(stem)
            thumbs.append(_thumb(img))
            splits.append(split)
    mat = np.stack(thumbs) if thumbs else np.zeros((0, 192), np.float32)
    out: dict[str, str] = {}
    txl = root / "txl-pbc"
    for name, src in _txl_sources(txl).items():
        if src != "BCCD":
            continue
        path = next((p for p in (txl / "images" / s / name for s in ("train", "val")) if p.exists()), None)
        if path is None:
            continue
        img = cv2.imread(str(path))
        corr = mat @ _thumb(img) if len(mat) else np.zeros(0)
        j = int(np.argmax(corr)) if len(corr) else -1
        out[name] = splits[j] if j >= 0 and corr[j] > 0.98 else "none"
    return out


def _txl_sources(txl: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    p = txl / "sources.csv"
    if p.exists():
        with p.open() as fh:
            for row in csv.reader(fh):
                if len(row) >= 2:
                    out[row[0]] = source_of(row[1])
    return out


def frame_list(root: Path, bccd_splits: tuple[str, ...] = ("train",)) -> list[tuple[Path, str, str, np.ndarray, str]]:
    """``(image, source, split, white-cell boxes, labelling)`` of every frame training may use.

    TXL-PBC frames (both of its folders) and BCCD frames of ``bccd_splits``; TXL-PBC BCCD-source frames
    are kept only when they are BCCD frames of ``bccd_splits`` (see the module docstring).
    """
    import cv2

    out = []
    txl = root / "txl-pbc"
    srcs = _txl_sources(txl)
    dup = bccd_duplicates(root) if (root / "bccd").exists() else {}
    for split in ("train", "val"):
        for img in sorted((txl / "images" / split).glob("*")):
            src = srcs.get(img.name, "?")
            if src == "BCCD" and dup.get(img.name, "none") not in bccd_splits:
                continue
            im = cv2.imread(str(img), cv2.IMREAD_GRAYSCALE)
            if im is None:
                continue
            h, w = im.shape
            boxes = read_yolo(txl / "labels" / split / (img.stem + ".txt"), w, h, (0,))
            out.append((img, src, f"txl-{split}", boxes, "yolo"))
    for split in bccd_splits:
        for stem in (root / "bccd" / f"{split}.txt").read_text().split():
            xml = root / "bccd" / "Annotations" / f"{stem}.xml"
            out.append((root / "bccd" / "JPEGImages" / f"{stem}.jpg", "BCCD", f"bccd-{split}", read_voc(xml), "voc"))
    return out


def load_frames(
    root: Path, work_ppu: float, bccd_splits: tuple[str, ...] = ("train",), cache: Path | None = None
) -> list[LabelledFrame]:
    """Every training frame at ``KEEP * work_ppu`` px/um (white-balanced), cached in ``cache`` (npz) when given."""
    import pickle

    import cv2

    key = hashlib.md5(f"{root.resolve()}|{work_ppu}|{KEEP}|{bccd_splits}|v1".encode()).hexdigest()[:10]
    if cache is not None:
        path = cache / f"frames-{key}.pkl"
        if path.exists():
            with path.open("rb") as fh:
                return pickle.load(fh)
    frames = []
    for img_path, src, split, boxes, _ in frame_list(root, bccd_splits):
        img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        if img is None:
            continue
        scale = estimate_scale(img) or frame_guess(img.shape)
        f = KEEP * scale.factor_to(work_ppu)
        small = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        small = white_balance(small)
        b = np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(small.shape[1] / img.shape[1])
        frames.append(
            LabelledFrame(
                img_path.name, src, split, small, b, small.shape[1] / img.shape[1], scale.px_per_um, scale.source
            )
        )
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        with (cache / f"frames-{key}.pkl").open("wb") as fh:
            pickle.dump(frames, fh)
    return frames
