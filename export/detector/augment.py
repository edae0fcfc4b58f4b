"""Training canvases for the white-cell detector: mosaics of frames at the working scale, then the world's damage.

A canvas is a square of working pixels filled with one frame or a 2 x 2 mosaic of frames, each zoomed by a
random factor around the working scale (the station's scale measurement is off by up to ~20% on single frames,
more on strange microscopes), flipped and turned. Then, as a microscope or a phone would:

* stain (``stain_p``, per tile): optical densities mixed and scaled, as another lab's stain would colour it;
* colour: per-channel gains, gamma, saturation and hue (the frame was white-balanced; this is what white
  balance leaves of a lamp, a camera and a stain);
* blur (defocus), noise and JPEG;
* the phone through the eyepiece (``phone_p``): the picture is taken at lower resolution (downscaled up
  to 1.8x and back), blurred, sometimes sharpened as phones do, noisy, JPEG-compressed, vignetted, and a
  circular field stop with a dark surround crosses part of the canvas.

Boxes cut by a tile's edge keep their visible part when at least ``MIN_VISIBLE`` of them shows; smaller
pieces become ignore regions (neither a cell nor background for the loss).
"""

from __future__ import annotations

import math

import numpy as np

MIN_VISIBLE = 0.6
IGNORE_VISIBLE = 0.15
BACKGROUND = 235  # white-balanced slide glass


def _resize(img: np.ndarray, f: float) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    nw, nh = max(1, int(round(w * f))), max(1, int(round(h * f)))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def _turn(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random flips and 90-degree turns of an image and its boxes."""
    h, w = img.shape[:2]
    b = boxes.copy()
    if rng.random() < 0.5:
        img = img[:, ::-1]
        b[:, [0, 2]] = w - b[:, [2, 0]]
    if rng.random() < 0.5:
        img = img[::-1]
        b[:, [1, 3]] = h - b[:, [3, 1]]
    if rng.random() < 0.5:
        img = np.ascontiguousarray(img.transpose(1, 0, 2))
        b = b[:, [1, 0, 3, 2]]
    return np.ascontiguousarray(img), b


def colour_jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Channel gains, gamma, saturation and hue changes of a BGR uint8 image."""
    import cv2

    x = img.astype(np.float32) / 255.0
    gains = np.exp(rng.normal(0.0, 0.07 * strength, 3)).astype(np.float32)
    x = x * gains[None, None, :]
    gamma = float(np.exp(rng.normal(0.0, 0.15 * strength)))
    x = np.clip(x, 0, 1) ** gamma
    out = (x * 255).astype(np.uint8)
    if rng.random() < 0.7:
        hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-6, 7) * strength)) % 180
        sat = float(np.exp(rng.normal(0.0, 0.25 * strength)))
        hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)
    return out


def stain_jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Another stain and another lamp: the optical density of each channel mixed and scaled.

    Romanowsky stains differ between labs in strength and hue (BCDD's saturated pinks, PBC's pale ones); in
    optical density ``-log(I)`` a stain's colour is a direction and its strength a length, so a random mixing
    near the identity turns hues and per-channel scales change strength, as another stain batch would.
    """
    x = img.astype(np.float32)
    od = -np.log((x + 1.0) / 256.0)
    mix = np.eye(3, dtype=np.float32) + rng.normal(0.0, 0.08 * strength, (3, 3)).astype(np.float32)
    scale = np.exp(rng.normal(0.0, 0.3 * strength, 3)).astype(np.float32) * np.float32(
        np.exp(rng.normal(0, 0.2 * strength))
    )
    od = (od.reshape(-1, 3) @ mix.T).reshape(od.shape) * scale[None, None, :]
    return np.clip(256.0 * np.exp(-np.clip(od, 0, None)) - 1.0, 0, 255).astype(np.uint8)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (defocus)."""
    import cv2

    if sigma <= 0.05:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigma)


