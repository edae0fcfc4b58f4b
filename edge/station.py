"""The station, assembled in one place: bundle, segmenter, quality check, tracker, crop geometry, preprocessing
and backend.

``Station.from_bundle(...)`` is what every command and evaluation uses (``count``, ``collect``, ``bench``,
``evaluate --station``), so a change of crop geometry, segmentation or preprocessing reaches every path::

    with Station.from_bundle("bloodcnn5") as station:          # loads the backend
        finder = station.cell_finder(source)                 # segment -> track -> crops
        found = finder.find(frame)
        predictions = station.predict(found.crops)           # preprocess -> classify -> Prediction records

``hemaedge.edge.counting`` runs these stages in its two threads.
"""

from __future__ import annotations

import collections
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from hemaedge.edge.bundle import Bundle, load_bundle, preprocess
from hemaedge.edge.bundle.class_groups import default_class_groups
from hemaedge.edge.bundle.manifest import CropGeometry
from hemaedge.edge.bundle.preprocess import SessionStain, StainEstimate, even_sample
from hemaedge.edge.classify.views import expand as expand_views
from hemaedge.edge.classify.views import merge as merge_views
from hemaedge.edge.count import SlideTracker
from hemaedge.edge.count.tracking import Registration, TrackedDetection
from hemaedge.edge.errors import InputError
from hemaedge.edge.records import CellKind, Crop, Detection, Frame, Prediction, SkipReason
from hemaedge.edge.segment.crops import central_detection, cut_crops, cut_rgb

# A platelet crop is cut as large as a white cell's crop would be in that frame (the training images of platelets,
# PBC / BloodMNIST, are taken at the white cells' magnification, so a platelet is small in its crop). The white-cell
# box side is the median of those seen recently; before any has been seen, it is the platelet box side times this
# ratio: the median over frames of (median white-cell box side / platelet box side) of StainSegmenter's own
# detections on BCCD train + TXL-PBC half "a" was 4.28 (IQR 3.5-5.3; per source BCCD 4.2-4.7, PBC 4.2, Raabin 4.9).
PLATELET_TO_WBC = 4.3
WBC_SIDES_KEPT = 50  # recent white-cell box sides: their median is the session scale (platelet and "session" crops)
# Still images no larger than this on either side are single-cell pictures (analysers export 360 px ones).
SINGLE_CELL_PX = 400
PRIME_IMAGES = 32  # images of a still-image folder sampled to measure the session before counting it
# ONNX Runtime threads: all cores but one, which the capture thread (segmentation, registration) needs.
DEFAULT_THREADS = max(1, (os.cpu_count() or 2) - 1)


class SegmenterLike(Protocol):
    """What the pipeline needs from a segmenter (``hemaedge.edge.segment``)."""

    def detect(self, frame: Frame) -> list[Detection]: ...


# ---------------------------------------------------------------------------------------------------------------------
# backend seam
# ---------------------------------------------------------------------------------------------------------------------
def make_backend(
    bundle: Bundle, preference: str = "auto", precision: str = "auto", threads: int = 0
) -> tuple[Any, str]:
    """The classification backend for a bundle: ``(backend not yet entered, one line saying why)``.

    The one seam between the pipeline and backend choice: ``hemaedge.edge.classify.select``
    picks among TensorRT / ONNX Runtime providers when it is installed.
    """
    try:
        from hemaedge.edge.classify.select import select_backend
    except ImportError:  # pragma: no cover - select.py ships with the package
        from hemaedge.edge.classify.onnxruntime import OrtBackend

        prec = "int8" if precision == "auto" and "int8" in bundle.manifest.precisions() else precision
        prec = "fp32" if prec == "auto" else prec
        return OrtBackend(bundle, prec, threads=threads), f"ONNX Runtime ({prec})"
    return select_backend(bundle, preference, precision, threads=threads)


def is_stills(source: Any) -> bool:
    """Is the source a set of still images (no later view of a cell cut by the border)?"""
    from hemaedge.edge.sources import ImageFilesSource

    return isinstance(source, ImageFilesSource)


def make_quality_check(source: Any) -> Callable[[Frame], Any]:
    """The frame-quality check for a source.

    A stream (camera, video, synthetic slide) gets a ``QualityMonitor``, which learns
    this camera's in-focus sharpness and flags frames well below it; a set of still
    images (possibly from several microscopes) gets the absolute ``assess_quality``.
    """
    from hemaedge.edge.segment import QualityMonitor, assess_quality

    return assess_quality if is_stills(source) else QualityMonitor()


