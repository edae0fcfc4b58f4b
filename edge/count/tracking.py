"""Count each physical cell once: stage-motion registration and cells kept in slide coordinates.

Every frame is registered to a *keyframe* of the slide by phase correlation
on a small, high-passed grey thumbnail (``cv2.phaseCorrelate``), which gives
the frame's origin in slide coordinates. A detection's centre plus that
origin is where the cell lies on the slide; a detection that lands within
half a cell diameter of a cell already known, or that is mostly a piece of
one (a lobe, a cell half cut off by the border), is the same cell and is not
counted again. A new keyframe is taken when the view has moved a fifth
of a frame (or the match weakens), so drift accumulates per keyframe
rather than per frame.

A match needs a phase-correlation peak *and* an aligned overlap that
correlates (normalised cross-correlation), because two different views that
each hold a white cell in a similar place give a convincing peak on their own.

When a frame cannot be registered to the current keyframe, it is registered to
the previous frame (a quick jog of the stage) and becomes a keyframe itself.
When that fails too (the slide jumped, the camera reconnected, a session was
resumed, or a folder of unrelated images is being counted) it is matched
against *every* keyframe seen so far (one batched FFT), so going back to an area already counted, or replaying
the same frames after a crash, does not count its cells again. A good frame
that matches no keyframe starts a new *field* with its own coordinates; a
poor-quality frame that matches nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

THUMB_WIDTH = 160
MIN_RESPONSE = 0.3  # cv2.phaseCorrelate peak response for a candidate match (unrelated frames: ~0.1),
MIN_NCC = 0.5  # and the normalised cross-correlation of the overlap once aligned, which must confirm it.
# Phase correlation alone is fooled by two different views that each hold a white cell in a similar place
# (it is the strongest structure): such BCCD pairs reach responses of 0.3-0.4, but once aligned their red
# cells do not line up (overlap NCC 0.32-0.45, checked by eye); true re-views of a slide area score NCC
# 0.6-0.9 (0.48 at the largest shift a keyframe allows on the noisy synthetic slide).
KEYFRAME_SHIFT = 0.2  # new keyframe after the view moved this share of the frame's smaller side,
KEYFRAME_RESPONSE = 0.5  # or once the match to the keyframe weakens below this (before it is lost)
MAX_SHIFT = 0.5  # a phase-correlation shift beyond this share of the thumbnail is aliasing, not motion
MATCH_FRACTION = 0.5  # same cell when the centres are within this share of the cell's diameter,
CONTAINED = 0.6  # or when this share of the smaller box lies inside the other (a piece of a known cell)


def _cv2():
    import cv2

    return cv2


def _search_size(shape: tuple[int, ...]) -> tuple[int, int]:
    return max(8, shape[0] // 4), max(8, shape[1] // 4)


def thumbnail(pixels: np.ndarray, width: int = THUMB_WIDTH) -> tuple[np.ndarray, float]:
    """Grey uint8 thumbnail of a frame and its scale (thumbnail px per frame px)."""
    cv2 = _cv2()
    grey = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, width / grey.shape[1])
    if scale < 1.0:
        size = (max(8, round(grey.shape[1] * scale)), max(8, round(grey.shape[0] * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        scale = size[0] / pixels.shape[1]
    return np.ascontiguousarray(grey), scale


def prepare(thumb: np.ndarray) -> np.ndarray:
    """High-pass a grey thumbnail (removes uneven illumination, which would otherwise correlate at zero shift)."""
    cv2 = _cv2()
    f = thumb.astype(np.float32)
    f -= cv2.GaussianBlur(f, (0, 0), max(2.0, f.shape[1] / 24))
    f /= float(f.std()) + 1e-6
    return f


def overlap_ncc(a: np.ndarray, b: np.ndarray, dx: float, dy: float) -> float:
    """Normalised cross-correlation of the overlap of ``a`` and ``b`` when ``b`` is ``a`` moved by ``(dx, dy)``."""
    h, w = a.shape
    ix, iy = int(round(dx)), int(round(dy))
    if abs(ix) >= w or abs(iy) >= h:
        return 0.0
    pa = a[max(0, -iy) : h - max(0, iy), max(0, -ix) : w - max(0, ix)]
    pb = b[max(0, iy) : h - max(0, -iy), max(0, ix) : w - max(0, -ix)]
    pa = pa - pa.mean()
    pb = pb - pb.mean()
    den = float(np.sqrt((pa * pa).sum() * (pb * pb).sum()))
    return float((pa * pb).sum()) / den if den > 0 else 0.0


@dataclass
class Keyframe:
    """A registered view of the slide: its thumbnail and where its origin lies on the slide.

    Attributes:
        id: Keyframe number (unique within a session epoch).
        field: The coordinate system (field of view chain) it belongs to.
        ox, oy: Slide coordinates of the frame's pixel (0, 0).
        frame_shape: ``(height, width)`` of the full frame.
        scale: Thumbnail pixels per frame pixel.
        thumb: Grey uint8 thumbnail (what the store persists).
    """

    id: int
    field: int
    ox: float
    oy: float
    frame_shape: tuple[int, int]
    scale: float
    thumb: np.ndarray
    _prepared: np.ndarray | None = None  # kept only while it is the registrar's current keyframe
    _signature: np.ndarray | None = None  # half-resolution spectrum for the relocalisation search

    @property
    def prepared(self) -> np.ndarray:
        """The high-passed thumbnail (computed on demand)."""
        if self._prepared is None:
            self._prepared = prepare(self.thumb)
        return self._prepared

    def release(self) -> None:
        """Drop the full-resolution cache (memory stays ~40 kB per keyframe on long sessions)."""
        self._prepared = None


@dataclass(frozen=True)
class Registration:
    """Where a frame lies on the slide.

    Attributes:
        field: Coordinate system id.
        ox, oy: Slide coordinates of the frame's pixel (0, 0).
        response: Phase-correlation response of the match (1.0 for a new field).
        how: ``"tracked"`` (vs the current keyframe), ``"relocalised"`` (vs an older
            keyframe), or ``"new-field"``.
    """

    field: int
    ox: float
    oy: float
    response: float
    how: str


class SlideRegistrar:
    """Registers frames to keyframes; see the module docstring.

    Args:
        thumb_width: Width of the registration thumbnail in pixels.
        min_response: Smallest phase-correlation response of a candidate match.
        min_ncc: Smallest normalised cross-correlation of the aligned overlap that confirms it.
        keyframe_shift: Share of the frame's smaller side the view may move before a new keyframe.
    """

    def __init__(
        self,
        thumb_width: int = THUMB_WIDTH,
        min_response: float = MIN_RESPONSE,
        min_ncc: float = MIN_NCC,
        keyframe_shift: float = KEYFRAME_SHIFT,
    ):
        self.thumb_width = thumb_width
        self.min_response = min_response
        self.min_ncc = min_ncc
        self.keyframe_shift = keyframe_shift
        self.reset()

    def reset(self) -> None:
        """Forget every keyframe and field."""
        self.keyframes: list[Keyframe] = []
        self.current: Keyframe | None = None
        self._last: Keyframe | None = None  # the previous registered frame (not a keyframe; never stored)
        self.next_field = 1
        self.next_keyframe = 1
        self.pending: list[Keyframe] = []  # new keyframes not yet handed to the store
        self._window: dict[tuple[int, int], np.ndarray] = {}
        self._index: dict[tuple, tuple[list[Keyframe], np.ndarray | None]] = {}  # search signatures per shape
        self._indexed: dict[tuple, int] = {}  # how many of self.keyframes each index has looked at

    def load(self, keyframes: Iterable[Keyframe]) -> None:
        """Restore keyframes (e.g. from a session store); the next frame relocalises against them."""
        for kf in keyframes:
            self.keyframes.append(kf)
            self.next_field = max(self.next_field, kf.field + 1)
            self.next_keyframe = max(self.next_keyframe, kf.id + 1)
        self.current = None
        self._last = None

    def take_pending(self) -> list[Keyframe]:
        """Keyframes created since the last call (for the store)."""
        out, self.pending = self.pending, []
        return out

    def _win(self, shape: tuple[int, int]) -> np.ndarray:
        if shape not in self._window:
            self._window[shape] = _cv2().createHanningWindow((shape[1], shape[0]), _cv2().CV_32F)
        return self._window[shape]

    def _correlate(self, kf: Keyframe, prepared: np.ndarray) -> tuple[float, float, float]:
        """Shift (in thumbnail px) of the frame's content relative to ``kf``, and the response.

        The response is 0 when the shift is implausible or the aligned overlap does not
        correlate (``min_ncc``), so callers compare it with ``min_response`` only.
        """
        (dx, dy), resp = _cv2().phaseCorrelate(kf.prepared, prepared, self._win(prepared.shape))
        h, w = prepared.shape
        if abs(dx) > MAX_SHIFT * w or abs(dy) > MAX_SHIFT * h:
            return dx, dy, 0.0
        if resp >= self.min_response and overlap_ncc(kf.prepared, prepared, dx, dy) < self.min_ncc:
            return dx, dy, 0.0
        return dx, dy, float(resp)

    def _signature(self, prepared: np.ndarray) -> np.ndarray:
        """Windowed quarter-resolution spectrum used to rank keyframes in a search (complex64)."""
        cv2 = _cv2()
        small = cv2.resize(prepared, _search_size(prepared.shape)[::-1], interpolation=cv2.INTER_AREA)
        return np.fft.rfft2(small * self._win(small.shape)).astype(np.complex64)

    def _search(
        self, prepared: np.ndarray, frame_shape: tuple[int, int]
    ) -> tuple[Keyframe, float, float, float] | None:
        """Best match among all keyframes of the same frame shape, confirmed by phaseCorrelate.

        Candidates are ranked by the peak of their phase correlation at quarter
        resolution, computed for all keyframes at once (one batched inverse FFT,
        ~7 ms for 200 keyframes on a laptop core); the best three are then
        checked at full thumbnail resolution.
        """
        key = (frame_shape, prepared.shape)
        members, stack = self._index.get(key, ([], None))
        fresh = [
            k
            for k in self.keyframes[self._indexed.get(key, 0) :]
            if k.frame_shape == frame_shape and k.thumb.shape == prepared.shape
        ]
        self._indexed[key] = len(self.keyframes)
        if fresh:
            for k in fresh:
                if k._signature is None:
                    k._signature = self._signature(k.prepared)
                    if k is not self.current:
                        k.release()
            new = np.stack([k._signature for k in fresh])
            members = members + fresh
            stack = new if stack is None else np.concatenate([stack, new])
            self._index[key] = (members, stack)
        if not members:
            return None
        cross = stack * np.conj(self._signature(prepared))[None]
        cross /= np.abs(cross) + 1e-9
        peaks = np.fft.irfft2(cross, s=_search_size(prepared.shape)).reshape(len(members), -1).max(axis=1)
        for i in np.argsort(-peaks)[:3]:  # confirm the strongest few with OpenCV's sub-pixel estimate
            kf = members[int(i)]
            dx, dy, resp = self._correlate(kf, prepared)
            if kf is not self.current:
                kf.release()
            if resp >= self.min_response:
                return kf, dx, dy, resp
        return None

    def _set_current(self, kf: Keyframe) -> None:
        if self.current is not None and self.current is not kf:
            self.current.release()
        self.current = kf

    def register(self, pixels: np.ndarray, may_start_field: bool = True) -> Registration | None:
        """Register one frame (RGB or BGR, or grey).

        Args:
            pixels: The frame.
            may_start_field: When the frame matches no keyframe, start a new field
                (True) or give up and return None (False, for poor-quality frames).

        Returns:
            The registration, or None when the frame could not be placed.
        """
        thumb, scale = thumbnail(pixels, self.thumb_width)
        prepared = prepare(thumb)
        shape = (int(pixels.shape[0]), int(pixels.shape[1]))
        hit = None
        how = "tracked"
        for ref in (self.current, self._last):  # the keyframe; if the view jumped, the previous frame
            if ref is not None and ref.frame_shape == shape and ref.thumb.shape == thumb.shape:
                dx, dy, resp = self._correlate(ref, prepared)
                if resp >= self.min_response:
                    hit = (ref, dx, dy, resp)
                    break
        if hit is None:
            hit = self._search(prepared, shape)
            how = "relocalised"
        if hit is None:
            self._last = None
            if not may_start_field:
                return None
            kf = self._new_keyframe(self.next_field, 0.0, 0.0, shape, scale, thumb, prepared)
            self.next_field += 1
            return Registration(kf.field, 0.0, 0.0, 1.0, "new-field")
        ref, dx, dy, resp = hit
        ox, oy = ref.ox - dx / ref.scale, ref.oy - dy / ref.scale
        if ref is self._last:  # the keyframe is stale: this frame becomes one
            self._new_keyframe(ref.field, ox, oy, shape, scale, thumb, prepared)
        else:
            self._set_current(ref)
            if resp < KEYFRAME_RESPONSE or max(abs(ox - ref.ox), abs(oy - ref.oy)) > self.keyframe_shift * min(shape):
                self._new_keyframe(ref.field, ox, oy, shape, scale, thumb, prepared)
        self._last = Keyframe(0, ref.field, ox, oy, shape, scale, thumb, _prepared=prepared)
        return Registration(ref.field, ox, oy, resp, how)

    def _new_keyframe(
        self,
        fld: int,
        ox: float,
        oy: float,
        shape: tuple[int, int],
        scale: float,
        thumb: np.ndarray,
        prepared: np.ndarray,
    ) -> Keyframe:
        kf = Keyframe(self.next_keyframe, fld, ox, oy, shape, scale, thumb, _prepared=prepared)
        self.next_keyframe += 1
        self.keyframes.append(kf)
        self.pending.append(kf)
        self._set_current(kf)
        return kf


@dataclass
class KnownCell:
    """A cell already counted (or queued to be), in slide coordinates: centre and box size."""

    id: int
    field: int
    x: float
    y: float
    w: float
    h: float

    @property
    def size(self) -> float:
        """Diameter (larger box side)."""
        return max(self.w, self.h)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection area of two ``(x, y, w, h)`` centre boxes."""
    ix = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    iy = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    return max(0.0, ix) * max(0.0, iy)


