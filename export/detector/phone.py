"""Synthetic "phone through the eyepiece" frames, built from labelled microscope frames (a stress test).

A clinic without a microscope camera holds a phone to the eyepiece at low magnification: white cells are
15-25 px across, the field is a bright disc in a dark surround, vignetted, and the picture is blurred,
noisy, sharpened and JPEG-compressed by the phone. We have no such pictures, so we make them:

1. one microscope per phone frame (one source); a white-cell size for the frame is drawn from
   ``wbc_px`` and every tile is shrunk so its *labelled red cells* (not our measurement) come out at
   that size / ``WBC_TO_RBC``: one physical scale per frame, white cells keep their natural spread;
2. tiles (whole frames or parts without a white cell, so that the field is not all white cells) are
   white-balanced and packed row by row over the frame;
3. the optics and the phone: blur, a circular field stop with a soft edge, dark surround and
   vignetting, colour cast and gamma, noise, sometimes sharpening, JPEG.

Truth is the white-cell boxes with at least ``MIN_VISIBLE`` of their area in their tile and their centre
in the lit field; smaller pieces and cells under the field stop are *ignore* regions: a detection centred
in one is neither a hit nor a false alarm (``score_phone``).

This is synthetic: real phone pictures differ (chromatic aberration, rolling exposure, glare, a field stop
that is not round), and tile seams are visible. Read its numbers as a stress test of scale awareness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from hemaedge.export.detector.augment import blur, jpeg, noise, vignette_and_stop

WBC_TO_RBC = 1.85  # median white-cell box side over red-cell box side in TXL-PBC (per source 1.56-2.04)
MIN_VISIBLE = 0.6


@dataclass(frozen=True)
class PhoneFrame:
    """One synthetic phone frame: BGR pixels, white-cell truth boxes, ignore boxes, and how it was made."""

    pixels: np.ndarray
    boxes: np.ndarray
    ignore: np.ndarray
    source: str
    wbc_px: float
    rbc_px: float


@dataclass(frozen=True)
class Tile:
    """A labelled frame to build phone frames from: path, white-cell boxes, red-cell boxes, source."""

    path: str
    wbc: np.ndarray
    rbc: np.ndarray
    source: str


def _rbc_side(t: Tile) -> float | None:
    b = np.asarray(t.rbc, np.float32).reshape(-1, 4)
    if len(b) < 2:
        return None
    return float(np.median(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))))


def phone_frame(
    tiles: Sequence[Tile],
    rng: np.random.Generator,
    read: Callable[[str], np.ndarray],
    size: tuple[int, int] = (480, 640),
    wbc_px: tuple[float, float] = (15.0, 25.0),
    wbc_tile_p: float = 0.35,
) -> PhoneFrame:
    """One phone frame from ``tiles`` (one source; ``read(path)`` gives BGR pixels)."""
    import cv2
    from hemaedge.edge.segment.stain import white_balance

    h, w = size
    wbc = float(rng.uniform(*wbc_px))
    rbc = wbc / WBC_TO_RBC
    canvas = np.full((h, w, 3), 235, np.uint8)
    keep: list = []
    ignore: list = []
    known = [s for s in (_rbc_side(t) for t in tiles) if s]
    fallback = float(np.median(known)) if known else None
    y = 0
    while y < h:
        x, row_h = 0, 0
        while x < w:
            t = tiles[int(rng.integers(len(tiles)))]
            side = _rbc_side(t) or fallback
            if not side:
                break
            img = read(t.path)
            z = rbc / side
            boxes = np.asarray(t.wbc, np.float32).reshape(-1, 4)
            crop = _pick_crop(img.shape, boxes, rng, wbc_tile_p)
            cx0, cy0, cx1, cy1 = crop
            part = white_balance(img[cy0:cy1, cx0:cx1])
            tw, th = max(1, int(round((cx1 - cx0) * z))), max(1, int(round((cy1 - cy0) * z)))
            part = cv2.resize(part, (tw, th), interpolation=cv2.INTER_AREA)
            if rng.random() < 0.5:
                part = part[:, ::-1]
                fx = True
            else:
                fx = False
            vw, vh = min(tw, w - x), min(th, h - y)
            canvas[y : y + vh, x : x + vw] = part[:vh, :vw]
            for b in boxes:
                bb = (np.asarray(b, np.float32) - [cx0, cy0, cx0, cy0]) * z
                if fx:
                    bb = np.asarray([tw - bb[2], bb[1], tw - bb[0], bb[3]], np.float32)
                full = max((bb[2] - bb[0]) * (bb[3] - bb[1]), 1e-3)
                c = np.asarray([max(bb[0], 0), max(bb[1], 0), min(bb[2], vw), min(bb[3], vh)], np.float32)
                vis = max(0.0, c[2] - c[0]) * max(0.0, c[3] - c[1]) / full
                c += [x, y, x, y]
                if vis >= MIN_VISIBLE:
                    keep.append(c)
                elif vis > 0.05:
                    ignore.append(c)
            x += tw
            row_h = max(row_h, th)
        if row_h == 0:
            break
        y += row_h
    img = blur(canvas, float(rng.uniform(0.5, 1.3)))
    radius = float(min(h, w) * rng.uniform(0.42, 0.6))
    centre = (w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2 + rng.uniform(-0.05, 0.05) * h)
    img, field = vignette_and_stop(
        img, rng, centre, radius, float(rng.uniform(0.2, 0.5)), float(rng.uniform(4, 25)), 4.0
    )
    gains = np.exp(rng.normal(0, 0.1, 3))
    gamma = float(np.exp(rng.normal(0, 0.12)))
    img = np.clip(255 * (np.clip(img / 255.0 * gains, 0, 1) ** gamma), 0, 255).astype(np.uint8)
    img = noise(img, rng, float(rng.uniform(2, 6)))
    if rng.random() < 0.4:
        soft = cv2.GaussianBlur(img, (0, 0), 1.0)
        img = cv2.addWeighted(img, 1.5, soft, -0.5, 0)
    img = jpeg(img, int(rng.integers(50, 86)))
    truth, hidden = [], []
    for b in keep:
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        inside = math.hypot(cx - centre[0], cy - centre[1]) < radius - 2
        (truth if inside else hidden).append(b)
    src = tiles[0].source if tiles else ""
    return PhoneFrame(
        img,
        np.asarray(truth, np.float32).reshape(-1, 4),
        np.asarray(ignore + hidden, np.float32).reshape(-1, 4),
        src,
        wbc,
        rbc,
    )


def _pick_crop(
    shape: tuple[int, ...], boxes: np.ndarray, rng: np.random.Generator, wbc_p: float
) -> tuple[int, int, int, int]:
    """A part of the frame: the whole frame (with its white cells) with probability ``wbc_p``, else a
    region avoiding the white cells when one can be found."""
    h, w = shape[:2]
    if not len(boxes) or rng.random() < wbc_p:
        return 0, 0, w, h
    for _ in range(20):
        cw, ch = int(w * rng.uniform(0.3, 0.6)), int(h * rng.uniform(0.3, 0.6))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        hit = (boxes[:, 0] < x0 + cw) & (boxes[:, 2] > x0) & (boxes[:, 1] < y0 + ch) & (boxes[:, 3] > y0)
        if not hit.any():
            return x0, y0, x0 + cw, y0 + ch
    return 0, 0, w, h


def phone_set(
    tiles: Sequence[Tile], n: int, seed: int = 0, read: Callable[[str], np.ndarray] | None = None, **kw
) -> list[PhoneFrame]:
    """``n`` phone frames, each from the tiles of one source (sources in turn), reproducible by ``seed``."""
    import cv2

    cache: dict[str, np.ndarray] = {}

    def _read(path: str) -> np.ndarray:
        if path not in cache:
            cache[path] = cv2.imread(path, cv2.IMREAD_COLOR)
        return cache[path]

    read = read or _read
    by: dict[str, list[Tile]] = {}
    for t in tiles:
        by.setdefault(t.source, []).append(t)
    names = sorted(by)
    rng = np.random.default_rng(seed)
    return [phone_frame(by[names[i % len(names)]], rng, read, **kw) for i in range(n)]


def score_phone(
    detect: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], frames: Sequence[PhoneFrame], iou: float = 0.5
):
    """Recall/precision over phone frames; detections centred in an ignore region are left out."""
    from hemaedge.edge.segment.matching import match
    from hemaedge.evaluation.groundtruth import Tally

    tallies: dict[str, Tally] = {"all": Tally()}
    for f in frames:
        boxes, scores = detect(f.pixels)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(f.ignore) and len(boxes):
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            ig = f.ignore
            inside = (
                (cx[:, None] >= ig[None, :, 0])
                & (cx[:, None] <= ig[None, :, 2])
                & (cy[:, None] >= ig[None, :, 1])
                & (cy[:, None] <= ig[None, :, 3])
            ).any(1)
            # a detection that also matches a real cell is kept
            from hemaedge.edge.segment.matching import iou_matrix

            real = iou_matrix(boxes, f.boxes).max(1) >= iou if len(f.boxes) else np.zeros(len(boxes), bool)
            k = ~inside | real
            boxes, scores = boxes[k], np.asarray(scores)[k]
        c = match(boxes, scores, f.boxes, iou)
        tallies.setdefault(f.source, Tally()).add(*c)
        tallies["all"].add(*c)
    return {k: v.as_dict() for k, v in tallies.items()}


def tiles_from(root, sources: Sequence[str], bccd_split: str = "") -> list[Tile]:
    """Tiles from the shared data: TXL-PBC frames of ``sources`` and, with ``bccd_split``, BCCD frames of that split."""
    from pathlib import Path

    from hemaedge.evaluation.groundtruth import bccd_items, read_voc, txl_items
    from hemaedge.export.detector.data import source_of

    root = Path(root)
    out = []
    rbc = {str(it.path): it.boxes for it in txl_items(root / "txl-pbc", "all", classes=(1,))}
    for it in txl_items(root / "txl-pbc", "all"):
        src = source_of(it.source)
        if src in sources:
            out.append(Tile(str(it.path), it.boxes, rbc.get(str(it.path), np.zeros((0, 4))), src))
    if bccd_split:
        for it in bccd_items(root / "bccd", bccd_split):
            xml = Path(it.path).parents[1] / "Annotations" / (Path(it.path).stem + ".xml")
            out.append(Tile(str(it.path), it.boxes, read_voc(xml, ("RBC",)), "BCCD-VOC"))
    return out