# ---------------------------------------------------------------------------------------------------------------------
# capture side: frame -> new cells
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Found:
    """What one frame yielded.

    Attributes:
        frame: The frame.
        registration: Where it lies on the slide (None: could not be placed).
        new: Cells not seen before (to classify and count).
        crops: Their crops (RGB, cut with the bundle's geometry), same order as ``new``.
        seen: Detections of cells already known.
        at_edge: Detections cut by the frame border (counted later, when fully in view).
        skipped: ``""``, or why the frame was not segmented (a ``SkipReason``: quality, busy, unplaced).
        reason: The quality problem, for a warning.
    """

    frame: Frame
    registration: Registration | None
    new: tuple[TrackedDetection, ...] = ()
    crops: tuple[Crop, ...] = ()
    seen: int = 0
    at_edge: int = 0
    skipped: SkipReason | str = ""
    reason: str = ""


def platelet_classes(bundle: Bundle) -> tuple[str, ...]:
    """The bundle's platelet classes (its ``class_groups["platelets"]``, else the default grouping of its classes)."""
    m = bundle.manifest
    groups = m.class_groups or default_class_groups(m.classes)
    return tuple(groups.get("platelets", ()))


class CellFinder:
    """Finds the new white cells (and, when asked, platelets) of a frame and cuts their crops.

    Single-cell images (``single_cell_px``): a still image no larger than that on either side is one analyser
    cell picture (CellaVision exports them at 360 px): only the cell nearest its centre is counted (neighbours
    cut by the picture's edge belong to other pictures), the image is its own field, and an image whose centre
    holds no cell is reported as not usable.

    Args:
        segmenter: Has ``detect(frame) -> list[Detection]``; ``kind == "wbc"`` detections are used, and
            ``kind == "platelet"`` ones with ``platelets``.
        geometry: The bundle's crop geometry.
        tracker: De-duplicates cells across frames (default: a fresh :class:`SlideTracker`).
        quality: ``f(frame) -> Quality`` with ``ok`` and ``reason``; None accepts every frame.
        platelets: Also find platelets (see :meth:`use_platelets`).
        single_cell_px: Treat still images up to this size as single-cell pictures (0: never; a moving view
            never holds them).
    """

    def __init__(
        self,
        segmenter: SegmenterLike,
        geometry: CropGeometry,
        tracker: SlideTracker | None = None,
        quality: Callable[[Frame], Any] | None = None,
        platelets: bool = False,
        single_cell_px: int = 0,
    ):
        self.segmenter = segmenter
        self.single_cell_px = single_cell_px
        self.geometry = geometry
        self.tracker = tracker or SlideTracker()
        self.quality = quality
        self.platelets = False
        self._wbc_sides: collections.deque = collections.deque(maxlen=WBC_SIDES_KEPT)
        self.stain = SessionStain()  # the session's stain strength, for bundles that normalise it
        if platelets:
            self.use_platelets(True)

    def use_platelets(self, on: bool = True) -> None:
        """Find platelets too (or not): a segmenter with ``with_platelets`` (``StainSegmenter``) is switched
        over; any other segmenter's ``kind == "platelet"`` detections are simply kept."""
        switch = getattr(self.segmenter, "with_platelets", None)
        if switch is not None:
            self.segmenter = switch(on)
        self.platelets = on

    @property
    def typical_side(self) -> float | None:
        """The median side of the recent white-cell boxes (the session's scale), None before any."""
        return float(np.median(self._wbc_sides)) if self._wbc_sides else None

    def platelet_side(self, box: tuple[float, float, float, float]) -> float:
        """The white-cell box side that sizes a platelet's crop (see ``PLATELET_TO_WBC``)."""
        typical = self.typical_side
        return typical if typical else PLATELET_TO_WBC * max(box[2] - box[0], box[3] - box[1])

    def cut(self, frame: Frame, detections: list[Detection]) -> tuple[Crop, ...]:
        """Crops of ``detections``: white cells with the bundle's geometry (at the session's scale when
        ``geometry.scale == "session"``), platelets as large as a white cell's."""
        typical = self.typical_side
        if all(d.kind != CellKind.PLATELET for d in detections):
            return tuple(cut_crops(frame, detections, self.geometry, typical))
        out = []
        for d in detections:
            box = d.box
            if d.kind == CellKind.PLATELET:
                cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, self.platelet_side(box) / 2
                box = (cx - half, cy - half, cx + half, cy + half)
                out.append(Crop(cut_rgb(frame, box, replace(self.geometry, scale="cell")), d, frame.index, frame.name))
            else:
                out.append(Crop(cut_rgb(frame, box, self.geometry, typical), d, frame.index, frame.name))
        return tuple(out)

    def prime(self, paths: Sequence[Any], spec: Any) -> int:
        """Measure the session on an even sample of a folder of still images before counting it (``PRIME_IMAGES``).

        An analyser's export is sorted by class, so the running medians that set the session's scale, typical cell
        side and stain strength would otherwise start from one class (the basophils first). The sampled cells are
        not counted here; they are counted when their image comes. Returns the white cells measured.
        """
        from hemaedge.edge.sources.files import read_image

        idx = even_sample(len(paths), PRIME_IMAGES)
        found = []
        for i in idx:
            try:
                bgr = read_image(paths[i])
            except InputError:
                continue  # reported when its turn comes
            frame = Frame(bgr, "BGR", 0.0, "prime", 0, str(paths[i]))
            dets = [d for d in self.segmenter.detect(frame) if d.kind == CellKind.WBC]
            if self.is_single_cell(frame):
                det = central_detection(dets, bgr.shape)
                dets = [det] if det is not None else []
            found.append((frame, dets))
        self._wbc_sides.extend(max(d.box[2] - d.box[0], d.box[3] - d.box[1]) for _, dets in found for d in dets)
        crops = [c.pixels for frame, dets in found for c in cut_crops(frame, dets, self.geometry, self.typical_side)]
        if getattr(spec, "stain_ref", 0):
            self.stain.add_crops(crops, spec)
        return len(crops)

    def is_single_cell(self, frame: Frame) -> bool:
        """Is this frame a single-cell picture (see the class docstring)?"""
        return bool(self.single_cell_px) and max(frame.pixels.shape[:2]) <= self.single_cell_px

    def find(self, frame: Frame, segment: bool = True) -> Found:
        """Process one frame; with ``segment=False`` only register its motion (skip policy)."""
        q = self.quality(frame) if self.quality is not None else None
        ok = bool(q.ok) if q is not None else True
        reason = str(getattr(q, "reason", "") or "") if q is not None else ""
        if self.is_single_cell(frame):
            return self._find_single(frame, ok, reason)
        reg = self.tracker.register(frame.pixels, may_start_field=ok)
        if not ok:
            return Found(frame, reg, skipped=SkipReason.QUALITY, reason=reason or "poor image quality")
        if not segment:
            return Found(frame, reg, skipped=SkipReason.BUSY)
        if reg is None:  # pragma: no cover - a good frame always gets a field
            return Found(frame, None, skipped=SkipReason.UNPLACED)
        kinds = (CellKind.WBC, CellKind.PLATELET) if self.platelets else (CellKind.WBC,)
        dets = [d for d in self.segmenter.detect(frame) if d.kind in kinds]
        # every white cell in view (counted before or not) tells the session's scale
        self._wbc_sides.extend(max(d.box[2] - d.box[0], d.box[3] - d.box[1]) for d in dets if d.kind == CellKind.WBC)
        res = self.tracker.place(reg, frame.pixels.shape, [d.box for d in dets])
        crops = self.cut(frame, [dets[t.index] for t in res.new]) if res.new else ()
        return Found(frame, reg, res.new, crops, res.seen, res.at_edge)

    def _find_single(self, frame: Frame, ok: bool, reason: str) -> Found:
        """A single-cell picture: its own field (a stable id from its name, so a resumed session does not count
        it twice), only the cell nearest its centre."""
        reg = Registration(zlib.crc32(frame.name.encode()) & 0x7FFFFFFF, 0.0, 0.0, 1.0, "single-cell image")
        if not ok:
            return Found(frame, reg, skipped=SkipReason.QUALITY, reason=reason or "poor image quality")
        kinds = (CellKind.WBC, CellKind.PLATELET) if self.platelets else (CellKind.WBC,)
        det = central_detection([d for d in self.segmenter.detect(frame) if d.kind in kinds], frame.pixels.shape)
        if det is None:
            return Found(frame, reg, skipped=SkipReason.QUALITY, reason="no cell found at the centre of the picture")
        if det.kind == CellKind.WBC:
            self._wbc_sides.append(max(det.box[2] - det.box[0], det.box[3] - det.box[1]))
        res = self.tracker.place(reg, frame.pixels.shape, [det.box])
        crops = self.cut(frame, [det]) if res.new else ()
        return Found(frame, reg, res.new, crops, res.seen, 0)


