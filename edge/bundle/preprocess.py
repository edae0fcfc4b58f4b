"""The one preprocessing function: crop -> resize -> normalise -> NCHW float32.

Training-time evaluation, INT8 calibration and the station all call
``preprocess``; calibration data preprocessed differently from runtime data is
the most common cause of INT8 accuracy loss in the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from hemaedge.edge.bundle.manifest import CropGeometry, InputSpec

_INTERP = {"area": 3, "linear": 1, "cubic": 2, "nearest": 0}  # cv2 constants


def _resize(img: np.ndarray, h: int, w: int, method: str) -> np.ndarray:
    if img.shape[0] == h and img.shape[1] == w:
        return img
    try:
        import cv2
    except ImportError:  # pure-numpy fallback: box filter on integer ratios, else nearest
        ys = (np.arange(h) + 0.5) * img.shape[0] / h
        xs = (np.arange(w) + 0.5) * img.shape[1] / w
        return img[ys.astype(int)][:, xs.astype(int)]
    interp = _INTERP.get(method, 3)
    if interp == 3 and (img.shape[0] < h or img.shape[1] < w):
        interp = 1  # INTER_AREA is for shrinking; enlarge bilinearly
    return cv2.resize(img, (w, h), interpolation=interp)


WB_PERCENTILE = 80.0
WB_TARGET = 235.0


def _background(flat: np.ndarray) -> np.ndarray:
    """Per image (``N x P x 3``) its background colour: the mean of the pixels brighter than its
    ``WB_PERCENTILE``-th brightness percentile (slide glass between cells)."""
    bright = flat.mean(axis=2)
    cut = np.percentile(bright, WB_PERCENTILE, axis=1)[:, None]
    mask = (bright >= cut)[..., None]
    return (flat * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)


def white_balance(images: np.ndarray) -> np.ndarray:
    """Scale each image's channels so its bright background becomes neutral grey ``WB_TARGET``.

    Args:
        images: ``N x H x W x 3`` float32 in 0..255 (modified in place and returned).
    """
    n = images.shape[0]
    bg = _background(images.reshape(n, -1, 3))
    gain = WB_TARGET / np.maximum(bg, 1.0)
    images *= gain[:, None, None, :]
    np.clip(images, 0, 255, out=images)
    return images


STAIN_PERCENTILE = 97.0  # a crop's stain strength: this percentile of its summed optical density (its nucleus)


def optical_density(images: np.ndarray) -> np.ndarray:
    """``N x P x 3`` optical density ``-log10(I / background)`` of each image against its own background (>= 0)."""
    n = images.shape[0]
    flat = images.reshape(n, -1, 3)
    bg = np.maximum(_background(flat), 1.0)[:, None, :].astype(np.float32)
    return np.maximum(-np.log10(np.maximum(flat, np.float32(1.0)) / bg), np.float32(0.0))


def stain_strength(images: np.ndarray, matrix: np.ndarray | None = None) -> np.ndarray:
    """Per image (``N x H x W x 3`` float32 0..255) its stain strength: the ``STAIN_PERCENTILE``-th percentile of
    the summed optical density, i.e. how dark its nucleus is stained (after ``matrix``, its session's stains
    mapped onto the reference's, if given)."""
    return _strengths(_mapped(optical_density(images), matrix))


def _strengths(od: np.ndarray) -> np.ndarray:
    return np.percentile(od.sum(axis=2), STAIN_PERCENTILE, axis=1)


def stain_gain(strength: float | None, spec: InputSpec) -> float:
    """The factor on optical density that brings a session of this ``strength`` to the bundle's ``stain_ref``."""
    if not spec.stain_ref or not strength:
        return 1.0
    lo, hi = spec.stain_gain_range
    return float(np.clip(spec.stain_ref / max(float(strength), 1e-3), lo, hi))


def even_sample(n: int, k: int) -> np.ndarray:
    """Indices of up to ``k`` of ``n`` items, evenly spread from the first to the last (a folder sorted by class is
    sampled across its classes)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).astype(int)) if n else np.zeros(0, int)


HUE_CROPS = 64  # a session's two stains are measured on (up to) this many of its white-cell crops
HUE_MIN_OD = 0.3  # pixels with less summed optical density (background, pale cytoplasm) do not vote
HUE_PERCENTILE = 2.0  # the stains are the 2nd and 98th percentile directions of the stained pixels
HUE_MAX_PIXELS = 40_000


def stain_vectors(od_pixels: np.ndarray) -> np.ndarray | None:
    """The two stains of a session (Macenko et al. 2009): ``2 x 3`` unit optical-density directions (nuclear stain,
    eosin) of its stained pixels (``P x 3`` optical density), or None when there are too few or only one stain.

    The stained pixels span a plane (their two main directions); the extreme angles within it are the two pure
    stains. The nuclear stain (azure / methylene blue) absorbs red light more than blue, eosin the reverse.
    """
    dense = np.asarray(od_pixels, np.float64).reshape(-1, 3)
    dense = dense[dense.sum(axis=1) > HUE_MIN_OD]
    if len(dense) < 200:
        return None
    if len(dense) > HUE_MAX_PIXELS:
        dense = dense[np.random.default_rng(0).choice(len(dense), HUE_MAX_PIXELS, replace=False)]
    plane = np.linalg.svd(dense, full_matrices=False)[2][:2].copy()
    if plane[0].sum() < 0:
        plane[0] = -plane[0]
    proj = dense @ plane.T
    lo, hi = np.percentile(np.arctan2(proj[:, 1], proj[:, 0]), [HUE_PERCENTILE, 100 - HUE_PERCENTILE])
    v = np.stack([np.cos(a) * plane[0] + np.sin(a) * plane[1] for a in (lo, hi)])
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
    if v[0, 0] - v[0, 2] < v[1, 0] - v[1, 2]:
        v = v[::-1].copy()
    if abs(float(v[0] @ v[1])) > 0.995:
        return None
    return v.astype(np.float32)


def stain_angles(vectors: np.ndarray | None, spec: InputSpec) -> list[float] | None:
    """Degrees between a session's two stains and the bundle's reference ones (None if not measured)."""
    if vectors is None or not spec.stain_vectors:
        return None
    ref = np.asarray(spec.stain_vectors, np.float64)
    return [float(np.degrees(np.arccos(np.clip(float(v @ r), -1.0, 1.0)))) for v, r in zip(vectors, ref)]


def hue_matrix(vectors: np.ndarray | None, spec: InputSpec) -> np.ndarray | None:
    """The ``3 x 3`` map on optical-density rows that re-expresses a session's two stains as the bundle's
    ``stain_vectors`` (what neither stain explains is kept). Each stain is turned towards its reference only until
    it lies within ``stain_hue_tolerance`` degrees. None: nothing to map."""
    if vectors is None or not spec.stain_vectors:
        return None
    v = np.asarray(vectors, np.float64)
    ref = np.asarray(spec.stain_vectors, np.float64)
    target = v.copy()
    tol = np.radians(spec.stain_hue_tolerance)
    for k in range(2):
        th = float(np.arccos(np.clip(v[k] @ ref[k], -1.0, 1.0)))
        if th > tol and th > 1e-6:
            t = (th - tol) / th  # slerp from the session's stain towards the reference, stopping at the tolerance
            target[k] = (np.sin((1 - t) * th) * v[k] + np.sin(t * th) * ref[k]) / np.sin(th)
    return (np.eye(3) + np.linalg.pinv(v) @ (target - v)).astype(np.float32)


def _mapped(od: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    return od if matrix is None else np.maximum(od @ matrix, np.float32(0.0))


@dataclass(frozen=True)
class StainEstimate:
    """A session's measured stain: its strength (after its stains are mapped) and its two stains (or None)."""

    strength: float | None
    vectors: np.ndarray | None = None


def estimate_stain(images: np.ndarray, spec: InputSpec) -> StainEstimate:
    """A set of crops (``N x H x W x 3`` float32 0..255 at model size) taken as one session: its stains from an even
    sample of ``HUE_CROPS`` of them, its strength the median over all of them once mapped."""
    if not len(images):
        return StainEstimate(None)
    vectors = None
    if spec.stain_vectors:
        vectors = stain_vectors(optical_density(images[even_sample(len(images), HUE_CROPS)]))
    return StainEstimate(float(np.median(stain_strength(images, hue_matrix(vectors, spec)))), vectors)


def normalise_stain(images: np.ndarray, gain: float, matrix: np.ndarray | None = None) -> np.ndarray:
    """Map each image's optical density through ``matrix`` (its session's stains onto the reference's, if any) and
    multiply it by ``gain``, against a neutral background ``WB_TARGET`` (so it is white-balanced too).
    ``N x H x W x 3`` float32 0..255, modified in place and returned."""
    od = _mapped(optical_density(images), matrix) * np.float32(gain)
    images[...] = np.clip(WB_TARGET * np.power(np.float32(10.0), -od), 0, 255).reshape(images.shape)
    return images


def normalise_stain_u8(pixels: np.ndarray, stain: StainEstimate, spec: InputSpec) -> np.ndarray:
    """``normalise_stain`` on uint8 ``N x H x W x 3`` pixels of one session, back as uint8 (training's raw pixels,
    normalised as one session before augmentation); nothing to do leaves them as they are."""
    gain, matrix = stain_gain(stain.strength, spec), hue_matrix(stain.vectors, spec)
    if gain == 1.0 and matrix is None:
        return pixels
    return np.rint(normalise_stain(pixels.astype(np.float32), gain, matrix)).astype(np.uint8)


class SessionStain:
    """The session's stain: its strength, the median over its recent white-cell crops (``kept`` of them), and (for
    bundles with ``stain_vectors``) its two stains, measured on its first ``HUE_CROPS`` white-cell crops.

    One slide is stained once, so its cells share one strength and one pair of stains; a cell type's own darkness
    and colour (a basophil's granules, an eosinophil's) stay, because every crop of the session gets the same
    mapping. Until the first crops are in, the estimate is that of the crops seen so far.
    """

    def __init__(self, kept: int = 500, hue_crops: int = HUE_CROPS):
        import collections

        self._seen: collections.deque = collections.deque(maxlen=kept)
        self._hue_crops = hue_crops
        self._pixels: list[np.ndarray] = []  # stained optical-density pixels of the first hue_crops crops
        self._vectors: np.ndarray | None = None
        self._stale = False

    def add(self, strengths: Sequence[float] | np.ndarray) -> None:
        self._seen.extend(float(v) for v in np.ravel(strengths))

    def add_od(self, od: np.ndarray, spec: InputSpec) -> np.ndarray:
        """Take white-cell crops' optical density (``N x P x 3``, unmapped): their stains count towards the
        session's (up to ``hue_crops`` crops), their strengths once mapped. Returns the mapped optical density."""
        if spec.stain_vectors and len(self._pixels) < self._hue_crops:
            for crop in od[: self._hue_crops - len(self._pixels)]:
                self._pixels.append(crop[crop.sum(axis=1) > HUE_MIN_OD])
            self._stale = True
        od = _mapped(od, hue_matrix(self.vectors, spec))
        self.add(_strengths(od))
        return od

    def add_crops(self, crops: Sequence[np.ndarray], spec: InputSpec, colour_order: str = "RGB") -> None:
        """Measure white-cell crops (uint8, any size: resized as ``preprocess`` resizes them) and add them."""
        if len(crops):
            self.add_od(optical_density(resized(crops, spec, colour_order)), spec)

    @classmethod
    def of_set(cls, crops: Sequence[np.ndarray], spec: InputSpec, batch: int = 256) -> SessionStain:
        """A whole set of white-cell crops taken as one session, in any order (a folder sorted by class too): its
        stains are measured on an even sample of it, then every crop's strength is added."""
        stain = cls(kept=max(1, len(crops)))
        if spec.stain_ref and len(crops):
            first = even_sample(len(crops), stain._hue_crops)
            rest = np.setdiff1d(np.arange(len(crops)), first)
            for part in [first, *(rest[s : s + batch] for s in range(0, len(rest), batch))]:
                stain.add_crops([crops[i] for i in part], spec)
        return stain

    @property
    def vectors(self) -> np.ndarray | None:
        if self._stale:
            self._vectors = stain_vectors(np.concatenate(self._pixels)) if self._pixels else None
            self._stale = False
        return self._vectors

    @property
    def strength(self) -> float | None:
        return float(np.median(self._seen)) if self._seen else None

    @property
    def estimate(self) -> StainEstimate:
        return StainEstimate(self.strength, self.vectors)

    def __len__(self) -> int:
        return len(self._seen)


def to_model_colour(img: np.ndarray, have: str, spec: InputSpec) -> np.ndarray:
    """Reorder channels from ``have`` ("RGB"/"BGR") to the model's colour order."""
    return img if have == spec.colour_order else img[..., ::-1]


def resized(images: Sequence[np.ndarray] | np.ndarray, spec: InputSpec, colour_order: str = "RGB") -> np.ndarray:
    """The images at the model's size and colour order: ``N x H x W x C`` float32 0..255 (step 1 of ``preprocess``)."""
    n = len(images)
    out = np.empty((n, spec.height, spec.width, spec.channels), dtype=np.float32)
    for i in range(n):
        img = np.asarray(images[i])
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = to_model_colour(img, colour_order, spec)
        out[i] = _resize(img, spec.height, spec.width, spec.resize)
    return out


def preprocess(
    images: Sequence[np.ndarray] | np.ndarray,
    spec: InputSpec,
    colour_order: str = "RGB",
    session: SessionStain | StainEstimate | float | None = None,
) -> np.ndarray:
    """Turn uint8 HxWx3 images into the model's ``N x C x H x W`` float32 batch.

    Resize, then (``spec.stain_ref``) the session's stain normalisation (its stains mapped onto the reference's
    with ``spec.stain_vectors``, then its strength), then (``spec.white_balance``) white
    balance, then ``(x/255 - mean) / std``.

    Args:
        images: A list of HxWx3 uint8 images (any size; resized here) or an
            ``N x H x W x 3`` uint8 array.
        spec: The bundle's input specification.
        colour_order: Channel order of ``images`` (``"RGB"`` or ``"BGR"``).
        session: Only for bundles with ``spec.stain_ref``: the session these crops belong to (a
            ``SessionStain``, which the crops are added to first), its ``StainEstimate``, or (bundles without
            ``stain_vectors``) its stain strength as a number. Without one the batch is taken as one session (a
            folder of one microscope's cells, as in calibration).

    Returns:
        Contiguous float32 array ``N x C x H x W``, ``(x/255 - mean) / std``.
    """
    out = resized(images, spec, colour_order)
    n = len(out)
    if spec.stain_ref and n:
        od = optical_density(out)  # once: it gives the stains and strengths and is then mapped and scaled
        if isinstance(session, SessionStain):
            od = session.add_od(od, spec)
            strength = session.strength
        else:
            if session is None:
                session = estimate_stain(out, spec)
            elif not isinstance(session, StainEstimate):
                if spec.stain_vectors:
                    raise ValueError("this bundle maps the session's stains: pass a SessionStain or StainEstimate")
                session = StainEstimate(float(session))
            od = _mapped(od, hue_matrix(session.vectors, spec))
            strength = session.strength
        od *= np.float32(stain_gain(strength, spec))
        out[...] = np.clip(WB_TARGET * np.power(np.float32(10.0), -od), 0, 255).reshape(out.shape)
    if spec.white_balance:
        white_balance(out)
    mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
    std = np.asarray(spec.std, dtype=np.float32) * 255.0
    out -= mean
    out /= std
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def crop_box(
    box: Sequence[float], frame_shape: tuple[int, ...], geom: CropGeometry, typical_side: float | None = None
) -> tuple[int, int, int]:
    """The square crop ``(cx, cy, side)`` in pixels for a detection box.

    With ``geom.scale == "session"`` the side follows ``typical_side`` (the session's typical
    white-cell box side) instead of this box; without one it falls back to this box.
    """
    x0, y0, x1, y1 = box
    cell = typical_side if geom.scale == "session" and typical_side else max(x1 - x0, y1 - y0)
    side = cell / geom.cell_fraction
    side = int(round(max(side, geom.min_side_px)))
    return int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2)), side


