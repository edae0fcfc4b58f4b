"""``synthetic://``: a procedural blood smear, deterministic by seed, with ground truth.

The smear is an endless slide cut into tiles of the frame size. Each tile's
cells are drawn from a random generator seeded by ``(seed, tile)``: pale pink
red cells with central pallor, white cells with a lobed (neutrophil-like) or
round (lymphocyte-like) purple nucleus in pale cytoplasm, and platelets. A
tile is rendered once (cells of neighbouring tiles included, so tiles join
seamlessly), slightly blurred, and cached. A frame is a window on the slide,
seen through uneven illumination with sensor noise.

Without ``pan`` every frame is a fresh field (a different tile). With ``pan``
the window drifts smoothly across the slide like a slide moved under the
objective, so the same cells reappear shifted from frame to frame; the drift
is ``pan * 6`` pixels per frame on average.

Every frame carries ``truth`` (N x 4 boxes, x0 y0 x1 y1, clipped to the frame)
and ``truth_kinds`` (``"wbc"``, ``"rbc"``, ``"platelet"``). WBC boxes cover the
whole cell (nucleus + cytoplasm), as in BCCD / TXL-PBC.

URI options: ``seed`` (0), ``frames`` (100; 0 = endless), ``width`` (640),
``height`` (480), ``wbc`` (white cells per frame area, 2), ``pan`` (0),
``rbc_px`` (red-cell diameter in pixels, ``0.1 * min(width, height)``),
``blur`` (1.0, sigma relative to the scale), ``noise`` (3.0, sensor sigma),
``fps`` (30; timestamps are ``index / fps``), ``lymph`` (share of round
nuclei, 0.35).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from hemaedge.edge.errors import UsageError
from hemaedge.edge.records import Frame
from hemaedge.edge.sources.base import EventCallback, FrameSource

_OFFSET = 1 << 20  # keeps tile indices non-negative for SeedSequence


@dataclass(frozen=True)
class Cell:
    """One cell on the slide, in slide pixels."""

    kind: str  # "wbc", "rbc", "platelet"
    cx: float
    cy: float
    rx: float  # half-extent of the whole cell in x
    ry: float
    angle: float
    subtype: str = ""  # "neutrophil" / "lymphocyte" for wbc
    uid: int = 0  # unique per slide (seeded), stable across frames
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def box(self) -> tuple[float, float, float, float]:
        """Axis-aligned bounding box of the rotated ellipse."""
        return self.bbox


def _cell(kind: str, cx: float, cy: float, rx: float, ry: float, angle: float, subtype: str = "", uid: int = 0) -> Cell:
    a = math.radians(angle)
    hx = math.sqrt((rx * math.cos(a)) ** 2 + (ry * math.sin(a)) ** 2)
    hy = math.sqrt((rx * math.sin(a)) ** 2 + (ry * math.cos(a)) ** 2)
    return Cell(kind, cx, cy, rx, ry, angle, subtype, uid, (cx - hx, cy - hy, cx + hx, cy + hy))


class SmearModel:
    """The procedural slide: cells per tile, tile rendering, windows with truth.

    Args:
        seed: Everything follows from it.
        width, height: Frame (and tile) size.
        wbc: White cells per tile.
        rbc_px: Red-cell diameter in pixels.
        blur: Gaussian blur sigma in units of ``rbc_px / 48``.
        noise: Sensor noise sigma (grey levels).
        lymph: Share of white cells with a round nucleus.
    """

    def __init__(
        self,
        seed: int = 0,
        width: int = 640,
        height: int = 480,
        wbc: float = 2,
        rbc_px: float | None = None,
        blur: float = 1.0,
        noise: float = 3.0,
        lymph: float = 0.35,
    ) -> None:
        if width < 32 or height < 32:
            raise UsageError(f"synthetic frames must be at least 32x32, not {width}x{height}")
        self.seed = int(seed)
        self.width, self.height = int(width), int(height)
        self.wbc = float(wbc)
        self.rbc_px = float(rbc_px) if rbc_px else 0.1 * min(self.width, self.height)
        self.blur = float(blur)
        self.noise = float(noise)
        self.lymph = float(lymph)
        rng = np.random.default_rng([self.seed, 7])
        # Stain and microscope of this "slide": small shifts of every colour.
        self._tint = rng.uniform(-10, 10, 3)
        self._bg = np.array([226, 222, 234]) + rng.uniform(-8, 8, 3)
        self._cells: dict[tuple[int, int], list[Cell]] = {}
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._illum = self._illumination(rng)
        self._colours: dict[tuple[float, float, float], tuple[float, float, float]] = {}
        self._noise_bank = self._make_noise(rng, self.noise, 4)
        self._grain = self._make_noise(rng, 2.0, 1)[0]  # stain granularity, same in every tile

    # -- cells -----------------------------------------------------------------
    def tile_cells(self, tx: int, ty: int) -> list[Cell]:
        """The cells whose centres lie in tile ``(tx, ty)`` (deterministic)."""
        key = (tx, ty)
        if key in self._cells:
            return self._cells[key]
        rng = np.random.default_rng([self.seed, tx + _OFFSET, ty + _OFFSET])
        w, h, d = self.width, self.height, self.rbc_px
        x0, y0 = tx * w, ty * h
        uid_base = ((((tx + _OFFSET) << 22) + (ty + _OFFSET)) << 20) & 0x7FFFFFFFFFFFFFFF
        cells: list[Cell] = []
        # white cells: exactly `wbc` per tile (Poisson when fractional), wholly inside it, apart from each other
        n_wbc = int(rng.poisson(self.wbc)) if self.wbc != int(self.wbc) else int(self.wbc)
        wbcs: list[Cell] = []
        for _ in range(n_wbc):
            lymph = rng.random() < self.lymph
            r = d * (rng.uniform(0.55, 0.7) if lymph else rng.uniform(0.78, 0.95))
            if 2 * r + 4 >= min(w, h):
                continue
            for _try in range(40):
                cx = x0 + rng.uniform(r + 2, w - r - 2)
                cy = y0 + rng.uniform(r + 2, h - r - 2)
                if all(math.hypot(cx - c.cx, cy - c.cy) > r + c.rx + 0.2 * d for c in wbcs):
                    break
            else:
                continue
            ecc = rng.uniform(0.9, 1.0)
            wbcs.append(
                _cell(
                    "wbc",
                    cx,
                    cy,
                    r,
                    r * ecc,
                    float(rng.uniform(0, 180)),
                    "lymphocyte" if lymph else "neutrophil",
                    uid_base + len(wbcs),
                )
            )
        # red cells cover ~45% of the area; they may touch white cells but not cover them
        n_rbc = int(0.45 * w * h / (math.pi * (d / 2) ** 2))
        rb = rng.uniform(0, 1, (n_rbc, 5))
        cxs, cys = x0 + rb[:, 0] * w, y0 + rb[:, 1] * h
        rxs = d / 2 * (0.9 + 0.18 * rb[:, 2])
        rys = rxs * (0.85 + 0.15 * rb[:, 3])
        angs = rb[:, 4] * 180
        keep = np.ones(n_rbc, bool)
        for c in wbcs:
            keep &= np.hypot(cxs - c.cx, cys - c.cy) >= c.rx + 0.15 * rxs
        for i in np.flatnonzero(keep).tolist():
            cells.append(
                _cell(
                    "rbc",
                    float(cxs[i]),
                    float(cys[i]),
                    float(rxs[i]),
                    float(rys[i]),
                    float(angs[i]),
                    uid=uid_base + (1 << 16) + i,
                )
            )
        for i in range(int(rng.poisson(3))):
            cx, cy = x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)
            r = d * rng.uniform(0.07, 0.12)
            cells.append(
                _cell(
                    "platelet",
                    cx,
                    cy,
                    r,
                    r * rng.uniform(0.6, 1.0),
                    float(rng.uniform(0, 180)),
                    uid=uid_base + (1 << 19) + i,
                )
            )
        cells.extend(wbcs)
        self._cells[key] = cells
        if len(self._cells) > 512:
            self._cells.pop(next(iter(self._cells)))
        return cells

    def cells_in(self, x0: float, y0: float, x1: float, y1: float) -> list[Cell]:
        """Every cell whose box meets the slide rectangle, in drawing order (rbc, platelet, wbc)."""
        w, h = self.width, self.height
        txs = range(math.floor(x0 / w) - 1, math.floor((x1 - 1) / w) + 2)
        tys = range(math.floor(y0 / h) - 1, math.floor((y1 - 1) / h) + 2)
        found: list[Cell] = []
        for ty in tys:
            for tx in txs:
                for c in self.tile_cells(tx, ty):
                    bx0, by0, bx1, by1 = c.box()
                    if bx1 > x0 and bx0 < x1 and by1 > y0 and by0 < y1:
                        found.append(c)
        order = {"rbc": 0, "platelet": 1, "wbc": 2}
        found.sort(key=lambda c: (order[c.kind], c.uid))
        return found

    # -- rendering ---------------------------------------------------------------
    def _colour(self, bgr: tuple[float, float, float]) -> tuple[float, float, float]:
        col = self._colours.get(bgr)
        if col is None:
            c = np.clip(np.asarray(bgr) + self._tint, 0, 255)
            col = self._colours[bgr] = (float(c[0]), float(c[1]), float(c[2]))
        return col

    def _render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Render the slide rectangle (no illumination or sensor noise)."""
        import cv2

        margin = int(self.rbc_px) + 8
        cw, ch = w + 2 * margin, h + 2 * margin
        canvas = np.empty((ch, cw, 3), np.uint8)
        canvas[:] = np.clip(self._bg, 0, 255).astype(np.uint8)
        ox, oy = x0 - margin, y0 - margin
        shift = 4
        sc = 1 << shift

        def ell(cx: float, cy: float, rx: float, ry: float, ang: float, col: tuple[float, float, float]) -> None:
            cv2.ellipse(
                canvas,
                (int((cx - ox) * sc), int((cy - oy) * sc)),
                (max(1, int(rx * sc)), max(1, int(ry * sc))),
                ang,
                0,
                360,
                col,
                -1,
                cv2.LINE_8,
                shift,
            )

        for c in self.cells_in(ox, oy, ox + cw, oy + ch):
            rng = random.Random(self.seed * 1_000_003 + c.uid)
            if c.kind == "rbc":
                ell(c.cx, c.cy, c.rx, c.ry, c.angle, self._colour((168, 158, 214)))
                ell(c.cx, c.cy, c.rx * 0.8, c.ry * 0.8, c.angle, self._colour((178, 168, 219)))
                p = rng.uniform(0.3, 0.45)
                ell(
                    c.cx + rng.gauss(0, 1),
                    c.cy + rng.gauss(0, 1),
                    c.rx * p,
                    c.ry * p,
                    c.angle,
                    self._colour((204, 196, 228)),
                )
            elif c.kind == "platelet":
                ell(c.cx, c.cy, c.rx, c.ry, c.angle, self._colour((165, 95, 140)))
            else:
                self._draw_wbc(ell, c, rng)
        sigma = 0.8 * self.blur * self.rbc_px / 48.0
        if sigma > 0.2:
            cv2.GaussianBlur(canvas, (0, 0), sigma, dst=canvas)
        # stain granularity: fixed per slide region, so it moves with the cells
        out = np.ascontiguousarray(canvas[margin : margin + h, margin : margin + w])
        return _add_noise(out, self._grain) if (h, w) == (self.height, self.width) else out

    def _draw_wbc(self, ell, c: Cell, rng: random.Random) -> None:  # noqa: ANN001
        r = c.rx
        if c.subtype == "lymphocyte":
            ell(c.cx, c.cy, c.rx, c.ry, c.angle, self._colour((208, 182, 190)))  # thin bluish rim
            nr = r * rng.uniform(0.74, 0.84)
            off = r - nr
            a = rng.uniform(0, 2 * math.pi)
            ncx, ncy = c.cx + math.cos(a) * off * 0.6, c.cy + math.sin(a) * off * 0.6
            ell(ncx, ncy, nr, nr * rng.uniform(0.88, 1.0), rng.uniform(0, 180), self._colour((150, 58, 100)))
            for _ in range(6):  # chromatin clumps
                aa, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.6) * nr
                ell(
                    ncx + math.cos(aa) * rr,
                    ncy + math.sin(aa) * rr,
                    nr * 0.22,
                    nr * 0.16,
                    rng.uniform(0, 180),
                    self._colour((128, 40, 84)),
                )
            return
        ell(c.cx, c.cy, c.rx, c.ry, c.angle, self._colour((206, 190, 218)))  # pale lilac granular cytoplasm
        n_lobes = rng.choice((2, 3, 3, 4, 4, 5))
        a0 = rng.uniform(0, 2 * math.pi)
        span = rng.uniform(2.0, 3.4)
        arc_r = r * rng.uniform(0.46, 0.58)
        lobe = r * rng.uniform(0.21, 0.27)
        pts = []
        for k in range(n_lobes):
            a = a0 + span * (k / max(1, n_lobes - 1) - 0.5)
            pts.append((c.cx + math.cos(a) * arc_r, c.cy + math.sin(a) * arc_r))
        col = self._colour((152, 60, 112))
        for (xa, ya), (xb, yb) in zip(pts[:-1], pts[1:]):  # thin chromatin strands between lobes
            ell(
                (xa + xb) / 2,
                (ya + yb) / 2,
                math.hypot(xb - xa, yb - ya) / 2,
                lobe * 0.25,
                math.degrees(math.atan2(yb - ya, xb - xa)),
                col,
            )
        for x, y in pts:
            ell(x, y, lobe * rng.uniform(0.9, 1.1), lobe * rng.uniform(0.7, 0.9), rng.uniform(0, 180), col)

    def tile(self, tx: int, ty: int) -> np.ndarray:
        """The rendered tile ``(tx, ty)`` (cached)."""
        key = (tx, ty)
        img = self._tiles.get(key)
        if img is None:
            img = self._render(tx * self.width, ty * self.height, self.width, self.height)
            self._tiles[key] = img
            if len(self._tiles) > 12:
                self._tiles.popitem(last=False)
        else:
            self._tiles.move_to_end(key)
        return img

    def window(self, x: int, y: int) -> np.ndarray:
        """The slide seen through a frame-sized window at slide position ``(x, y)`` (before optics)."""
        w, h = self.width, self.height
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(math.floor(y / h), math.floor((y + h - 1) / h) + 1):
            for tx in range(math.floor(x / w), math.floor((x + w - 1) / w) + 1):
                t = self.tile(tx, ty)
                sx0, sy0 = max(x, tx * w), max(y, ty * h)
                sx1, sy1 = min(x + w, (tx + 1) * w), min(y + h, (ty + 1) * h)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = t[sy0 - ty * h : sy1 - ty * h, sx0 - tx * w : sx1 - tx * w]
        return out

    def truth(self, x: int, y: int, min_visible: float = 0.3) -> tuple[np.ndarray, tuple[str, ...], tuple[int, ...]]:
        """Boxes (frame pixels, clipped), kinds and cell ids of cells at least ``min_visible`` in view."""
        w, h = self.width, self.height
        boxes, kinds, ids = [], [], []
        for c in self.cells_in(x, y, x + w, y + h):
            bx0, by0, bx1, by1 = c.box()
            area = (bx1 - bx0) * (by1 - by0)
            cx0, cy0 = max(bx0 - x, 0.0), max(by0 - y, 0.0)
            cx1, cy1 = min(bx1 - x, float(w)), min(by1 - y, float(h))
            if cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < min_visible * area:
                continue
            boxes.append((cx0, cy0, cx1, cy1))
            kinds.append(c.kind)
            ids.append(c.uid)
        arr = np.asarray(boxes, np.float32).reshape(-1, 4)
        return arr, tuple(kinds), tuple(ids)

    # -- optics ------------------------------------------------------------------
    def _illumination(self, rng: np.random.Generator) -> np.ndarray:
        """Uneven illumination (vignetting + a gentle gradient), fixed to the camera, uint8 scale 0..255."""
        h, w = self.height, self.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
        r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (0.25 * (w * w + h * h))
        g = rng.uniform(-1, 1, 2)
        field = 1.0 - 0.16 * r2 + 0.05 * (g[0] * (xx / w - 0.5) + g[1] * (yy / h - 0.5))
        return np.repeat(np.clip(field * 255, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)

    def _make_noise(self, rng: np.random.Generator, sigma: float, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Noise fields split into saturating positive and negative uint8 parts (fast to apply)."""
        h, w = self.height, self.width
        bank = []
        for _ in range(count):
            n = np.rint(rng.normal(0, sigma, (h, w, 3))) if sigma > 0 else np.zeros((h, w, 3))
            bank.append((np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8)))
        return bank

    def through_optics(self, img: np.ndarray, index: int) -> np.ndarray:
        """Apply the illumination field and sensor noise (noise pattern picked by frame index)."""
        import cv2

        lit = cv2.multiply(img, self._illum, scale=1.0 / 255.0)
        if self.noise <= 0:
            return lit
        return _add_noise(lit, self._noise_bank[index % len(self._noise_bank)])


def _add_noise(img: np.ndarray, noise: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    import cv2

    out = cv2.add(img, noise[0])
    return cv2.subtract(out, noise[1], dst=out)


class SyntheticSource(FrameSource):
    """Frames of a ``SmearModel``; see the module docstring for the URI options.

    Attributes:
        model: The underlying ``SmearModel`` (tests read cell positions from it).
    """

    live = False
    colour_order = "BGR"

    def __init__(
        self,
        seed: int = 0,
        frames: int = 100,
        width: int = 640,
        height: int = 480,
        wbc: float = 2,
        pan: float = 0.0,
        rbc_px: float | None = None,
        blur: float = 1.0,
        noise: float = 3.0,
        fps: float = 30.0,
        lymph: float = 0.35,
        uri: str | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        super().__init__(uri or f"synthetic://?seed={seed}", on_event)
        self.frames = int(frames)
        self.pan = float(pan)
        self.fps = float(fps) if fps else 30.0
        self.model = SmearModel(seed, width, height, wbc, rbc_px, blur, noise, lymph)

    def field_origin(self, index: int) -> tuple[int, int]:
        """Slide position of frame ``index``'s top-left corner (the true stage position)."""
        w, h = self.model.width, self.model.height
        if self.pan <= 0:
            return index * w, 0
        t = float(index)
        speed = 6.0 * self.pan
        # a smooth meander: steady drift in x, slow swings in x and y (like hand-moved stage knobs)
        x = speed * t + 0.35 * w * math.sin(2 * math.pi * t / 240.0)
        y = 0.4 * h * math.sin(2 * math.pi * t / 330.0 + 0.7) + 0.1 * h * math.sin(2 * math.pi * t / 97.0)
        return int(round(x)), int(round(y))

    def frame(self, index: int) -> Frame:
        """Frame ``index`` (random access; the same every time)."""
        x, y = self.field_origin(index)
        img = self.model.through_optics(self.model.window(x, y), index)
        boxes, kinds, _ = self.model.truth(x, y)
        return Frame(
            img, "BGR", index / self.fps, self.uri, index, name=f"synthetic-{index:06d}", truth=boxes, truth_kinds=kinds
        )

    def truth_ids(self, index: int) -> tuple[int, ...]:
        """Stable ids of the cells in ``frame(index).truth`` (same order), for de-duplication tests."""
        x, y = self.field_origin(index)
        return self.model.truth(x, y)[2]

    def __len__(self) -> int:
        return self.frames

    def _frames(self) -> Iterator[Frame]:
        index = 0
        while self.frames <= 0 or index < self.frames:
            yield self.frame(index)
            index += 1
        self.status = "ended"
        self.emit("ended", f"{self.uri}: {index} synthetic frames")
