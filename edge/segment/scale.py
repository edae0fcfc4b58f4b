"""The session's magnification, measured on its red cells (cv2 + numpy only).

Red cells are in every field of a blood smear and are about 7.5 um across on every
microscope, so they are a ruler: their size in pixels gives the pixels per micron of this
microscope, camera and zoom. The station measures it once per session (the median over the
first frames; a user may state it instead) and brings every frame to the working scale the
detector was trained at before segmentation and cropping.

How one frame is measured (``measure_rbc``):

1. White balance, then the green channel (red cells and nuclei absorb green; the background
   does not) is split by a three-class Otsu (background / red cells / nuclei); everything darker
   than the upper threshold is a cell. Two-class Otsu fails where a dark white cell dominates
   pale red cells (PBC).
2. A small closing and a hole fill make the ring of a red cell with central pallor a disc.
3. The distance transform of that mask peaks at the centre of each cell with the cell's radius,
   also inside clumps of touching red cells (each cell keeps its own peak). Peaks are suppressed
   greedily within their own radius; peaks on stained nuclei, near the frame border or outside
   the field stop (the dark surround of a phone picture through an eyepiece) are not used.
4. The diameter is the median of the larger peaks (above 0.45 of the 90th percentile: the
   specks of ring-shaped cells and platelets fall below).

A frame is measured on a copy at most ``first_px`` on its long side; when red cells come out
smaller than ``min_px`` there (low magnification), again at up to full resolution.

The blob diameter is ``BLOB_TO_BOX`` (0.84) of a labelled red-cell box: the median ratio over
the labelled frames of BCCD (train + val, VOC labels) and TXL-PBC (train + val, all four
sources) at zooms 1x and 0.25x, where 93-99% of frames fell within 20% of it (per source
0.80-0.89; ``runs/`` research script ``scale5.py``). A labelled red-cell box is taken to be
``RBC_UM`` (7.5 um) across.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

RBC_UM = 7.5  # a red cell's diameter in micrometres
BLOB_TO_BOX = 0.84  # measured blob diameter / labelled red-cell box side (see the module docstring)
MIN_PEAKS = 3  # fewer red-cell peaks than this: the frame says nothing about scale
SESSION_FRAMES = 9  # frames whose median fixes a session's scale
SURROUND_MIN = 0.08  # share of the frame a field stop's dark surround covers at least
STOP_ROUNDNESS = 0.03  # a field stop's edge lies on a circle within this share of its radius (median)
STRAIGHT_PX = 1.5  # an edge piece this close to a line (RMS pixels) is padding's straight edge, not a field stop's


@dataclass(frozen=True)
class Scale:
    """A magnification: pixels per micron, and where it came from.

    Attributes:
        px_per_um: Pixels per micrometre in the frame as captured.
        source: ``"measured"`` (red cells), ``"user"`` (stated), ``"frame"`` (a guess from the frame
            size: no red cells measured) or ``"fixed"`` (a detector without scale awareness).
        rbc_px: The red-cell diameter in frame pixels that it implies (``RBC_UM * px_per_um``).
        frames: Frames that went into a measured scale.
        cells: Red-cell peaks counted over those frames.
        spread: Relative spread of the per-frame measurements (IQR / median; 0 for one frame).
    """

    px_per_um: float
    source: str = "measured"
    rbc_px: float = 0.0
    frames: int = 1
    cells: int = 0
    spread: float = 0.0

    def __post_init__(self) -> None:
        if not self.px_per_um > 0:
            raise ValueError(f"px_per_um must be positive, not {self.px_per_um}")
        if not self.rbc_px:
            object.__setattr__(self, "rbc_px", RBC_UM * self.px_per_um)

    def factor_to(self, px_per_um: float) -> float:
        """Resize factor that brings a frame at this scale to ``px_per_um``."""
        return px_per_um / self.px_per_um

    def as_dict(self) -> dict:
        """Plain numbers for JSON, the session store and reports."""
        d = asdict(self)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}

    def describe(self) -> str:
        """One line for people: ``4.21 px/um (red cells 31.6 px, measured on 9 frames)``."""
        how = {
            "measured": f"measured on {self.frames} frame{'s' if self.frames != 1 else ''}",
            "user": "stated",
            "frame": "guessed from the frame size",
            "measured+wbc": "red cells corrected by the white cells' size",
            "fixed": "fixed",
        }.get(self.source, self.source)
        return f"{self.px_per_um:.2f} px/um (red cells {self.rbc_px:.1f} px, {how})"


def frame_guess(shape: tuple[int, ...]) -> Scale:
    """A scale from the frame size alone: the labelled sets show red cells about 0.23 of the short side.

    (Per source, median red-cell box over short side: Raabin 0.25, PBC 0.23, BCDD 0.25, BCCD 0.22.) Used
    only when a frame shows no red cells to measure.
    """
    rbc = 0.23 * float(min(shape[:2]))
    return Scale(rbc / RBC_UM, "frame", rbc, 1, 0)


def _fill_holes(mask: np.ndarray, outside: np.ndarray | None = None) -> np.ndarray:
    """``mask`` with its holes filled: background not connected to the frame border (nor to ``outside``)."""
    import cv2

    inv = (1 - mask).astype(np.uint8)
    if outside is not None:
        inv |= outside.astype(np.uint8)
    n, lab, _, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    if outside is not None:
        border = np.union1d(border, np.unique(lab[outside > 0]))
    hole = np.ones(n, bool)
    hole[border] = False
    hole[0] = False
    return (mask | hole[lab]).astype(np.uint8)


def field_mask(bgr: np.ndarray, dark: float = 0.35) -> np.ndarray | None:
    """The lit field (1) where a dark surround is present (eyepiece field stop, vignetted corners), else None.

    A pixel is outside the field when it is darker than ``dark`` times the bright background level and is
    connected to such pixels at the frame border; the surround must cover ``SURROUND_MIN`` of the frame (a camera
    frame's dark corner or a dark cell at the border covers 2-5%; an eyepiece's surround 15-50%).
    """
    import cv2

    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    bright = float(np.percentile(grey, 90))
    out = (grey < dark * bright).astype(np.uint8)
    if not out[0].any() and not out[-1].any() and not out[:, 0].any() and not out[:, -1].any():
        return None
    n, lab, _, _ = cv2.connectedComponentsWithStats(out, connectivity=8)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    border = border[border > 0]
    if not len(border):
        return None
    surround = np.isin(lab, border)
    if surround.mean() < SURROUND_MIN:
        return None
    return (~surround).astype(np.uint8)


def round_stop(field: np.ndarray, tolerance: float = STOP_ROUNDNESS) -> bool:
    """Whether the lit field's edge is curved like an eyepiece's field stop, not straight like padding.

    An image rotated or letter-boxed onto black (augmented single-cell sets, a scanned export) has a dark
    surround too, bounded by straight lines. The field's edge pixels away from the frame border are split into
    their connected pieces: padding's pieces each lie on a line (within ``STRAIGHT_PX``), a field stop's do not;
    and all of a field stop's edge lies on one circle, within ``tolerance`` of its radius (median).
    """
    import cv2

    inner = cv2.erode(field.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    edge = ((field > 0) & (inner == 0)).astype(np.uint8)
    edge[:3], edge[-3:], edge[:, :3], edge[:, -3:] = 0, 0, 0, 0
    n, lab = cv2.connectedComponents(edge, connectivity=8)
    curved = False
    for k in range(1, n):
        pts = np.argwhere(lab == k).astype(np.float64)
        if len(pts) < 10:
            continue
        spread = np.linalg.eigvalsh(np.cov((pts - pts.mean(0)).T))
        curved |= float(np.sqrt(max(spread[0], 0.0))) > STRAIGHT_PX
    ys, xs = np.nonzero(edge)
    if not curved or len(xs) < 20:
        return False
    x, y = xs.astype(np.float64), ys.astype(np.float64)
    a = np.stack([x, y, np.ones_like(x)], 1)
    (d, e, f), *_ = np.linalg.lstsq(a, -(x * x + y * y), rcond=None)
    cx, cy = -d / 2, -e / 2
    r2 = cx * cx + cy * cy - f
    if r2 <= 0:
        return False
    r = float(np.sqrt(r2))
    return float(np.median(np.abs(np.hypot(x - cx, y - cy) - r))) <= tolerance * r


def flatten(bgr: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Even out the vignetting of a picture through an eyepiece: divide by the bright envelope of the field.

    The envelope is the local maximum over windows of a tenth of the short side (at the low magnification
    where a field stop is in view, every window holds some slide glass), smoothed; used only when a field
    stop was found (at high magnification a window may lie inside one cell).
    """
    import cv2

    h, w = bgr.shape[:2]
    k = max(8, min(h, w) // 10)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    grey = np.where(field > 0, grey, 0).astype(np.uint8)
    env = cv2.dilate(grey, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).astype(np.float32)
    env = cv2.GaussianBlur(env, (0, 0), k / 2)
    gain = np.where(field > 0, float(np.percentile(env[field > 0], 90)) / np.maximum(env, 8.0), 1.0)
    out = bgr.astype(np.float32) * gain[..., None].astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def rbc_peaks(bgr: np.ndarray) -> np.ndarray:
    """Diameters (pixels of ``bgr``) of the red-cell-sized peaks of one frame (steps 1-3 of the module docstring)."""
    import cv2
    from hemaedge.edge.segment.stain import otsu3, white_balance

    field = field_mask(bgr)
    if field is not None:  # stay clear of the field stop's soft, darkened rim
        field = cv2.erode(field, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    img = white_balance(bgr if field is None else flatten(bgr, field))
    g = cv2.GaussianBlur(img[:, :, 1], (3, 3), 0)
    sel = g if field is None else g[field > 0]
    if sel.size < 64:
        return np.zeros(0)
    _, t2 = otsu3(np.bincount(sel.ravel(), minlength=256))
    mask = (g <= t2).astype(np.uint8)
    if field is not None:
        mask &= field
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, disc)
    mask = _fill_holes(mask, None if field is None else 1 - field)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, disc)
    if field is not None:
        mask &= field
    blue = 255 - cv2.cvtColor(img, cv2.COLOR_BGR2LAB)[:, :, 2].astype(np.int16)
    fg = blue[mask > 0]
    if fg.size < 16:
        return np.zeros(0)
    nucleus = blue > np.median(fg) + 25
    pad = 8
    dt = cv2.distanceTransform(cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_REPLICATE), cv2.DIST_L2, 5)
    dt = dt[pad:-pad, pad:-pad]
    edge = None
    if field is not None:  # distance to the field stop: a cell cut by it must not count
        edge = cv2.distanceTransform(np.pad(field, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    top = cv2.dilate(dt, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    ys, xs = np.nonzero((dt >= top) & (dt >= 2.0) & ~nucleus)
    r = dt[ys, xs]
    order = np.argsort(-r, kind="stable")
    h, w = mask.shape
    kept: list[tuple[float, float, float]] = []
    for y, x, rad in zip(ys[order].tolist(), xs[order].tolist(), r[order].tolist()):
        if min(x, y, w - 1 - x, h - 1 - y) < 0.6 * rad:
            continue  # cut by the frame border
        if edge is not None and edge[y, x] < 1.2 * rad:
            continue  # cut by the field stop
        if any((y - ky) ** 2 + (x - kx) ** 2 < 0.36 * (rad + kr) ** 2 for ky, kx, kr in kept):
            continue  # the same cell (a ridge of its distance transform)
        kept.append((y, x, rad))
        if len(kept) >= 400:
            break
    return np.asarray([2.0 * k[2] for k in kept], np.float64)


def robust_diameter(diameters: np.ndarray) -> float | None:
    """The red-cell diameter from a frame's peaks (step 4), None with fewer than ``MIN_PEAKS``."""
    d = np.asarray(diameters, np.float64)
    if len(d) < MIN_PEAKS:
        return None
    top = np.percentile(d, 90) if len(d) >= 5 else float(d.max())
    d = d[d >= 0.45 * top]
    return float(np.median(d)) if len(d) >= MIN_PEAKS else None


def measure_rbc(bgr: np.ndarray, first_px: int = 320, min_px: float = 16.0, aim_px: float = 24.0) -> tuple[float, int]:
    """Red-cell blob diameter in pixels of ``bgr`` and the number of peaks it rests on (``(nan, 0)``: none)."""
    import cv2

    h, w = bgr.shape[:2]
    s = min(1.0, first_px / max(h, w))
    img = cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else bgr
    peaks = rbc_peaks(img)
    d = robust_diameter(peaks)
    if (d is None or d < min_px) and s < 1:
        s2 = min(1.0, s * (aim_px / d if d else 4.0))
        if s2 > s:
            img = cv2.resize(bgr, None, fx=s2, fy=s2, interpolation=cv2.INTER_AREA) if s2 < 1 else bgr
            peaks2 = rbc_peaks(img)
            d2 = robust_diameter(peaks2)
            if d2 is not None:
                return d2 / s2, len(peaks2)
    return (d / s, len(peaks)) if d is not None else (float("nan"), 0)


def estimate_scale(bgr: np.ndarray) -> Scale | None:
    """This frame's scale from its red cells, or None when it shows too few to measure."""
    d, n = measure_rbc(bgr)
    if not np.isfinite(d):
        return None
    rbc = d / BLOB_TO_BOX
    return Scale(rbc / RBC_UM, "measured", rbc, 1, n)


def combine(scales: Iterable[Scale]) -> Scale | None:
    """One scale from several frames' measurements: the median, with its spread."""
    ok = [s for s in scales if s is not None and s.source == "measured"]
    if not ok:
        return None
    v = np.asarray([s.px_per_um for s in ok])
    med = float(np.median(v))
    q1, q3 = np.percentile(v, [25, 75])
    return Scale(med, "measured", 0.0, len(ok), int(sum(s.cells for s in ok)), float((q3 - q1) / med))


class SessionScale:
    """A session's scale: stated by the user, or the median of the first ``frames`` frames' measurements.

    ``observe(frame)`` measures frames until the scale is fixed (cheap afterwards: it returns the fixed
    scale); before then it returns the running median, or the frame-size guess while nothing was measured.
    """

    def __init__(self, stated: float | None = None, frames: int = SESSION_FRAMES):
        if stated is not None and not stated > 0:
            raise ValueError(f"a stated scale must be positive px/um, not {stated}")
        self.frames = max(1, int(frames))
        self._stated = Scale(float(stated), "user") if stated else None
        self._seen: list[Scale] = []
        self._tried = 0
        self._fixed: Scale | None = self._stated

    @property
    def fixed(self) -> bool:
        """Whether the scale no longer changes."""
        return self._fixed is not None

    @property
    def current(self) -> Scale | None:
        """The scale as known now (None before any frame)."""
        return self._fixed or combine(self._seen)

    def correct(self, scale: Scale) -> None:
        """Fix the session's scale to ``scale`` (a measurement corrected by other evidence; never a stated one)."""
        if self._stated is not None:
            raise ValueError("a stated scale is not corrected")
        self._fixed = scale

    def observe(self, bgr: np.ndarray) -> Scale:
        """The scale to use for this frame (measuring it while the session's scale is not fixed yet)."""
        if self._fixed is not None:
            return self._fixed
        s = estimate_scale(bgr)
        self._tried += 1
        if s is not None:
            self._seen.append(s)
        if len(self._seen) >= self.frames or self._tried >= 4 * self.frames:
            self._fixed = combine(self._seen) or frame_guess(bgr.shape)
            return self._fixed
        return combine(self._seen) or frame_guess(bgr.shape)


__all__ = [
    "BLOB_TO_BOX",
    "RBC_UM",
    "Scale",
    "SessionScale",
    "combine",
    "estimate_scale",
    "field_mask",
    "flatten",
    "frame_guess",
    "measure_rbc",
    "rbc_peaks",
    "robust_diameter",
    "round_stop",
]