def cut_crop(
    frame: np.ndarray, box: Sequence[float], geom: CropGeometry, typical_side: float | None = None
) -> np.ndarray:
    """Cut the square crop around ``box`` with the bundle's crop geometry.

    Parts outside the frame are filled by ``geom.pad`` (``reflect`` or ``constant``).
    ``typical_side``: the session's typical white-cell box side, used when ``geom.scale`` is
    ``"session"`` (see ``CropGeometry``).
    """
    cx, cy, side = crop_box(box, frame.shape, geom, typical_side)
    h, w = frame.shape[:2]
    x0, y0 = cx - side // 2, cy - side // 2
    x1, y1 = x0 + side, y0 + side
    pads = (max(0, -y0), max(0, y1 - h), max(0, -x0), max(0, x1 - w))
    inner = frame[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    if not any(pads):
        return np.ascontiguousarray(inner)
    mode = "reflect" if geom.pad == "reflect" and min(inner.shape[:2]) > max(pads) else "edge"
    if geom.pad == "constant":
        return np.pad(inner, ((pads[0], pads[1]), (pads[2], pads[3]), (0, 0)), mode="constant", constant_values=255)
    return np.pad(inner, ((pads[0], pads[1]), (pads[2], pads[3]), (0, 0)), mode=mode)