# ---------------------------------------------------------------------------------------------------------------------
# classification: crops -> Prediction records
# ---------------------------------------------------------------------------------------------------------------------
def predictions(probabilities: np.ndarray, classes: Sequence[str]) -> list[Prediction]:
    """One ``Prediction`` per row of class probabilities (top class, its probability, all probabilities)."""
    out = []
    for p in np.asarray(probabilities, np.float32):
        k = int(np.argmax(p))
        out.append(Prediction(k, classes[k], float(p[k]), p))
    return out


def classify_crops(
    backend: Any, bundle: Bundle, crops: Sequence[Crop | np.ndarray], stain: SessionStain | StainEstimate | None = None
) -> list[Prediction]:
    """Preprocess crops (RGB) with the bundle's one preprocessing function and classify them with an entered backend.

    ``stain``: for a bundle with session stain normalisation (``input.stain_ref``), the session's
    ``SessionStain`` (its white-cell crops here are added to it first; platelet crops are not) or its
    ``StainEstimate``; None takes these crops as the session. A bundle with ``views`` > 1 has each crop classified
    in that many views (flipped, turned) and their probabilities averaged (``edge/classify/views.py``).
    """
    if not len(crops):
        return []
    spec = bundle.manifest.input
    pixels = [c.pixels if isinstance(c, Crop) else c for c in crops]
    platelet = [isinstance(c, Crop) and c.detection.kind == CellKind.PLATELET for c in crops]
    if spec.stain_ref and isinstance(stain, SessionStain) and any(platelet):  # else preprocess adds them itself
        stain.add_crops([p for p, flat in zip(pixels, platelet) if not flat], spec)
        stain = stain.estimate
    batch = preprocess(pixels, spec, "RGB", stain)
    views = bundle.manifest.views  # test-time views: each crop as it is and flipped / turned, averaged
    return predictions(merge_views(backend.classify(expand_views(batch, views)), views), bundle.manifest.classes)


