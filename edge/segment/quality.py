"""Is this frame worth segmenting? Focus and exposure checks (cv2 only, about a millisecond).

* **Sharpness** is the variance of the Laplacian of the grey image (at most
  ``work_px`` on the short side, so the number does not depend on camera
  resolution), divided by the variance of a slightly smoothed copy: focus
  relative to the frame's own contrast, so a pale stain is not called blurred.
* **Exposure** is judged by what matters, the stained cells, not the background: a bright white
  background that clips (some microscopes' in-focus frames are like that) is fine as long as the cells keep
  their stain colour. A frame is *over-exposed* when the stain itself is washed out (most of the frame clipped
  and fewer than ``min_stained`` of its pixels still coloured), and *too dark* when even its bright part (the
  background, ``dark_percentile``) is dark.
* **What the station cannot use at all** is said plainly: an image smaller than ``min_side_px``, and a
  greyscale (single-channel) image: white cells are found and classified by their stain colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hemaedge.edge.records import Frame
from hemaedge.edge.segment.base import as_frame


@dataclass(frozen=True)
class Quality:
    """The verdict on one frame.

    Attributes:
        ok: Worth segmenting.
        reason: ``""`` when ok, else one short phrase for the warning line (``"out of focus"``, ``"too dark"``,
            ``"over-exposed (...)"``, ``"no contrast"``, ``"too small (...)"``, ``"greyscale image: ..."``).
        sharpness: Relative focus measure (higher is sharper; in-focus smears score 0.15-0.45).
        brightness: Median grey level, 0-255.
    """

    ok: bool
    reason: str
    sharpness: float
    brightness: float


@dataclass(frozen=True)
class QualityConfig:
    """Limits of ``assess_quality``."""

    work_px: int = 320
    min_sharpness: float = 0.085
    relative_sharpness: float = 0.4
    min_brightness: float = 40.0  # the dark_percentile-th grey level must reach this
    dark_percentile: float = 0.9
    max_clipped: float = 0.5  # over-exposed needs at least this share of clipped pixels ...
    min_stained: float = 0.03  # ... and fewer than this share still carrying stain colour
    all_clipped: float = 0.97  # over-exposed whatever the stain
    min_contrast: float = 4.0
    min_side_px: int = 32
    grey_tolerance: int = 2  # channels within this many levels of each other: a greyscale image


def _grey(frame: Frame, work_px: int) -> np.ndarray:
    import cv2

    code = cv2.COLOR_BGR2GRAY if frame.colour_order == "BGR" else cv2.COLOR_RGB2GRAY
    k = _step(frame.pixels.shape, work_px)
    if k > 2:  # far larger than the working size: convert only the pixels kept
        return cv2.cvtColor(np.ascontiguousarray(frame.pixels[::k, ::k]), code)
    # a pixel's grey value depends on that pixel alone, so converting first and keeping every k-th pixel gives the
    # same image; copying every second colour pixel out of a frame costs more than converting the whole frame
    return np.ascontiguousarray(cv2.cvtColor(np.ascontiguousarray(frame.pixels), code)[::k, ::k])


def sharpness(grey: np.ndarray) -> float:
    """Focus measure: fine-detail energy over mid-scale detail energy (contrast-free, 0 = flat or blurred).

    The Laplacian of a lightly smoothed copy measures the finest detail; the
    difference of two Gaussians measures detail a few pixels across. Defocus
    removes the first long before the second, while stain strength and exposure
    scale both alike.
    """
    import cv2

    g = grey.astype(np.float32)
    a = cv2.GaussianBlur(g, (0, 0), 1.0)
    b = cv2.GaussianBlur(a, (0, 0), 2.8)
    fine = cv2.meanStdDev(cv2.Laplacian(a, cv2.CV_32F, ksize=1))[1][0, 0]
    mid = cv2.meanStdDev(a - b)[1][0, 0]
    return float(fine * fine) / (float(mid * mid) + 1.0)


def assess_quality(
    frame: Frame | np.ndarray, config: QualityConfig | None = None, reference_sharpness: float | None = None
) -> Quality:
    """Flag frames that are out of focus or badly exposed.

    Native sharpness differs a lot between microscopes (in-focus Raabin frames
    score like mildly blurred BCCD ones), so the absolute floor only catches
    badly blurred frames. Give ``reference_sharpness`` (the sharpness of this
    station's in-focus frames, e.g. from ``QualityMonitor``) to also flag frames
    below ``relative_sharpness`` of it.

    Args:
        frame: A ``Frame`` or a BGR array.
        config: Limits (defaults suit BCCD, TXL-PBC, PBC and the synthetic source).
        reference_sharpness: Sharpness of in-focus frames from the same camera, if known.

    Returns:
        ``Quality`` with ``ok`` False and a ``reason`` when the frame should be skipped.
    """
    cfg = config or QualityConfig()
    fr = as_frame(frame)
    h, w = fr.pixels.shape[:2]
    if min(h, w) < cfg.min_side_px:
        return Quality(False, f"too small ({w}x{h} px; at least {cfg.min_side_px} px a side)", 0.0, 0.0)
    small = _small(fr.pixels, cfg.work_px)
    grey = _grey(fr, cfg.work_px)
    hist = np.bincount(grey.ravel(), minlength=256)
    cum = np.cumsum(hist) / grey.size
    brightness = float(np.searchsorted(cum, 0.5))
    bright = float(np.searchsorted(cum, cfg.dark_percentile))
    clipped = float(1.0 - cum[249])
    spread = float(np.searchsorted(cum, 0.95) - np.searchsorted(cum, 0.05))
    sharp = sharpness(grey) if spread >= cfg.min_contrast else 0.0
    if bright < cfg.min_brightness:
        return Quality(False, "too dark", sharp, brightness)
    if clipped > cfg.all_clipped or (clipped > cfg.max_clipped and _stained(small) < cfg.min_stained):
        return Quality(False, "over-exposed (the stain is washed out)", sharp, brightness)
    if spread < cfg.min_contrast:
        return Quality(False, "no contrast", sharp, brightness)
    if _is_greyscale(small, cfg.grey_tolerance):
        return Quality(False, GREYSCALE, sharp, brightness)
    if sharp < cfg.min_sharpness:
        return Quality(False, "out of focus", sharp, brightness)
    if reference_sharpness and sharp < cfg.relative_sharpness * reference_sharpness:
        return Quality(False, "out of focus", sharp, brightness)
    return Quality(True, "", sharp, brightness)


GREYSCALE = (
    "greyscale image: the station finds and classifies white cells by their stain colour, so it needs a colour "
    "camera (a single-channel camera cannot be used)"
)


def _step(shape: tuple[int, ...], work_px: int) -> int:
    """Keep every k-th pixel, so the short side is about ``work_px``."""
    short = min(shape[:2])
    return max(1, int(round(short / work_px))) if short > work_px else 1


def _small(pixels: np.ndarray, work_px: int) -> np.ndarray:
    k = _step(pixels.shape, work_px)
    return pixels[::k, ::k]


def _is_greyscale(small: np.ndarray, tolerance: int) -> bool:
    """All three channels (nearly) equal everywhere: a greyscale picture stored as colour."""
    for step in (8, 1):  # a colour picture shows it in a coarse look already; only a grey-looking one is read whole
        a = small[::step, ::step].astype(np.int16)
        if np.abs(a[..., 0] - a[..., 1]).max() > tolerance or np.abs(a[..., 1] - a[..., 2]).max() > tolerance:
            return False
    return True


def _stained(small: np.ndarray) -> float:
    """Share of pixels that carry stain colour (saturation above 0.15, not black)."""
    mx = small.max(axis=2).astype(np.float32)
    mn = small.min(axis=2).astype(np.float32)
    return float((((mx - mn) > 0.15 * mx) & (mx > 30)).mean())


class QualityMonitor:
    """``assess_quality`` that learns this camera's in-focus sharpness as frames go by.

    The reference is a slowly decaying running maximum of the sharpness of
    frames that passed, so one focus sweep teaches it what "sharp" means here
    and a frame that falls well below it is flagged as out of focus.

    Args:
        config: Limits for ``assess_quality``.
        decay: Per-frame decay of the running maximum (forgets a stale peak slowly).
        warmup: Frames seen before the relative test starts.
    """

    def __init__(self, config: QualityConfig | None = None, decay: float = 0.998, warmup: int = 10) -> None:
        self.config = config or QualityConfig()
        self.decay = decay
        self.warmup = warmup
        self.reference: float | None = None
        self.seen = 0

    def __call__(self, frame: Frame | np.ndarray) -> Quality:
        """Assess one frame and update the reference."""
        ref = self.reference if self.seen >= self.warmup else None
        q = assess_quality(frame, self.config, ref)
        self.seen += 1
        if q.reason in ("", "out of focus"):
            peak = (self.reference or 0.0) * self.decay
            self.reference = max(peak, q.sharpness)
        return q
