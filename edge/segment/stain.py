"""Stain-aware thresholding segmenter for white cells (cv2 + numpy, a few ms per frame).

On a copy of the frame shrunk to ``work_px`` pixels on its short side:

1. **White balance.** Each channel is scaled so the background (the brightest
   fifth of the frame) is neutral grey: lamp colour, camera white balance and
   the smear's tint go away (BCCD is grey, BCDD mint, PBC cream, Raabin pink).
2. **Nucleus stain.** Romanowsky-type stains (Wright, Giemsa, May-Gruenwald-
   Giemsa, Leishman) colour white-cell nuclei blue-violet, red cells pink to
   grey-violet. The blueness ``-b*`` of CIE L*a*b* separates nuclei from the
   rest on every microscope we measured (BCCD, the four TXL-PBC sources, PBC)
   better than saturation or any RGB channel.
3. **Per-image adaptive threshold.** A three-class Otsu on the blueness
   histogram (background / red cells and cytoplasm / nuclei) gives this frame's
   nucleus threshold, so exposure and stain strength do not matter. A frame
   whose upper class is not clearly bluer than its median holds no nucleus.
4. **Morphology and filters.** Opening removes specks; a second opening, with a
   disc scaled to each blob's own inscribed radius (and at least a share of the
   thickest nucleus in view), removes the thin dark red-cell rims that cross the
   threshold in some smears (Raabin) and web themselves onto a nucleus. A blob must be clearly
   bluer than the threshold on average (``min_excess``: the dark rims of
   blue-grey red cells only just cross it), and a cell's nucleus must be big
   enough against the frame and against the largest nucleus in view.
5. **Lobes to cells.** A distance transform of the background labelled by the
   nearest blob (the watershed of the background by distance) gives the gap
   between every pair of blobs; blobs closer than a fraction of their size are
   lobes of one nucleus (union-find). Two compact blobs of similar size may sit
   further apart (the round lobes of an eosinophil), but a round, compact nucleus
   never joins a comparable thin, lobed one (a lymphocyte touching a neutrophil).
6. **Whole cell.** Each nucleus grows into its cytoplasm: a pixel near the
   nucleus joins the cell when its colour is nearer this cell's cytoplasm (a
   thin ring around the nucleus) than the background or the red cells, and it is
   nearer this nucleus than any other (a distance-transform watershed between
   nuclei splits touching cells). The cell box averages that region's box,
   clamped to plausible sizes, with the nucleus box grown by ``expand``; the
   region alone is too easily fooled by red cells of cytoplasm colour.
7. **Platelets** (only with ``platelets=True``; off by default, and the white
   cells are the same either way). Small blobs above a stain level a little
   below the nucleus threshold, strongly stained at their core, compact (not a
   red-cell rim) and sized to the frame scale (the working image and, with white
   cells in view, their nuclei), that neither lie in nor touch a white cell's box
   nor the frame border (a white cell cut by the border shows a platelet-sized piece
   of nucleus), are ``Detection(box, score, "platelet")``; the box is the blob's
   grown by ``plt_grow``. Tuned on BCCD train and TXL-PBC half "a"
   (``tools/eval_platelets.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Tuple

import numpy as np
from hemaedge.edge.records import CellKind, Detection, Frame
from hemaedge.edge.segment.base import as_frame

Box = Tuple[float, float, float, float]


@dataclass(frozen=True)
class SegmenterConfig:
    """Tunables of ``StainSegmenter`` (defaults tuned on the BCCD train split and half "a" of TXL-PBC).

    Attributes:
        work_px: Short side of the working copy in pixels.
        white_balance: Neutralise the background colour first.
        bg_quantile: Brightness quantile above which pixels count as background for white balance.
        min_contrast: The nucleus threshold must exceed the median blueness by this much (8-bit units).
        open_px: Opening kernel (working pixels) that removes specks and thin red-cell rims.
        open_rel, open_floor: A second opening with a disc of ``open_rel`` times the blob's inscribed radius,
            taken at least ``open_floor`` times the thickest blob's (thin red-cell rims go; 0 disables).
        min_excess: A blob's mean blueness must exceed the threshold by this much.
        min_area: Smallest nucleus (all lobes) as a fraction of the working image area.
        rel_area: Smallest nucleus as a fraction of the largest one in the frame.
        max_area: Largest nucleus as a fraction of the working image area.
        join_gap: Blobs whose gap is below ``join_gap * sqrt(area of the larger)`` are lobes of one cell.
        join_min: A blob joins a bigger one only if it has at least this fraction of its area.
        join_px: ... and gaps up to this many working pixels always join (small cells, low magnification).
        join_round_gap, join_round_thick, join_round_ratio: Two compact blobs (inscribed radius at least
            ``join_round_thick * sqrt(area)``) of similar size (``join_round_ratio``) join up to
            ``join_round_gap * sqrt(area of the larger)`` apart: round lobes of eosinophils sit far apart.
            Discs (above ``join_round_max``) are whole round nuclei, not lobes.
        split_ratio, split_round, split_lobed: A compact blob (inscribed radius at least ``split_round *
            sqrt(area)``) never joins a thin, lobed one (at most ``split_lobed``) of at least ``split_ratio``
            of its size: a lymphocyte touching a neutrophil.
        expand: The nucleus box grown by this factor approximates the cell box.
        expand_round, round_solidity: ... by ``expand_round`` when the nucleus is one compact blob
            (solidity at least ``round_solidity``): a round nucleus fills most of its cell. 0 disables.
        extent: ``"cyto"`` (grow into the cytoplasm, fused with ``expand``) or ``"expand"`` (nucleus box only).
        reach: A cell reaches at most ``reach`` times its nucleus extent from the nucleus centre.
        ring_px: Width of the ring around the nucleus that samples the cytoplasm colour.
        halo_px: The nucleus grown by this much always belongs to the cell (its blurred rim).
        cyto_min_de: Cytoplasm closer than this (Delta E) to the background is not used.
        cyto_open_px: Opening of the cytoplasm region (cuts bridges into touching red cells).
        region_min, region_max: The region box is clamped between these multiples of the nucleus box.
        region_weight: Weight of the (clamped) region box against the expanded nucleus box.
        trust_fill, trust_max, trust_weight: A region filling at least ``trust_fill`` of its box's
            ellipse that stayed within reach is trusted: clamped to ``trust_max`` and weighted ``trust_weight``.
        edge_keep: Keep cells cut by the frame edge (their box is clipped).
        platelets: Also return platelets (``kind == "platelet"``); off, the white cells are exactly as without it.
        plt_level: Platelet stain threshold between the frame's two Otsu thresholds: ``t1 + plt_level * (t2 - t1)``
            (1.0 = the nucleus threshold; platelets stain paler than nuclei in some smears).
        plt_mean: A platelet's mean stain, as a share of the way from ``t1`` to ``t2``, is at least this.
        plt_peak: A platelet's most stained pixel must exceed the nucleus threshold ``t2`` by this much.
        plt_thick: Smallest inscribed radius over ``sqrt(area)`` (a disc is 0.56; thin red-cell rims are below 0.35).
        plt_open_px: Opening of the platelet mask (working pixels).
        plt_min_area, plt_max_area: Blob area limits as fractions of the working image area (the frame scale).
        plt_rel_min, plt_rel_max: With white cells in view, ``sqrt(blob area / median nucleus area)`` must lie
            between these (a platelet is a fifth to a half of a nucleus across; clumps are bigger).
        plt_fill: Smallest share of its box a blob fills (thin red-cell rims and arcs fill little).
        plt_margin: A blob meeting a white cell's box grown by this fraction of its size belongs to that cell.
        plt_grow: The platelet box is the blob box grown by this factor (the pale rim of the platelet).
        plt_edge: Keep blobs cut by the frame edge (off: a white cell cut by the border shows a platelet-sized
            piece of nucleus; a platelet cut there is found in a later frame of a stream).
    """

    work_px: int = 160
    white_balance: bool = True
    bg_quantile: float = 0.8
    min_contrast: float = 8.0
    open_px: int = 3
    open_rel: float = 0.25
    open_floor: float = 0.7
    min_excess: float = 7.0
    min_area: float = 0.0012
    rel_area: float = 0.2
    max_area: float = 0.5
    join_gap: float = 0.4
    join_min: float = 0.1
    join_px: float = 3.0
    join_round_gap: float = 1.0
    join_round_thick: float = 0.35
    join_round_ratio: float = 0.3
    join_round_max: float = 0.48
    split_ratio: float = 0.6
    split_round: float = 0.43
    split_lobed: float = 0.3
    expand: float = 1.3
    expand_round: float = 1.18
    round_solidity: float = 0.92
    extent: str = "cyto"
    reach: float = 1.0
    ring_px: int = 3
    halo_px: int = 2
    cyto_min_de: float = 6.0
    cyto_open_px: int = 3
    region_min: float = 1.05
    region_max: float = 1.7
    region_weight: float = 0.5
    trust_fill: float = 0.75
    trust_max: float = 1.9
    trust_weight: float = 0.75
    edge_keep: bool = True
    platelets: bool = False
    plt_level: float = 0.6
    plt_mean: float = 0.8
    plt_peak: float = 4.0
    plt_thick: float = 0.4
    plt_open_px: int = 3
    plt_min_area: float = 0.0006
    plt_max_area: float = 0.012
    plt_rel_min: float = 0.1
    plt_rel_max: float = 0.6
    plt_fill: float = 0.5
    plt_margin: float = 0.0
    plt_grow: float = 1.6
    plt_edge: bool = False


def otsu3(hist: np.ndarray) -> tuple[int, int]:
    """Two thresholds ``t1 < t2`` splitting a histogram into three classes (multi-level Otsu).

    Class 0 is ``<= t1``, class 1 is ``(t1, t2]``, class 2 is ``> t2``. Only the
    occupied range of the histogram is searched (fast on 8-bit images).
    """
    hist = np.asarray(hist, np.float64)
    nz = np.flatnonzero(hist)
    if len(nz) < 3:
        lo = int(nz[0]) if len(nz) else 0
        return lo, lo + 1
    lo, hi = int(nz[0]), int(nz[-1])
    p = hist[lo : hi + 1] / hist.sum()
    i = np.arange(lo, hi + 1, dtype=np.float64)
    w = np.cumsum(p)
    mu = np.cumsum(p * i)
    mt = mu[-1]
    # class 0 = [lo, a], class 1 = (a, b], class 2 = (b, hi]
    wa, ma = w[:, None], mu[:, None]
    wb, mb = w[None, :], mu[None, :]
    w1, w2 = wb - wa, 1.0 - wb
    m1, m2 = mb - ma, mt - mb
    with np.errstate(divide="ignore", invalid="ignore"):
        var = ma * ma / wa + m1 * m1 / w1 + m2 * m2 / w2
    n = len(p)
    valid = (wa > 1e-12) & (w1 > 1e-12) & (w2 > 1e-12) & (np.arange(n)[:, None] < np.arange(n)[None, :])
    var = np.where(valid, var, -1.0)
    a, b = np.unravel_index(int(np.argmax(var)), var.shape)
    return lo + int(a), lo + int(b)


def hist_quantile(hist: np.ndarray, q: float) -> int:
    """The ``q`` quantile (0..1) of 8-bit data given its 256-bin histogram."""
    c = np.cumsum(hist)
    return int(np.searchsorted(c, q * c[-1]))


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

    lut = white_balance_lut(img, quantile, target)
    return img if lut is None else cv2.LUT(img, lut)


def white_balance_lut(img: np.ndarray, quantile: float = 0.8, target: float = 235.0) -> np.ndarray | None:
    """``white_balance``'s per-channel look-up table (``256 x 1 x 3`` uint8), or None when it leaves ``img`` as it is.

    For a caller that maps the balanced pixels further (the detector's input): compose the tables, then look up once.
    """
    import cv2

    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    hist = np.bincount(grey.ravel(), minlength=256)
    thr = hist_quantile(hist, quantile)
    sel = (grey >= thr).astype(np.uint8)
    bg = np.asarray(cv2.mean(img, mask=sel)[:3])
    if not sel.any() or bg.min() <= 0:
        return None
    gains = target / np.maximum(bg, 1.0)
    lut = np.clip(np.arange(256, dtype=np.float32)[:, None] * gains[None, :], 0, 255).astype(np.uint8)
    return lut.reshape(256, 1, 3)


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
    """What the segmenter saw in one frame (``detect_verbose``; for debugging and tests)."""

    scale: float
    t1: int
    t2: int
    median: float
    nucleus_mask: np.ndarray | None = None
    cell_mask: np.ndarray | None = None
    groups: list[list[int]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    region_quality: list[dict] = field(default_factory=list)
    platelet_rejected: list[tuple[Box, str]] = field(default_factory=list)


class StainSegmenter:
    """White cells by stain-aware thresholding of nuclei; see the module docstring.

    The segmenter works at a fixed share of the frame (``work_px``), not at a scale in microns: it suits
    microscope cameras framed like its tuning sets. It still measures the session's scale on the red cells of
    its first frames (``scale``: that measurement, or the stated pixels per micron) so that every session and
    report records its magnification, whichever segmenter ran.

    Args:
        config: Tunables (``SegmenterConfig``); keyword overrides are applied on top.
        scale: Pixels per micron stated by the user; None measures the session's first frames.
    """

    name = "stain"

    def __init__(self, config: SegmenterConfig | None = None, scale: float | None = None, **overrides: object) -> None:
        from hemaedge.edge.segment.scale import SessionScale

        cfg = config or SegmenterConfig()
        self.config = replace(cfg, **overrides) if overrides else cfg
        if self.config.extent not in ("cyto", "expand"):
            raise ValueError(f"extent must be 'cyto' or 'expand', not {self.config.extent!r}")
        self.session = SessionScale(None if scale in (None, "frame") else float(scale))

    @property
    def scale(self):  # noqa: ANN201 - Scale | None
        """The session's scale as known so far (``hemaedge.edge.segment.scale.Scale``; None before any frame)."""
        return self.session.current

    def with_platelets(self, on: bool = True) -> StainSegmenter:
        """This segmenter with platelet detection switched on (or off); the white cells do not change."""
        if self.config.platelets == on:
            return self
        other = StainSegmenter(self.config, platelets=on)
        other.session = self.session  # one session, one scale
        return other

    def detect(self, frame: Frame | np.ndarray) -> list[Detection]:
        """White cells in ``frame`` (a ``Frame`` or a BGR array), best score first; then platelets if asked."""
        if not self.session.fixed:
            fr = as_frame(frame)
            self.session.observe(fr.bgr())
        return self.detect_verbose(frame)[0]

    def detect_verbose(self, frame: Frame | np.ndarray) -> tuple[list[Detection], Analysis]:
        """``detect`` plus what the segmenter saw."""
        import cv2

        fr = as_frame(frame)
        cfg = self.config
        small, s = shrink(fr.pixels, cfg.work_px)
        if fr.colour_order != "BGR":
            small = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        if cfg.white_balance:
            small = white_balance(small, cfg.bg_quantile)
        lab = cv2.cvtColor(small, cv2.COLOR_BGR2LAB)
        h, w = small.shape[:2]
        area_img = float(h * w)
        speck = 0.0002 * area_img  # blobs smaller than this are never nuclei
        blue = cv2.GaussianBlur(255 - lab[:, :, 2], (3, 3), 0)
        hist = np.bincount(blue.ravel(), minlength=256)
        t1, t2 = otsu3(hist)
        med = float(hist_quantile(hist, 0.5))
        info = Analysis(scale=s, t1=t1, t2=t2, median=med)
        if t2 - med < cfg.min_contrast:
            return [], info
        mask = (blue > t2).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _kernel(cfg.open_px))
        if cfg.open_rel > 0:
            mask = _open_relative(mask, cfg.open_rel, cfg.open_px, cfg.open_floor, speck)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        info.nucleus_mask = mask
        work_boxes: list[Box] = []  # accepted white cells, working pixels
        nuc_areas: list[float] = []

        def finish(dets: list[Detection]) -> tuple[list[Detection], Analysis]:
            if cfg.platelets:
                dets = dets + self._platelets(blue, t1, t2, work_boxes, nuc_areas, s, cfg, info)
            return dets, info

        if n <= 1:
            return finish([])
        count = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
        f_mean = np.bincount(labels.ravel(), weights=blue.ravel(), minlength=n) / np.maximum(count, 1)
        excess = f_mean - t2
        ok = (count >= speck) & (excess >= cfg.min_excess)
        ok[0] = False
        idx = np.flatnonzero(ok)
        if not len(idx):
            return finish([])
        thick = _thickness(mask, labels, stats, idx)
        groups = self._group(labels, stats, idx, count, cfg, thick)
        biggest = max(float(count[g].sum()) for g in groups)
        accepted: list[tuple[list[int], float, Box]] = []
        for g in groups:
            a = float(count[g].sum())
            why = (
                "small"
                if a < cfg.min_area * area_img
                else "small vs others"
                if a < cfg.rel_area * biggest
                else "too big"
                if a > cfg.max_area * area_img
                else ""
            )
            x0 = float(stats[g, cv2.CC_STAT_LEFT].min())
            y0 = float(stats[g, cv2.CC_STAT_TOP].min())
            x1 = float((stats[g, cv2.CC_STAT_LEFT] + stats[g, cv2.CC_STAT_WIDTH]).max())
            y1 = float((stats[g, cv2.CC_STAT_TOP] + stats[g, cv2.CC_STAT_HEIGHT]).max())
            if not why and not cfg.edge_keep and (x0 <= 0 or y0 <= 0 or x1 >= w or y1 >= h):
                why = "edge"
            if why:
                info.rejected.append((g[0], why))
                continue
            accepted.append((g, a, (x0, y0, x1, y1)))
            nuc_areas.append(a)
        if not accepted:
            return finish([])
        regions: list[Box | None] = [None] * len(accepted)
        if cfg.extent == "cyto":
            regions = self._cyto_regions(lab, blue > t2, labels, stats, accepted, cfg, info)
        dets: list[Detection] = []
        for k, ((g, a, nbox), region) in enumerate(zip(accepted, regions)):
            expand = cfg.expand
            if cfg.expand_round and _solidity(labels, g, nbox) >= cfg.round_solidity:
                expand = cfg.expand_round  # a round, compact nucleus fills most of its cell (lymphocyte-like)
            box = _scaled(nbox, expand, w, h)
            if region is not None:
                box = self._fuse(box, region, info.region_quality[k], nbox, w, h, cfg)
            ex = float(np.average(excess[g], weights=count[g]))
            score = 1.0 / (1.0 + np.exp(-(ex - cfg.min_excess) / 3.0))
            score *= min(1.0, a / (3 * cfg.min_area * area_img)) ** 0.5
            full = (box[0] / s, box[1] / s, box[2] / s, box[3] / s)
            dets.append(Detection(full, round(float(score), 4), CellKind.WBC))
            info.groups.append(g)
            work_boxes.append(box)
        dets.sort(key=lambda d: -d.score)
        return finish(dets)

    @staticmethod
    def _platelets(
        blue: np.ndarray,
        t1: int,
        t2: int,
        wbc_boxes: list[Box],
        nuc_areas: list[float],
        s: float,
        cfg: SegmenterConfig,
        info: Analysis,
    ) -> list[Detection]:
        """Small, strongly stained blobs that belong to no white cell (step 7, only with ``platelets``).

        Platelets stain purple like nuclei but are much smaller: 2-3 um against a
        neutrophil's 12-15 um, so a fifth to a third of a nucleus across (clumps are
        bigger). Blobs above a stain level a little below the nucleus threshold are
        kept when their size fits the frame scale (the working image and, with white
        cells in view, the median nucleus), they fill their box (not a red-cell rim)
        and they neither lie in nor touch a white cell's box (its granules and lobes).
        The white cells are not changed.
        """
        import cv2

        h, w = blue.shape
        area_img = float(h * w)
        level = t1 + cfg.plt_level * (t2 - t1)
        mask = (blue > level).astype(np.uint8)
        if cfg.plt_open_px > 1:
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _kernel(cfg.plt_open_px))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if n <= 1:
            return []
        count = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
        lo, hi = cfg.plt_min_area * area_img, cfg.plt_max_area * area_img
        if nuc_areas:
            ref = float(np.median(nuc_areas))
            lo, hi = max(lo, cfg.plt_rel_min**2 * ref), min(hi, cfg.plt_rel_max**2 * ref)
        cand = np.flatnonzero((count >= lo) & (count <= hi))
        cand = cand[cand > 0]
        if not len(cand):
            return []
        flat = labels.ravel()
        peak = np.zeros(n, np.float64)
        np.maximum.at(peak, flat, blue.ravel().astype(np.float64))
        mean = np.bincount(flat, weights=blue.ravel(), minlength=n) / np.maximum(count, 1)
        mean = (mean - t1) / max(t2 - t1, 1)
        dt = cv2.distanceTransform(np.pad(mask, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
        thick = np.zeros(n, np.float64)
        np.maximum.at(thick, flat, dt.ravel().astype(np.float64))
        thick /= np.sqrt(np.maximum(count, 1))
        grown = [_scaled(b, 1 + 2 * cfg.plt_margin, w, h) for b in wbc_boxes]
        out: list[Detection] = []
        for c in cand.tolist():
            x0, y0, bw, bh = (float(v) for v in stats[c, :4])
            box = (x0, y0, x0 + bw, y0 + bh)
            cut = x0 <= 0 or y0 <= 0 or x0 + bw >= w or y0 + bh >= h
            why = (
                "edge"
                if cut and not cfg.plt_edge
                else "pale"
                if peak[c] - t2 < cfg.plt_peak or mean[c] < cfg.plt_mean
                else "thin"
                if count[c] < cfg.plt_fill * bw * bh or thick[c] < cfg.plt_thick
                else "in white cell"
                if any(_meets(box, g) for g in grown)
                else ""
            )
            if why:
                info.platelet_rejected.append((box, why))
                continue
            big = _scaled(box, cfg.plt_grow, w, h)  # may reach a little over a white cell's box; the blob does not
            score = 1.0 / (1.0 + np.exp(-(mean[c] - cfg.plt_mean) * 8.0))
            out.append(
                Detection((big[0] / s, big[1] / s, big[2] / s, big[3] / s), round(float(score), 4), CellKind.PLATELET)
            )
        out.sort(key=lambda d: -d.score)
        return out

    @staticmethod
    def _cyto_regions(
        lab: np.ndarray,
        nuc_all: np.ndarray,
        labels: np.ndarray,
        stats: np.ndarray,
        accepted: list,
        cfg: SegmenterConfig,
        info: Analysis,
    ) -> list[Box | None]:
        """Grow each nucleus into its cytoplasm by nearest-colour classification (see step 6)."""
        import cv2

        h, w = labels.shape
        labb = cv2.GaussianBlur(lab, (3, 3), 0)
        light = labb[:, :, 0]
        lhist = np.bincount(light.ravel(), minlength=256)
        bright = (light >= hist_quantile(lhist, 0.9)).astype(np.uint8)
        bg = np.asarray(cv2.mean(labb, mask=bright)[:3], np.float32)
        # red cells: what is neither background nor nucleus, away from the white cells (not their cytoplasm)
        rest = ((bright == 0) & ~nuc_all & (light < bg[0] - 10)).astype(np.uint8)
        for _g, _a, (x0, y0, x1, y1) in accepted:
            cv2.circle(
                rest,
                (int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2))),
                int(round(cfg.reach * max(x1 - x0, y1 - y0))),
                0,
                -1,
            )
        rbc = np.asarray(cv2.mean(labb, mask=rest)[:3], np.float32) if int(rest.sum()) > 20 else None
        # which nucleus is nearest each pixel: a distance-transform watershed between nuclei
        owner = None
        if len(accepted) > 1:
            lut = np.zeros(int(labels.max()) + 1, np.int32)
            for k, (g, _a, _b) in enumerate(accepted):
                lut[g] = k + 1
            owner = _nearest_owner(labels, stats, lut)[1]
        cell_mask = np.zeros((h, w), np.uint8)
        out: list[Box | None] = []
        qualities: list[dict] = [{} for _ in accepted]
        for k, (g, _a, (x0, y0, x1, y1)) in enumerate(accepted):
            r = cfg.reach * max(x1 - x0, y1 - y0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            bx0, by0 = max(0, int(cx - r) - 1), max(0, int(cy - r) - 1)
            bx1, by1 = min(w, int(cx + r) + 2), min(h, int(cy + r) + 2)
            nuc = np.isin(labels[by0:by1, bx0:bx1], g).astype(np.uint8)
            ring = cv2.dilate(nuc, _kernel(2 * cfg.ring_px + 1)) & (1 - cv2.dilate(nuc, _kernel(3)))
            ring = ring.astype(bool) & ~nuc_all[by0:by1, bx0:bx1]
            sub = labb[by0:by1, bx0:bx1].astype(np.float32)
            if ring.sum() < 8:
                out.append(None)
                continue
            cyto = np.median(sub[ring], axis=0)
            if float(np.linalg.norm(cyto - bg)) < cfg.cyto_min_de:
                out.append(None)  # cytoplasm looks like background: no usable boundary
                continue
            d_c = _dist2(sub, cyto)
            near = d_c < _dist2(sub, bg)
            if rbc is not None:
                near &= d_c < _dist2(sub, rbc)
            disc = np.zeros_like(nuc)
            cv2.circle(disc, (int(round(cx - bx0)), int(round(cy - by0))), int(round(r)), 1, -1)
            cell = (near & (disc > 0)).astype(np.uint8)
            if owner is not None:
                cell &= (owner[by0:by1, bx0:bx1] == k + 1).astype(np.uint8)
            if cfg.cyto_open_px > 1:
                cell = cv2.morphologyEx(cell, cv2.MORPH_OPEN, _kernel(cfg.cyto_open_px))
            cell |= cv2.dilate(nuc, _kernel(2 * cfg.halo_px + 1)) & disc  # the nucleus rim joins its cytoplasm
            n, lab_c, st, _ = cv2.connectedComponentsWithStats(cell)
            votes = np.bincount(lab_c[nuc > 0], minlength=n)
            votes[0] = 0
            j = int(np.argmax(votes))
            if j == 0:
                out.append(None)
                continue
            rx0, ry0 = float(st[j, 0] + bx0), float(st[j, 1] + by0)
            out.append((rx0, ry0, rx0 + float(st[j, 2]), ry0 + float(st[j, 3])))
            cell_mask[by0:by1, bx0:bx1][lab_c == j] = k + 1
            rw, rh = float(st[j, 2]), float(st[j, 3])
            qualities[k] = {
                "fill": float(st[j, 4]) / (np.pi / 4 * rw * rh),
                "touches_reach": bool(max(rw, rh) >= 2 * r - 2),
                "de_bg": float(np.linalg.norm(cyto - bg)),
                "de_rbc": float(np.linalg.norm(cyto - rbc)) if rbc is not None else -1.0,
            }
        info.cell_mask = cell_mask
        info.region_quality = qualities
        return out

    @staticmethod
    def _fuse(expanded: Box, region: Box, quality: dict, nbox: Box, w: int, h: int, cfg: SegmenterConfig) -> Box:
        """Combine the expanded nucleus box with the cytoplasm region's box.

        A round region that stayed inside its reach is a clean cell outline and
        leads (``trust_weight``); otherwise it was probably fooled by touching red
        cells of cytoplasm colour or a faint membrane, so it is clamped to
        plausible sizes and only averaged in (``region_weight``).
        """
        if quality.get("fill", 0.0) >= cfg.trust_fill and not quality.get("touches_reach", True):
            lo_f, hi_f, k = 1.0, cfg.trust_max, cfg.trust_weight
        else:
            lo_f, hi_f, k = cfg.region_min, cfg.region_max, cfg.region_weight
        lo = _scaled(nbox, lo_f, w, h)
        hi = _scaled(nbox, hi_f, w, h)
        clamped = (
            min(max(region[0], hi[0]), lo[0]),
            min(max(region[1], hi[1]), lo[1]),
            max(min(region[2], hi[2]), lo[2]),
            max(min(region[3], hi[3]), lo[3]),
        )
        return (
            (1 - k) * expanded[0] + k * clamped[0],
            (1 - k) * expanded[1] + k * clamped[1],
            (1 - k) * expanded[2] + k * clamped[2],
            (1 - k) * expanded[3] + k * clamped[3],
        )

    @staticmethod
    def _group(
        labels: np.ndarray,
        stats: np.ndarray,
        idx: np.ndarray,
        count: np.ndarray,
        cfg: SegmenterConfig,
        thick: np.ndarray | None = None,
    ) -> list[list[int]]:
        """Join blobs (component labels ``idx``) that are lobes of one nucleus.

        The background is split among the blobs by a distance-transform watershed
        (each pixel to its nearest blob); where two blobs' territories meet, the
        two distances add up to the gap between them. Blobs whose narrowest gap is
        below ``join_gap * sqrt(area of the larger)`` are joined (union-find),
        unless the smaller is under ``join_min`` of the larger (a platelet or a
        red-cell rim beside a nucleus).
        """
        if len(idx) == 1:
            return [[int(idx[0])]]
        keep = np.zeros(int(labels.max()) + 1, np.int32)
        keep[idx] = np.arange(1, len(idx) + 1, dtype=np.int32)
        dist, owner = _nearest_owner(labels, stats, keep)
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
        # compactness: inscribed radius over sqrt(area); a disc is 0.56, a bent neutrophil lobe about 0.3
        tA = thick[idx] / np.sqrt(np.maximum(areas, 1.0)) if thick is not None else None
        for (i, j), gap in sorted(gaps.items(), key=lambda kv: kv[1]):
            big, small = max(areas[i - 1], areas[j - 1]), min(areas[i - 1], areas[j - 1])
            if small < cfg.join_min * big:
                continue
            limit = max(cfg.join_gap * np.sqrt(big), cfg.join_px)
            if tA is not None:
                lo_t, hi_t = min(tA[i - 1], tA[j - 1]), max(tA[i - 1], tA[j - 1])
                if small >= cfg.join_round_ratio * big and cfg.join_round_thick <= lo_t <= hi_t <= cfg.join_round_max:
                    # two compact lobes of similar size (eosinophil, bilobed Raabin cells) sit further apart;
                    # separate whole nuclei that close are lobed (thin) ones
                    limit = max(limit, cfg.join_round_gap * np.sqrt(big))
                elif small >= cfg.split_ratio * big and hi_t >= cfg.split_round and lo_t <= cfg.split_lobed:
                    continue  # a round compact nucleus beside a comparable lobed one: two cells
            if gap <= limit:
                uf.union(i, j)
        out: dict[int, list[int]] = {}
        for k in range(1, len(idx) + 1):
            out.setdefault(uf.find(k), []).append(int(idx[k - 1]))
        return list(out.values())


def _nearest_owner(labels: np.ndarray, stats: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and number of, the nearest marked blob for every pixel.

    ``lut`` maps component labels to blob numbers (0 = not a marker). This is a
    watershed of the background by distance: each pixel goes to the blob it is
    nearest, and ``dist`` is how far that is.
    """
    import cv2

    seeds = lut[labels]
    dist, near = cv2.distanceTransformWithLabels(
        (seeds == 0).astype(np.uint8), cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_CCOMP
    )
    back = np.zeros(int(near.max()) + 1, np.int32)
    for comp in np.flatnonzero(lut):
        x, y, bw, bh = (int(v) for v in stats[comp, :4])
        win = labels[y : y + bh, x : x + bw] == comp
        j = int(np.argmax(win))  # first pixel of the blob inside its box
        back[near[y + j // bw, x + j % bw]] = lut[comp]
    return dist, back[near]


def _open_relative(mask: np.ndarray, rel: float, min_px: int, floor: float = 0.0, min_blob: float = 0.0) -> np.ndarray:
    """Open each blob with a disc of ``rel`` times its own inscribed radius.

    Thin dark red-cell rims that cross the nucleus threshold (Raabin) touch the
    nucleus and each other in a web; they are much thinner than the nucleus they
    touch, so they go, while a thin-lobed neutrophil on its own keeps its lobes.
    """
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    dt = cv2.distanceTransform(np.pad(mask, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    ks = np.zeros(n, np.int32)
    least = floor * float(dt.max())
    for comp in np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_blob):
        if comp == 0:
            continue  # background; specks below min_blob are dropped later anyway
        x, y, bw, bh = (int(v) for v in stats[comp, :4])
        core = float(dt[y : y + bh, x : x + bw][labels[y : y + bh, x : x + bw] == comp].max())
        ks[comp] = 2 * int(round(rel * max(core, least))) + 1
    sizes = sorted(set(int(k) for k in ks[1:] if k > min_px))
    if not sizes:
        return mask
    kmap = ks[labels]
    out = mask & (kmap <= min_px).astype(np.uint8)
    for k in sizes:
        out |= cv2.morphologyEx(mask, cv2.MORPH_OPEN, _kernel(k)) & (kmap == k).astype(np.uint8)
    return out


def _thickness(mask: np.ndarray, labels: np.ndarray, stats: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Inscribed radius (largest distance to the blob's outside) of each blob in ``idx``, indexed by label."""
    import cv2

    dt = cv2.distanceTransform(np.pad(mask, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    out = np.zeros(len(stats), np.float64)
    for comp in idx:
        x, y, bw, bh = (int(v) for v in stats[comp, :4])
        win = labels[y : y + bh, x : x + bw] == comp
        out[comp] = float(dt[y : y + bh, x : x + bw][win].max())
    return out


def _solidity(labels: np.ndarray, group: list[int], box: Box) -> float:
    """Area of the nucleus group over the area of its convex hull."""
    import cv2

    x0, y0, x1, y1 = (int(v) for v in box)
    m = np.isin(labels[y0:y1, x0:x1], group).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return 0.0
    hull = cv2.convexHull(np.concatenate(contours))
    return float(m.sum()) / max(float(cv2.contourArea(hull)), 1.0)


def _scaled(b: Box, f: float, w: int, h: int) -> Box:
    """Box ``b`` scaled by ``f`` about its centre, clipped to ``w`` x ``h``."""
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    hw, hh = (b[2] - b[0]) * f / 2, (b[3] - b[1]) * f / 2
    return max(0.0, cx - hw), max(0.0, cy - hh), min(float(w), cx + hw), min(float(h), cy + hh)


def _meets(a: Box, b: Box) -> bool:
    """Do boxes ``a`` and ``b`` overlap or touch?"""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _dist2(img: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Squared colour distance of every pixel of ``img`` (H x W x 3 float32) to ``colour``."""
    d = img - colour.reshape(1, 1, 3)
    return np.einsum("ijk,ijk->ij", d, d)