def noise(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Additive Gaussian noise, per pixel and channel."""
    if sigma <= 0:
        return img
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Round trip through JPEG at ``quality``."""
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else img


def vignette_and_stop(
    img: np.ndarray,
    rng: np.random.Generator,
    centre: tuple[float, float],
    radius: float,
    vignette: float = 0.35,
    surround: float = 12.0,
    soft: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Darken towards a circular field stop and black out beyond it; returns the image and the field mask (0..1)."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / max(radius, 1.0)
    light = 1.0 - vignette * np.clip(r, 0, 1) ** 2
    edge = np.clip((radius - r * radius) / max(soft, 0.5) + 0.5, 0, 1)
    dark = surround + rng.normal(0, 2.5, (h, w))
    out = img.astype(np.float32) * (light * edge)[..., None] + (dark * (1 - edge))[..., None]
    return np.clip(out, 0, 255).astype(np.uint8), edge


def phone_damage(img: np.ndarray, rng: np.random.Generator, max_down: float = 1.8) -> np.ndarray:
    """A phone's picture of the same field: lower resolution, blur, sharpening, noise, JPEG (same size back)."""
    import cv2

    h, w = img.shape[:2]
    u = float(np.exp(rng.uniform(0.0, math.log(max_down))))
    small = _resize(img, 1.0 / u)
    small = blur(small, float(rng.uniform(0.3, 1.1)))
    if rng.random() < 0.4:  # phones sharpen
        soft = cv2.GaussianBlur(small, (0, 0), 1.0)
        small = cv2.addWeighted(small, 1.6, soft, -0.6, 0)
    small = noise(small, rng, float(rng.uniform(1.0, 6.0)))
    small = jpeg(small, int(rng.integers(35, 90)))
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _place(
    canvas: np.ndarray,
    tile: np.ndarray,
    boxes: np.ndarray,
    cell: tuple[int, int, int, int],
    rng: np.random.Generator,
    keep: list,
    ignore: list,
) -> None:
    """Put ``tile`` (with ``boxes``) into ``cell`` of ``canvas``: cropped when bigger, at a random spot when smaller."""
    x0, y0, cw, ch = cell
    th, tw = tile.shape[:2]
    sx = int(rng.integers(0, tw - cw + 1)) if tw > cw else 0
    sy = int(rng.integers(0, th - ch + 1)) if th > ch else 0
    dx = int(rng.integers(0, cw - tw + 1)) if tw < cw else 0
    dy = int(rng.integers(0, ch - th + 1)) if th < ch else 0
    vw, vh = min(cw, tw), min(ch, th)
    canvas[y0 + dy : y0 + dy + vh, x0 + dx : x0 + dx + vw] = tile[sy : sy + vh, sx : sx + vw]
    if not len(boxes):
        return
    ox, oy = x0 + dx - sx, y0 + dy - sy
    b = boxes + np.array([ox, oy, ox, oy], np.float32)
    lim = np.array([x0 + dx, y0 + dy, x0 + dx + vw, y0 + dy + vh], np.float32)
    area = np.maximum(b[:, 2] - b[:, 0], 1e-3) * np.maximum(b[:, 3] - b[:, 1], 1e-3)
    c = np.stack(
        [
            np.maximum(b[:, 0], lim[0]),
            np.maximum(b[:, 1], lim[1]),
            np.minimum(b[:, 2], lim[2]),
            np.minimum(b[:, 3], lim[3]),
        ],
        1,
    )
    vis = np.clip(c[:, 2] - c[:, 0], 0, None) * np.clip(c[:, 3] - c[:, 1], 0, None) / area
    for box, v in zip(c, vis):
        if v >= MIN_VISIBLE:
            keep.append(box)
        elif v >= IGNORE_VISIBLE:
            ignore.append(box)


def make_canvas(
    frames: list,
    rng: np.random.Generator,
    size: int = 128,
    keep_scale: float = 2.0,
    zoom: tuple[float, float] = (0.75, 1.33),
    wide_zoom: tuple[float, float] = (0.5, 2.0),
    wide_p: float = 0.15,
    mosaic_p: float = 0.75,
    phone_p: float = 0.3,
    blur_p: float = 0.4,
    stain_p: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training canvas (BGR uint8 ``size`` x ``size``), its white-cell boxes and ignore boxes (N x 4 each).

    ``frames`` hold ``pixels`` (BGR, white-balanced, at ``keep_scale`` x the working scale) and ``boxes``.
    """
    canvas = np.full((size, size, 3), BACKGROUND, np.uint8)
    canvas = noise(canvas, rng, 2.0)
    if rng.random() < mosaic_p:
        sx = int(size * rng.uniform(0.35, 0.65))
        sy = int(size * rng.uniform(0.35, 0.65))
        cells = [(0, 0, sx, sy), (sx, 0, size - sx, sy), (0, sy, sx, size - sy), (sx, sy, size - sx, size - sy)]
    else:
        cells = [(0, 0, size, size)]
    keep: list = []
    ignore: list = []
    for cell in cells:
        fr = frames[int(rng.integers(len(frames)))]
        lo, hi = wide_zoom if rng.random() < wide_p else zoom
        z = float(np.exp(rng.uniform(math.log(lo), math.log(hi)))) / keep_scale
        tile = _resize(fr.pixels, z)
        boxes = np.asarray(fr.boxes, np.float32).reshape(-1, 4) * np.float32(tile.shape[1] / fr.pixels.shape[1])
        tile, boxes = _turn(tile, boxes, rng)
        if rng.random() < stain_p:
            tile = stain_jitter(tile, rng)
        if rng.random() < 0.5:
            tile = colour_jitter(tile, rng, 0.5)
        _place(canvas, tile, boxes, cell, rng, keep, ignore)
    img = colour_jitter(canvas, rng)
    if rng.random() < phone_p:
        img = phone_damage(img, rng)
        if rng.random() < 0.6:
            ang = rng.uniform(0, 2 * math.pi)
            radius = size * rng.uniform(0.6, 1.2)
            dist = radius * rng.uniform(0.5, 1.1)
            centre = (size / 2 + dist * math.cos(ang), size / 2 + dist * math.sin(ang))
            img, field = vignette_and_stop(img, rng, centre, radius, rng.uniform(0.1, 0.5), rng.uniform(3, 30))
            keep, extra = _inside_field(keep, field)
            ignore += extra
    else:
        if rng.random() < blur_p:
            img = blur(img, float(rng.uniform(0.3, 1.3)))
        if rng.random() < 0.4:
            img = noise(img, rng, float(rng.uniform(0.5, 4.0)))
        if rng.random() < 0.3:
            img = jpeg(img, int(rng.integers(50, 95)))
    return img, np.asarray(keep, np.float32).reshape(-1, 4), np.asarray(ignore, np.float32).reshape(-1, 4)


def _inside_field(boxes: list, field: np.ndarray) -> tuple[list, list]:
    """Boxes whose centre is in the lit field stay cells; the others become ignore regions."""
    keep, ignore = [], []
    h, w = field.shape
    for b in boxes:
        cx, cy = int(min(w - 1, max(0, (b[0] + b[2]) / 2))), int(min(h - 1, max(0, (b[1] + b[3]) / 2)))
        (keep if field[cy, cx] > 0.5 else ignore).append(b)
    return keep, ignore


def gaussian_radius(w: float, h: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: how far a centre may move with the box still overlapping ``min_overlap``."""
    a1, b1, c1 = 1, (h + w), w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def targets(
    boxes: np.ndarray, ignore: np.ndarray, size: int, stride: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CenterNet targets at ``stride``: heatmap, regression (log w, log h, dx, dy), regression mask, loss weight.

    The loss weight is 0 inside ignore boxes (except at real centres) and 1 elsewhere.
    """
    g = size // stride
    heat = np.zeros((g, g), np.float32)
    reg = np.zeros((4, g, g), np.float32)
    mask = np.zeros((g, g), np.float32)
    weight = np.ones((g, g), np.float32)
    for b in ignore:
        x0, y0 = int(math.floor(b[0] / stride)), int(math.floor(b[1] / stride))
        x1, y1 = int(math.ceil(b[2] / stride)), int(math.ceil(b[3] / stride))
        weight[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 0.0
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32)
    for b in boxes:
        w, h = (b[2] - b[0]) / stride, (b[3] - b[1]) / stride
        if w <= 0.5 or h <= 0.5:
            continue
        cx, cy = (b[0] + b[2]) / 2 / stride, (b[1] + b[3]) / 2 / stride
        ix, iy = int(min(g - 1, max(0, math.floor(cx)))), int(min(g - 1, max(0, math.floor(cy))))
        sigma = max(0.0, gaussian_radius(w, h)) / 3 + 0.35
        heat = np.maximum(heat, np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma**2)))
        heat[iy, ix] = 1.0
        reg[:, iy, ix] = (math.log(w), math.log(h), cx - ix, cy - iy)
        mask[iy, ix] = 1.0
        weight[max(0, iy - 2) : iy + 3, max(0, ix - 2) : ix + 3] = 1.0
    return heat, reg, mask, weight