@dataclass
class CellMap:
    """Known cells, hashed on a grid per field, matched by distance and overlap.

    Attributes:
        grid: Grid cell side in slide pixels (about the size of a white cell).
    """

    grid: float = 64.0
    cells: dict[int, KnownCell] = field(default_factory=dict)
    _buckets: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)
    next_id: int = 1
    _largest: float = 0.0

    def __len__(self) -> int:
        return len(self.cells)

    def _key(self, fld: int, x: float, y: float) -> tuple[int, int, int]:
        return fld, int(np.floor(x / self.grid)), int(np.floor(y / self.grid))

    def add(self, fld: int, x: float, y: float, w: float, h: float | None = None) -> int:
        """Remember a cell (centre ``x, y``, box ``w x h``); returns its id."""
        h = w if h is None else h
        cid = self.next_id
        self.next_id += 1
        self.cells[cid] = KnownCell(cid, fld, x, y, w, h)
        self._buckets.setdefault(self._key(fld, x, y), []).append(cid)
        self._largest = max(self._largest, w, h)
        return cid

    def update(self, cid: int, x: float, y: float, w: float, h: float) -> None:
        """Where a known cell was last seen (keeps registration drift local), and its box when seen whole."""
        c = self.cells[cid]
        if w * h < 0.7 * c.w * c.h:  # a part of the cell (a lobe, a cut-off piece): keep the whole cell's box
            return
        old, new = self._key(c.field, c.x, c.y), self._key(c.field, x, y)
        c.x, c.y, c.w, c.h = x, y, w, h
        self._largest = max(self._largest, w, h)
        if old != new:
            self._buckets[old].remove(cid)
            self._buckets.setdefault(new, []).append(cid)

    def near(self, fld: int, x: float, y: float, radius: float) -> list[tuple[float, int]]:
        """Known cells whose centre lies within ``radius`` of a point: ``(distance, id)`` pairs."""
        out = []
        reach = int(np.ceil(radius / self.grid))
        _, gx, gy = self._key(fld, x, y)
        for i in range(gx - reach, gx + reach + 1):
            for j in range(gy - reach, gy + reach + 1):
                for cid in self._buckets.get((fld, i, j), ()):
                    c = self.cells[cid]
                    d = float(np.hypot(c.x - x, c.y - y))
                    if d <= radius:
                        out.append((d, cid))
        return out

    def match(
        self,
        fld: int,
        boxes: Sequence[tuple[float, float, float, float]],
        fraction: float = MATCH_FRACTION,
        contained: float = CONTAINED,
    ) -> list[int | None]:
        """Which known cell each ``(x, y, w, h)`` detection is, or None for a new cell.

        First one-to-one, nearest pairs first: a detection is a known cell when their
        centres are within ``fraction`` of the larger diameter (so two touching cells
        stay two). Then a detection left over is still a known cell when most of one
        of them (``contained`` of the smaller box's area) overlaps: a lobe or a cut-off
        piece of a cell counted whole, or a whole cell whose piece was counted while it
        entered the view. Such matches may share a known cell.
        """
        pairs = []
        cands: list[list[int]] = []
        for p, (x, y, w, h) in enumerate(boxes):
            size = max(w, h)
            near = self.near(fld, x, y, (size + self._largest) / 2)
            cands.append([cid for _, cid in near])
            for d, cid in near:
                if d <= fraction * max(size, self.cells[cid].size):
                    pairs.append((d, p, cid))
        pairs.sort()
        out: list[int | None] = [None] * len(boxes)
        used: set[int] = set()
        for _d, p, cid in pairs:
            if out[p] is None and cid not in used:
                out[p] = cid
                used.add(cid)
        for p, b in enumerate(boxes):
            if out[p] is not None:
                continue
            best, share = None, contained
            for cid in cands[p]:
                c = self.cells[cid]
                inter = _overlap(b, (c.x, c.y, c.w, c.h))
                s_ = inter / max(1e-6, min(b[2] * b[3], c.w * c.h))
                if s_ >= share:
                    best, share = cid, s_
            out[p] = best
        return out


