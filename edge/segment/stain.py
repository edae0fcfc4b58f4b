"""Stain-aware thresholding segmenter for white cells (cv2 only, a few ms per frame).

How it works, on a copy of the frame shrunk to ``work_px`` pixels on its short side:

1. **Nucleus stain.** Romanowsky-type stains (Wright, Giemsa, May-Gruenwald-Giemsa,
   Leishman) colour white-cell nuclei blue-violet, red cells pink to grey-violet
   and the background pale. The "blueness" ``-b*`` of CIE L*a*b* separates nuclei
   from everything else on every microscope we measured (BCCD, the four
   TXL-PBC sources, PBC), better than saturation or any single RGB channel.
2. **Per-image adaptive threshold.** A three-class Otsu on the blueness histogram
   (background / red cells + cytoplasm / nuclei) gives the nucleus threshold of
   *this* image, so exposure, white balance and stain strength do not matter.
   A frame whose upper class is not clearly bluer than its median has no nucleus.
3. **Morphology and filters.** Opening removes specks; blobs must be darker than
   the frame (nuclei absorb strongly, blue-grey red cells and stain debris do not)
   and big enough relative to the largest nucleus in view and to the frame.
4. **Lobes to cells.** The lobes of a segmented nucleus are separate blobs. A
   distance transform with nearest-blob labels (a watershed of the background by
   distance) gives every pair of blobs the width of the gap between them; blobs
   closer than a fraction of their size join one cell (union-find).
5. **Whole cell.** The cell box is the nucleus group's box grown to take in the
   cytoplasm rim (see ``SegmenterConfig.expand``), clipped to the frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from edge.records import Detection, Frame
from edge.segment.base import as_frame


@dataclass(frozen=True)
class SegmenterConfig:
    """Tunables of ``StainSegmenter`` (defaults measured on BCCD / TXL-PBC training halves).

    Attributes:
        work_px: Short side of the working copy in pixels.
        min_contrast: The nucleus threshold must exceed the median blueness by this much (8-bit units).
        min_dark: A nucleus's mean L* must be this much below the frame's median L*.
        min_area: Smallest nucleus group as a fraction of the working image area.
        rel_area: Smallest nucleus group as a fraction of the largest one in the frame.
        max_area: Largest nucleus group as a fraction of the working image area.
        join_gap: Blobs whose gap is below ``join_gap * sqrt(area of the larger)`` are one cell.
        join_min: A blob joins a bigger one only if at least this fraction of its area.
        expand: The cell box side is the nucleus box side times this (cytoplasm rim).
        expand_min_px: ... and at least this many working pixels wider on each side.
        edge_keep: Keep cells cut by the frame edge (their box is clipped).
    """

    work_px: int = 160
    min_contrast: float = 8.0
    min_dark: float = 30.0
    min_area: float = 0.0012
    rel_area: float = 0.12
    max_area: float = 0.5
    join_gap: float = 0.8
    join_min: float = 0.04
    expand: float = 1.3
    expand_min_px: float = 1.0
    edge_keep: bool = True
    open_px: int = 3
    violet_k: float = 0.0
    dark_k: float = 0.0
    dark_ref: float = 200.0
    white_balance: bool = True
    bg_quantile: float = 0.8


def otsu3(hist: np.ndarray) -> tuple[int, int]:
    """Two thresholds ``t1 < t2`` splitting a 256-bin histogram into three classes (multi-level Otsu).

    Class 0 is ``<= t1``, class 1 is ``(t1, t2]``, class 2 is ``> t2``.
    """
    p = hist.astype(np.float64)
    total = p.sum()
    if total <= 0:
        return 0, 255
    p /= total
    i = np.arange(p.size, dtype=np.float64)
    w = np.cumsum(p)
    mu = np.cumsum(p * i)
    mt = mu[-1]
    # class 0 = [0, a], class 1 = (a, b], class 2 = (b, 255]
    wa, ma = w[:, None], mu[:, None]
    wb, mb = w[None, :], mu[None, :]
    w0, w1, w2 = wa, wb - wa, 1.0 - wb
    m0, m1, m2 = ma, mb - ma, mt - mb
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m0 * m0 / w0 + m1 * m1 / w1 + m2 * m2 / w2
    valid = (w0 > 1e-12) & (w1 > 1e-12) & (w2 > 1e-12)
    valid &= np.triu(np.ones_like(valid), 1).astype(bool)
    var = np.where(valid, var, -1.0)
    a, b = np.unravel_index(int(np.argmax(var)), var.shape)
    return int(a), int(b)


def shrink(pixels: np.ndarray, work_px: int) -> tuple[np.ndarray, float]:
    """A copy whose short side is about ``work_px`` and the factor ``small = full * factor``."""
    import cv2

    short = min(pixels.shape[:2])
    if short <= work_px:
        return pixels, 1.0
    k = short / work_px
    rk = round(k)
    fx = 1.0 / rk if abs(k - rk) < 0.08 * k else work_px / short
    small = cv2.resize(pixels, None, fx=fx, fy=fx, interpolation=cv2.INTER_AREA)
    return small, small.shape[0] / pixels.shape[0]


def _kernel(size: int) -> np.ndarray:
    import cv2

    if size <= 2:
        return np.ones((max(1, size), max(1, size)), np.uint8)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def white_balance(img: np.ndarray, quantile: float = 0.8, target: float = 235.0) -> np.ndarray:
    """Scale each channel so the background (the brightest pixels) becomes neutral grey ``target``.

    The background colour is the per-channel mean of pixels whose brightness is
    above the ``quantile`` of the frame; a microscope's lamp colour, camera
    white balance and the smear's background tint all go away.
    """
    import cv2

    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    thr = np.percentile(grey, quantile * 100.0)
    sel = grey >= thr
    if sel.sum() < 16:
        return img
    bg = img[sel].mean(axis=0)
    gains = target / np.maximum(bg, 1.0)
    lut = np.clip(np.arange(256, dtype=np.float32)[:, None] * gains[None, :], 0, 255).astype(np.uint8)
    out = np.empty_like(img)
    for c in range(3):
        out[:, :, c] = lut[:, c][img[:, :, c]]
    return out


class _Union:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Analysis:
    """What the segmenter saw in one frame (for debugging, ``detect_verbose``)."""

    scale: float
    t1: int
    t2: int
    median: float
    nucleus_mask: np.ndarray | None = None
    groups: list[list[int]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)


class StainSegmenter:
    """White cells by stain-aware thresholding of nuclei; see the module docstring.

    Args:
        config: Tunables (``SegmenterConfig``); keyword overrides are applied on top.
    """

    name = "stain"

    def __init__(self, config: SegmenterConfig | None = None, **overrides: float) -> None:
        cfg = config or SegmenterConfig()
        self.config = replace(cfg, **overrides) if overrides else cfg

    def detect(self, frame: Frame | np.ndarray) -> list[Detection]:
        """White cells in ``frame`` (a ``Frame`` or a BGR array), best score first."""
        return self.detect_verbose(frame)[0]

    def detect_verbose(self, frame: Frame | np.ndarray) -> tuple[list[Detection], Analysis]:
        """``detect`` plus what the segmenter saw."""
        import cv2

        fr = as_frame(frame)
        cfg = self.config
        small, s = shrink(fr.pixels, cfg.work_px)
        code = cv2.COLOR_BGR2LAB if fr.colour_order == "BGR" else cv2.COLOR_RGB2LAB
        if cfg.white_balance:
            small = white_balance(small, cfg.bg_quantile)
        lab = cv2.cvtColor(small, code)
        h, w = small.shape[:2]
        area_img = float(h * w)
        if cfg.violet_k or cfg.dark_k:
            v = (255.0 - lab[:, :, 2]) + cfg.violet_k * (lab[:, :, 1].astype(np.float32) - 128.0)
            if cfg.dark_k:
                v += cfg.dark_k * (cfg.dark_ref - lab[:, :, 0].astype(np.float32))
            blue = np.clip(v, 0, 255).astype(np.uint8)
        else:
            blue = 255 - lab[:, :, 2]
        blue = cv2.GaussianBlur(blue, (3, 3), 0)
        light = lab[:, :, 0]
        hist = np.bincount(blue.ravel(), minlength=256)
        t1, t2 = otsu3(hist)
        med = float(np.searchsorted(np.cumsum(hist), blue.size / 2))
        info = Analysis(scale=s, t1=t1, t2=t2, median=med)
        if t2 - med < cfg.min_contrast:
            return [], info
        mask = (blue > t2).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _kernel(cfg.open_px))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        info.nucleus_mask = mask
        if n <= 1:
            return [], info
        count = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
        flat = labels.ravel()
        l_mean = np.bincount(flat, weights=light.ravel().astype(np.float64), minlength=n) / np.maximum(count, 1)
        l_med = float(np.median(light))
        dark = l_med - l_mean
        speck = 0.0002 * area_img
        ok = (count >= speck) & (dark >= cfg.min_dark)
        ok[0] = False
        idx = np.flatnonzero(ok)
        if not len(idx):
            return [], info
        groups = self._group(labels, idx, count, cfg)
        areas = [float(count[g].sum()) for g in groups]
        biggest = max(areas)
        dets: list[Detection] = []
        for g, a in zip(groups, areas):
            if a < cfg.min_area * area_img:
                info.rejected.append((g[0], "small"))
                continue
            if a < cfg.rel_area * biggest:
                info.rejected.append((g[0], "small vs others"))
                continue
            if a > cfg.max_area * area_img:
                info.rejected.append((g[0], "too big"))
                continue
            x0 = float(stats[g, cv2.CC_STAT_LEFT].min())
            y0 = float(stats[g, cv2.CC_STAT_TOP].min())
            x1 = float((stats[g, cv2.CC_STAT_LEFT] + stats[g, cv2.CC_STAT_WIDTH]).max())
            y1 = float((stats[g, cv2.CC_STAT_TOP] + stats[g, cv2.CC_STAT_HEIGHT]).max())
            touches = x0 <= 0 or y0 <= 0 or x1 >= w or y1 >= h
            if touches and not cfg.edge_keep:
                info.rejected.append((g[0], "edge"))
                continue
            box = self._cell_box(x0, y0, x1, y1, w, h, cfg)
            d = float(np.average(dark[g], weights=count[g]))
            score = float(1.0 / (1.0 + np.exp(-(d - cfg.min_dark) / 10.0)))
            score *= float(min(1.0, a / (3 * cfg.min_area * area_img)) ** 0.5)
            full = tuple(float(v / s) for v in box)
            dets.append(Detection(full, round(score, 4), "wbc"))
            info.groups.append(g)
        dets.sort(key=lambda d: -d.score)
        return dets, info

    @staticmethod
    def _cell_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int,
                  cfg: SegmenterConfig) -> tuple[float, float, float, float]:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        hw = max((x1 - x0) * cfg.expand, (x1 - x0) + 2 * cfg.expand_min_px) / 2
        hh = max((y1 - y0) * cfg.expand, (y1 - y0) + 2 * cfg.expand_min_px) / 2
        return max(0.0, cx - hw), max(0.0, cy - hh), min(float(w), cx + hw), min(float(h), cy + hh)

    @staticmethod
    def _group(labels: np.ndarray, idx: np.ndarray, count: np.ndarray, cfg: SegmenterConfig) -> list[list[int]]:
        """Join blobs (labels ``idx``) that are lobes of one nucleus."""
        import cv2

        if len(idx) == 1:
            return [[int(idx[0])]]
        keep = np.zeros(int(labels.max()) + 1, np.int32)
        keep[idx] = np.arange(1, len(idx) + 1, dtype=np.int32)
        sel = keep[labels]  # 0 = background, k = k-th kept blob
        src = (sel == 0).astype(np.uint8)
        dist, near = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_CCOMP)
        # map distance-transform labels (one per zero-component) back to our blob numbers
        lut = np.zeros(int(near.max()) + 1, np.int32)
        ys, xs = np.nonzero(sel)
        lut[near[ys, xs]] = sel[ys, xs]
        owner = lut[near]
        gaps: dict[tuple[int, int], float] = {}
        for a, b, da, db in (
            (owner[:, :-1], owner[:, 1:], dist[:, :-1], dist[:, 1:]),
            (owner[:-1, :], owner[1:, :], dist[:-1, :], dist[1:, :]),
        ):
            diff = (a != b) & (a > 0) & (b > 0)
            if not diff.any():
                continue
            pa, pb, gap = a[diff], b[diff], (da[diff] + db[diff])
            lo, hi = np.minimum(pa, pb), np.maximum(pa, pb)
            key = lo.astype(np.int64) * 65536 + hi
            order = np.argsort(gap, kind="stable")
            key, gap = key[order], gap[order]
            uniq, first = np.unique(key, return_index=True)
            for k, gval in zip(uniq.tolist(), gap[first].tolist()):
                pair = (k // 65536, k % 65536)
                if gval < gaps.get(pair, np.inf):
                    gaps[pair] = gval
        uf = _Union(len(idx) + 1)
        areas = count[idx]
        for (i, j), gap in sorted(gaps.items(), key=lambda kv: kv[1]):
            ai, aj = areas[i - 1], areas[j - 1]
            big, small = max(ai, aj), min(ai, aj)
            if small < cfg.join_min * big:
                continue
            if gap <= cfg.join_gap * np.sqrt(big):
                uf.union(i, j)
        out: dict[int, list[int]] = {}
        for k in range(1, len(idx) + 1):
            out.setdefault(uf.find(k), []).append(int(idx[k - 1]))
        return list(out.values())