# ---------------------------------------------------------------------------------------------------------------------
# the station
# ---------------------------------------------------------------------------------------------------------------------
def resolve_bundle(bundle: Bundle | str | os.PathLike | None) -> Bundle:
    """A loaded bundle from a bundle, a folder, a shipped bundle's name, or None (the shipped default)."""
    if isinstance(bundle, Bundle):
        return bundle
    from hemaedge.edge.bundle.io import resolve
    from hemaedge.edge.models import default_bundle_path

    return load_bundle(resolve(bundle) if bundle is not None else default_bundle_path())


@dataclass
class Station:
    """The stages that turn frames into classified cells, assembled from one bundle.

    Attributes:
        bundle: The model bundle (classes, input spec, crop geometry).
        segmenter: Finds white cells (and platelets) in a frame.
        backend: Runs the model; not loaded until the station is entered (``with station:``). None when the
            station only cuts crops (``hemaedge collect`` without a model).
        backend_reason: One line saying which backend runs and why.
        segmenter_name: The segmenter's name, for reports.
    """

    bundle: Bundle
    segmenter: SegmenterLike
    backend: Any = None
    backend_reason: str = ""
    segmenter_name: str = "stain"

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | str | os.PathLike | None = None,
        *,
        segmenter: str | None = None,
        backend: str | None = "auto",
        precision: str = "auto",
        threads: int = DEFAULT_THREADS,
        scale: float | None = None,
        detector: str | os.PathLike | None = None,
    ) -> Station:
        """Assemble the station for a bundle (cheap: nothing is loaded until ``__enter__``).

        Args:
            bundle: A loaded bundle, a bundle folder, a shipped bundle's name, or None for the shipped default.
            segmenter: The white-cell segmenter's name (``hemaedge.edge.segment.SEGMENTERS``); None: the default
                (``default_segmenter_name``: the detector checked against the stain segmenter when the detector's
                bundle is installed, else stain).
            backend: ``auto`` or a backend name (``hemaedge.edge.classify.select``); None: no model (crops only).
            precision: ``auto``, ``int8``, ``fp16`` or ``fp32``.
            threads: ONNX Runtime intra-op threads (default: all cores but one).
            scale: The session's pixels per micron, stated by the user; None: measured on the red cells.
            detector: The detector bundle of ``segmenter="checked"`` or ``"learned"`` (default: the shipped one).
        """
        from hemaedge.edge.segment import DETECTOR_SEGMENTERS, default_segmenter_name, make_segmenter

        b = resolve_bundle(bundle)
        segmenter = segmenter or ("checked" if detector is not None else default_segmenter_name())
        if detector is not None and segmenter not in DETECTOR_SEGMENTERS:
            from hemaedge.edge.errors import UsageError

            raise UsageError("a detector bundle is for --segmenter checked or learned")
        seg = make_segmenter(segmenter, scale=scale, **({"bundle": detector} if detector is not None else {}))
        runner, why = make_backend(b, backend, precision, threads=threads) if backend is not None else (None, "")
        return cls(b, seg, runner, why, segmenter)

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> Station:
        if self.backend is not None:
            self.backend.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.backend is not None:
            self.backend.__exit__(*exc)

    # -- what it is ----------------------------------------------------------------------------------------------------
    @property
    def manifest(self):  # noqa: ANN201 - Manifest
        """The bundle's manifest."""
        return self.bundle.manifest

    @property
    def geometry(self) -> CropGeometry:
        """How crops are cut around a detected cell (the bundle's crop geometry)."""
        return self.bundle.manifest.crop

    @property
    def precision(self) -> str:
        """The precision the backend runs (``""`` without a backend)."""
        return str(getattr(self.backend, "precision", "")) if self.backend is not None else ""

    @property
    def backend_name(self) -> str:
        """The backend's name (``""`` without a backend)."""
        return str(getattr(self.backend, "name", type(self.backend).__name__)) if self.backend is not None else ""

    @property
    def triage_rules(self):  # noqa: ANN201 - TriageRules | None
        """The bundle's slide-triage rules (``triage.json``), None when it has none (it cannot see blasts)."""
        if not hasattr(self, "_triage_rules"):
            from hemaedge.edge.count.triage import rules_for_bundle

            self._triage_rules = rules_for_bundle(self.bundle)
        return self._triage_rules

    @property
    def platelet_classes(self) -> tuple[str, ...]:
        """The bundle's platelet classes (empty: the model cannot tell platelets)."""
        return platelet_classes(self.bundle)

    # -- the stages ----------------------------------------------------------------------------------------------------
    def tracker(self, source: Any, count_edge_cells: bool = False) -> SlideTracker:
        """A slide tracker for a source: cells cut by the frame border wait for a full view on a moving slide;
        still images (no later view) and ``count_edge_cells`` count them at once."""
        return SlideTracker(edge_margin=-1 if count_edge_cells or is_stills(source) else 2)

    def cell_finder(
        self,
        source: Any,
        *,
        count_edge_cells: bool = False,
        tracker: SlideTracker | None = None,
        platelets: bool = False,
    ) -> CellFinder:
        """The capture-side stages for a source: quality check, tracker, segmenter and the bundle's crop geometry.

        For a folder of still images and a bundle with session stain normalisation, the session is measured on an
        even sample of the folder first (``CellFinder.prime``)."""
        finder = CellFinder(
            self.segmenter,
            self.geometry,
            tracker or self.tracker(source, count_edge_cells),
            make_quality_check(source),
            platelets=platelets,
            single_cell_px=SINGLE_CELL_PX if is_stills(source) else 0,
        )
        if is_stills(source) and self.manifest.input.stain_ref:
            finder.prime(list(source.paths), self.manifest.input)
        return finder

    def predict(
        self, crops: Sequence[Crop | np.ndarray], stain: SessionStain | StainEstimate | None = None
    ) -> list[Prediction]:
        """Classify crops (RGB) through the one preprocessing function and the backend (the station must be entered);
        ``stain`` as for ``classify_crops``."""
        if self.backend is None:
            raise RuntimeError("this station was assembled without a model (backend=None)")
        return classify_crops(self.backend, self.bundle, crops, stain)


__all__ = [
    "DEFAULT_THREADS",
    "CellFinder",
    "Found",
    "Station",
    "classify_crops",
    "is_stills",
    "make_backend",
    "make_quality_check",
    "platelet_classes",
    "predictions",
    "resolve_bundle",
]