@dataclass(frozen=True)
class TrackedDetection:
    """A detection placed on the slide."""

    index: int  # position in the frame's detection list
    box: tuple[float, float, float, float]
    sx: float
    sy: float
    size: float


@dataclass(frozen=True)
class TrackResult:
    """What the tracker made of one frame.

    Attributes:
        registration: Where the frame lies (None: could not be placed, nothing counted).
        new: Detections of cells not seen before, to classify and count.
        seen: Detections matched to known cells.
        at_edge: Detections skipped because the cell is cut by the frame border.
    """

    registration: Registration | None
    new: tuple[TrackedDetection, ...] = ()
    seen: int = 0
    at_edge: int = 0


class SlideTracker:
    """Registration + cell map: which detections of a frame are new cells.

    Args:
        edge_margin: Detections whose box comes within this many pixels of the frame
            border are cut cells: not counted now (they are counted once fully in view).
            Negative: count them anyway.
        registrar: The registrar (default: a fresh :class:`SlideRegistrar`).
    """

    def __init__(self, edge_margin: int = 2, registrar: SlideRegistrar | None = None):
        self.edge_margin = edge_margin
        self.registrar = registrar or SlideRegistrar()
        self.cells = CellMap()

    def reset(self) -> None:
        """Forget every known cell and keyframe."""
        self.registrar.reset()
        self.cells = CellMap()

    def restore(
        self, cells: Iterable[tuple[int, float, float, float, float]], keyframes: Iterable[Keyframe] = ()
    ) -> None:
        """Start over knowing ``cells`` (``(field, x, y, w, h)`` on the slide) and ``keyframes`` (a resumed session)."""
        self.reset()
        for fld, x, y, w, h in cells:
            self.cells.add(fld, x, y, w, h)
        self.registrar.load(keyframes)

    def take_new_keyframes(self) -> list[Keyframe]:
        """Keyframes made since the last call: stored with the next batch of cells, so a resume can relocalise."""
        return self.registrar.take_pending()

    def register(self, pixels: np.ndarray, may_start_field: bool = True) -> Registration | None:
        """Register a frame without looking at its cells (for frames that are not segmented)."""
        return self.registrar.register(pixels, may_start_field)

    def place(
        self, reg: Registration, frame_shape: tuple[int, ...], boxes: Sequence[tuple[float, float, float, float]]
    ) -> TrackResult:
        """Split a registered frame's detections into new cells, known cells and cut cells.

        New cells are remembered at once, so the next frame will not count them again.
        """
        h, w = frame_shape[:2]
        m = self.edge_margin
        inside, at_edge = [], 0
        for i, b in enumerate(boxes):
            x0, y0, x1, y1 = (float(v) for v in b)
            if m >= 0 and (x0 <= m or y0 <= m or x1 >= w - 1 - m or y1 >= h - 1 - m):
                at_edge += 1
                continue
            inside.append(
                TrackedDetection(
                    i, (x0, y0, x1, y1), (x0 + x1) / 2 + reg.ox, (y0 + y1) / 2 + reg.oy, max(x1 - x0, y1 - y0)
                )
            )
        dims = [(t.box[2] - t.box[0], t.box[3] - t.box[1]) for t in inside]
        matches = self.cells.match(reg.field, [(t.sx, t.sy, w_, h_) for t, (w_, h_) in zip(inside, dims)])
        new = []
        for t, (w_, h_), cid in zip(inside, dims, matches):
            if cid is None:
                self.cells.add(reg.field, t.sx, t.sy, w_, h_)
                new.append(t)
            else:
                self.cells.update(cid, t.sx, t.sy, w_, h_)
        return TrackResult(reg, tuple(new), len(inside) - len(new), at_edge)

    def observe(
        self, pixels: np.ndarray, boxes: Sequence[tuple[float, float, float, float]], may_start_field: bool = True
    ) -> TrackResult:
        """Register a frame and place its detections (see :meth:`place`)."""
        reg = self.register(pixels, may_start_field)
        if reg is None:
            return TrackResult(None)
        return self.place(reg, pixels.shape, boxes)
