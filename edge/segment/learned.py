"""The learned white-cell detector: a detector bundle run with ONNX Runtime (numpy + cv2, no torch).

A detector bundle (``"task": "detect"`` in its manifest) holds a small fully convolutional net trained
at one working scale (``detector.px_per_um``). Each frame is:

1. brought to that scale: the session's pixels per micron (measured on red cells over the first
   frames, ``hemaedge.edge.segment.scale``, or stated by the user; ``scale="frame"`` measures every
   frame, for still images from several microscopes) gives the resize factor;
2. white-balanced (the stain segmenter's ``white_balance``), padded to a multiple of
   ``detector.pad_multiple`` with white-balanced background, normalised with the manifest's mean/std;
3. run; the output at ``detector.stride`` holds a centre heatmap logit, log box width and height
   (stride units) and the centre's sub-cell offset;
4. decoded: heatmap peaks (3 x 3 local maxima) above ``detector.threshold``, boxes from size and
   offset, overlapping boxes (IoU above ``detector.nms_iou``) suppressed, mapped back to frame pixels.

``LearnedSegmenter`` returns the same ``Detection`` records as ``StainSegmenter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.bundle.manifest import Manifest
from hemaedge.edge.errors import BundleError, UsageError
from hemaedge.edge.records import Detection, Frame
from hemaedge.edge.segment.base import as_frame, boxes_of, touching
from hemaedge.edge.segment.scale import Scale, SessionScale, estimate_scale, frame_guess

EYEPIECE_TRIES = (0.7, 0.5)  # scales tried, as shares of the red-cell scale, on a picture through an eyepiece
POOL_CELLS = 10  # white cells a session pools before its white cells check its red-cell scale
POOL_LIMIT = 1.5  # ... and corrects it when their median is further than this from its usual size
RULER_SHARE = 0.5  # white cells that measure the scale are taken down to this share of the threshold
BACKGROUND = 235  # white-balanced background (``white_balance``'s target): the padding colour


@dataclass(frozen=True)
class DetectorSpec:
    """The ``detector`` section of a detector bundle's manifest.

    Attributes:
        px_per_um: The working scale the net was trained at (frames are resized to it).
        stride: Output cell size in working pixels.
        threshold: Smallest heatmap peak (0..1) that is a white cell.
        nms_iou: Boxes overlapping a better one by more than this are dropped.
        pad_multiple: Working images are padded to a multiple of this.
        max_cells: At most this many cells per frame.
        max_side: The working image's long side is capped at this (a frame at a much finer scale than
            the station expects is shrunk further rather than run at a huge size).
        wbc_um: The median white-cell box side (micrometres) of the training frames at the working scale:
            the second ruler (``LearnedSegmenter.wbc_check``).
        outputs: What the output channels hold (documentation).
    """

    px_per_um: float
    stride: int = 4
    threshold: float = 0.3
    nms_iou: float = 0.5
    pad_multiple: int = 16
    max_cells: int = 200
    max_side: int = 1600
    wbc_um: float = 13.8
    outputs: tuple[str, ...] = ("centre_logit", "log_w", "log_h", "dx", "dy")

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> DetectorSpec:
        """Read and check a manifest's ``detector`` section (BundleError when it is not a detector bundle)."""
        if manifest.extra.get("task", "classify") != "detect":
            raise BundleError(f"bundle '{manifest.name}' is not a detector bundle (its task is not 'detect')")
        d = manifest.extra.get("detector")
        if not isinstance(d, dict):
            raise BundleError(f"detector bundle '{manifest.name}' has no 'detector' section in its manifest")
        try:
            spec = cls(
                px_per_um=float(d["px_per_um"]),
                stride=int(d.get("stride", 4)),
                threshold=float(d.get("threshold", 0.3)),
                nms_iou=float(d.get("nms_iou", 0.5)),
                pad_multiple=int(d.get("pad_multiple", 16)),
                max_cells=int(d.get("max_cells", 200)),
                max_side=int(d.get("max_side", 1600)),
                wbc_um=float(d.get("wbc_um", 13.8)),
                outputs=tuple(d.get("outputs", cls.outputs)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"detector bundle '{manifest.name}': malformed 'detector' section ({exc})") from exc
        if not spec.px_per_um > 0 or spec.stride < 1 or not 0 < spec.threshold < 1 or spec.pad_multiple < 1:
            raise BundleError(f"detector bundle '{manifest.name}': 'detector' values out of range: {d}")
        return spec


def prepare(
    bgr: np.ndarray, factor: float, spec: DetectorSpec, mean: tuple, std: tuple
) -> tuple[np.ndarray, tuple[int, int]]:
    """The net's input for a BGR frame resized by ``factor``: ``1 x 3 x H x W`` float32 and the unpadded size."""
    import cv2
    from hemaedge.edge.segment.stain import white_balance_lut

    h, w = bgr.shape[:2]
    nw, nh = max(1, int(round(w * factor))), max(1, int(round(h * factor)))
    small = (
        bgr
        if (nw, nh) == (w, h)
        else cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    )
    # white balance, then (v / 255 - mean) / std per channel: both map each channel's 256 levels, so one float look-up
    # table does the two (the same float32 steps on each level as on each pixel, so the same values), in BGR order
    lut = white_balance_lut(small)
    levels = (lut if lut is not None else np.arange(256, dtype=np.uint8).reshape(256, 1, 1)).astype(np.float32)
    bgr_mean, bgr_std = np.asarray(mean, np.float32)[::-1], np.asarray(std, np.float32)[::-1]
    levels = np.broadcast_to(levels, (256, 1, 3)).copy()
    levels *= np.float32(1.0 / 255.0)
    levels -= bgr_mean
    levels /= bgr_std
    x = cv2.LUT(small, levels)
    m = spec.pad_multiple
    ph, pw = -nh % m, -nw % m
    if ph or pw:  # the padding is background grey, not balanced: its normalised value, computed the same way
        pad = np.full(3, BACKGROUND, np.float32) * np.float32(1.0 / 255.0)
        pad = (pad - bgr_mean) / bgr_std
        x = cv2.copyMakeBorder(x, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=tuple(float(v) for v in pad))
    return np.ascontiguousarray(x.transpose(2, 0, 1)[::-1][None]), (nh, nw)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while len(order):
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        x0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        ov = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[ov <= iou]
    return np.asarray(keep, np.int64)


def decode(
    out: np.ndarray, spec: DetectorSpec, size: tuple[int, int], threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N x 4, working pixels, clipped to ``size`` = (h, w)) and scores of one output ``5 x h x w``."""
    import cv2

    thr = spec.threshold if threshold is None else threshold
    logit = out[0].astype(np.float32)
    heat = 1.0 / (1.0 + np.exp(-logit))
    top = cv2.dilate(heat, np.ones((3, 3), np.uint8))
    ys, xs = np.nonzero((heat >= top) & (heat >= thr))
    if not len(ys):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    scores = heat[ys, xs]
    s = float(spec.stride)
    bw = np.exp(np.clip(out[1, ys, xs], -4, 6)) * s
    bh = np.exp(np.clip(out[2, ys, xs], -4, 6)) * s
    cx = (xs + out[3, ys, xs]) * s
    cy = (ys + out[4, ys, xs]) * s
    h, w = size
    boxes = np.stack(
        [
            np.clip(cx - bw / 2, 0, w),
            np.clip(cy - bh / 2, 0, h),
            np.clip(cx + bw / 2, 0, w),
            np.clip(cy + bh / 2, 0, h),
        ],
        1,
    ).astype(np.float32)
    ok = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)
    boxes, scores = boxes[ok], scores[ok]
    keep = nms(boxes, scores, spec.nms_iou)[: spec.max_cells]
    return boxes[keep], scores[keep].astype(np.float32)


def to_frame(boxes: np.ndarray, work: tuple[int, int], frame: tuple[int, int]) -> np.ndarray:
    """Boxes in working pixels (image ``work`` = (h, w)) mapped to frame pixels (``frame`` = (h, w))."""
    sx, sy = frame[1] / work[1], frame[0] / work[0]
    return (boxes * np.asarray([sx, sy, sx, sy], np.float32)).astype(np.float32)


class LearnedSegmenter:
    """White cells found by a detector bundle (see the module docstring).

    Args:
        bundle: A loaded detector ``Bundle`` or its path (a shipped bundle's name works too).
        scale: ``None`` measures the session's scale on its first frames; a number is the stated
            pixels per micron; ``"frame"`` measures every frame (stills from several microscopes).
        precision: ``"int8"`` (default when the bundle has it) or ``"fp32"``.
        threads: ONNX Runtime intra-op threads (0: its default).
        threshold: Override the bundle's heatmap threshold.
    """

    name = "learned"

    def __init__(
        self,
        bundle: Any = None,
        scale: float | str | None = None,
        precision: str = "auto",
        threads: int = 1,
        threshold: float | None = None,
    ):
        from hemaedge.edge.bundle import load_bundle

        if bundle is None:
            from hemaedge.edge.models import default_detector_path

            bundle = default_detector_path()
        self.bundle = bundle if hasattr(bundle, "manifest") else load_bundle(bundle)
        m = self.bundle.manifest
        self.spec = DetectorSpec.from_manifest(m)
        if threshold is not None:
            if not 0 < threshold < 1:
                raise UsageError(f"detector threshold must be within 0..1, not {threshold}")
            self.spec = DetectorSpec(**{**self.spec.__dict__, "threshold": float(threshold)})
        precs = m.precisions()
        self.precision = ("int8" if "int8" in precs else "fp32") if precision == "auto" else precision
        if self.precision not in precs:
            raise UsageError(f"detector bundle '{m.name}' has no {self.precision} model (it has {', '.join(precs)})")
        self._setup(m.input.mean, m.input.std, scale, threads, None)

    def _setup(self, mean: tuple, std: tuple, scale: float | str | None, threads: int, model: Path | None) -> None:
        self.mean, self.std = mean, std
        if isinstance(scale, str) and scale != "frame":
            raise UsageError(f"scale must be pixels per micron or 'frame', not {scale!r}")
        self.per_frame = scale == "frame"
        self.session = SessionScale(None if scale in (None, "frame") else float(scale))
        self.last_scale: Scale | None = None
        self.threads = threads
        self._model = model
        self._session: Any = None
        self.runtime_note = ""  # why ONNX Runtime runs its basic graph optimisations (``cpu_session``), if it does
        self._pool: list[float] = []  # white-cell box sides (um) seen at the session's scale
        self._pool_done = False
        self._eyepiece: list[float] = []  # the eyepiece search's choices on the session's first frames
        self._eyepiece_done = False

    @classmethod
    def from_model(
        cls, model: Path, spec: DetectorSpec, mean: tuple, std: tuple, scale: float | str | None = "frame"
    ) -> LearnedSegmenter:
        """A segmenter running an ONNX file that is not in a bundle yet (export scores its models with it)."""
        self = cls.__new__(cls)
        self.bundle, self.spec, self.precision = None, spec, "onnx"
        self._setup(mean, std, scale, 1, Path(model))
        return self

    def with_platelets(self, on: bool = True) -> Any:
        """This detector with platelets found by the stain segmenter (the detector knows white cells only)."""
        if not on:
            return self
        return WithStainPlatelets(self)

    @property
    def model_path(self) -> Path:
        """The ONNX file this segmenter runs (the CPU INT8 variant when there is one)."""
        return self._model or self.bundle.onnx_path(self.precision, target="cpu")

    def _ort(self) -> Any:
        if self._session is None:
            from hemaedge.edge.classify.onnxruntime import cpu_session, session_options

            def options(level: str) -> Any:
                return session_options(level, self.threads, inter_threads=1 if self.threads else 0)

            distance = None
            if self.bundle is not None and self.precision == "int8":  # FP32 computes alike at every level
                distance = lambda sess: golden_comparison(self, sess)["raw_max_abs_diff"]  # noqa: E731
            self._session, self.runtime_note = cpu_session(self.model_path, options, distance)
            self._input = self._session.get_inputs()[0].name
        return self._session

    @property
    def scale(self) -> Scale | None:
        """The scale in use: the session's (fixed after its first frames, or stated) or the last frame's."""
        return self.last_scale if self.per_frame else (self.session.current or self.last_scale)

    def frame_scale(self, bgr: np.ndarray) -> Scale:
        """The scale to use for this frame."""
        if self.per_frame:
            return estimate_scale(bgr) or frame_guess(bgr.shape)
        return self.session.observe(bgr)

    def run(
        self, bgr: np.ndarray, scale: Scale, threshold: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Raw detection on a BGR frame at a known scale: boxes (frame pixels), scores, and the resize factor
        (``threshold``: keep peaks down to this instead of the bundle's threshold)."""
        h, w = bgr.shape[:2]
        f = scale.factor_to(self.spec.px_per_um)
        f = min(f, self.spec.max_side / max(h, w))
        x, size = prepare(bgr, f, self.spec, self.mean, self.std)
        out = self._ort().run(None, {self._input: x})[0][0]
        boxes, scores = decode(out, self.spec, size, threshold)
        return to_frame(boxes, size, (h, w)), scores, f

    def eyepiece_search(self, bgr: np.ndarray, scale: Scale) -> Scale:
        """A picture through an eyepiece (a field stop in view) is searched for its scale with the detector.

        Such pictures are taken at low magnification, often blurred: red cells merge and measure too big
        (the frame then shrinks too much). The detector runs at the red-cell scale and at ``EYEPIECE_TRIES``
        of it; the scale at which it is sure of the most white cells wins. Not for a stated scale nor for frames
        without a field stop (a microscope camera). A session searches its first frames and keeps the median
        choice (``_eyepiece_done`` after the session's scale is fixed).
        """
        from hemaedge.edge.segment.scale import field_mask, round_stop

        if scale.source == "user":
            self._eyepiece_done = True
            return scale
        if not self.per_frame and self.session.fixed:
            self._eyepiece_done = True
            if self._eyepiece and float(np.median(self._eyepiece)) != 1.0:
                k = float(np.median(self._eyepiece))
                fixed = Scale(scale.px_per_um * k, "measured+wbc", 0.0, scale.frames, scale.cells, scale.spread)
                self.session.correct(fixed)
                return fixed
            return scale
        field = field_mask(bgr)
        if field is None or not round_stop(field):  # no surround, or the straight edges of padding
            return scale
        best, best_n = 1.0, -1
        for k in (1.0, *EYEPIECE_TRIES):
            _, scores, _ = self.run(bgr, Scale(scale.px_per_um * k, scale.source), self.spec.threshold)
            if len(scores) > best_n:
                best, best_n = k, len(scores)
        if not self.per_frame:
            self._eyepiece.append(best)
        if best == 1.0:
            return scale
        return Scale(scale.px_per_um * best, "measured+wbc", 0.0, scale.frames, scale.cells, scale.spread)

    def wbc_check(self, boxes: np.ndarray, scores: np.ndarray, scale: Scale) -> Scale | None:
        """The white cells as a second ruler: a corrected scale when those found are far from their usual size.

        White cells are 10-20 um across, a wider spread than red cells, but where the red cells could not be
        measured well (dense or blurred fields: they merge, and come out too big) the cells the detector still
        finds tell the scale: their median box side over ``detector.wbc_um`` is the correction. It applies when
        five or more cells above the threshold are off by more than 1.3x or, with fewer sure cells, eight or more
        down to ``RULER_SHARE`` of the threshold (at a wrong scale the detector is less sure); never to a stated
        scale, and never on one to four cells: a lymphocyte is the size of a red cell, a monocyte twice that.
        """
        if scale.source == "user":
            return None
        low = scores >= RULER_SHARE * self.spec.threshold
        high = scores >= self.spec.threshold
        if high.sum() >= 5:
            boxes, limit = boxes[high], 1.3
        elif low.sum() >= 8:  # few sure cells but many unsure ones: a field of small cells at a wrong scale
            boxes, limit = boxes[low], 1.3
        else:
            return None
        sides_um = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / scale.px_per_um
        ratio = float(np.median(sides_um)) / self.spec.wbc_um
        if 1 / limit <= ratio <= limit:
            return None
        return Scale(scale.px_per_um * ratio, "measured+wbc", 0.0, scale.frames, scale.cells, scale.spread)

    def detect(self, frame: Frame | np.ndarray) -> list[Detection]:
        """White cells in ``frame`` (a ``Frame`` or a BGR array), best score first."""
        fr = as_frame(frame)
        bgr = fr.bgr()
        scale = self.frame_scale(bgr)
        ruler = RULER_SHARE * self.spec.threshold  # at a wrong scale the detector is less sure: the ruler looks lower
        if self.per_frame or not self._eyepiece_done:
            scale = self.eyepiece_search(bgr, scale)
        boxes, scores, _ = self.run(bgr, scale, ruler)
        if self.per_frame:  # a still image from any microscope: its own white cells check its own scale
            for _ in range(2):
                better = self.wbc_check(boxes, scores, scale)
                if better is None:
                    break
                scale = better
                boxes, scores, _ = self.run(bgr, scale, ruler)
        elif scale.source != "user" and not self._pool_done:  # a session: its white cells, pooled, check it once
            sure = scores >= self.spec.threshold
            self._pool += (
                np.maximum(boxes[sure, 2] - boxes[sure, 0], boxes[sure, 3] - boxes[sure, 1]) / scale.px_per_um
            ).tolist()
            if len(self._pool) >= POOL_CELLS and self.session.fixed:
                self._pool_done = True
                ratio = float(np.median(self._pool)) / self.spec.wbc_um
                if not 1 / POOL_LIMIT <= ratio <= POOL_LIMIT:
                    scale = Scale(scale.px_per_um * ratio, "measured+wbc", 0.0, scale.frames, scale.cells, scale.spread)
                    self.session.correct(scale)
                    boxes, scores, _ = self.run(bgr, scale, ruler)
        keep = scores >= self.spec.threshold
        boxes, scores = boxes[keep], scores[keep]
        self.last_scale = scale
        return [
            Detection(tuple(float(v) for v in b), round(float(s), 4), "wbc")
            for b, s in zip(boxes.tolist(), scores.tolist())
        ]


class WithStainPlatelets:
    """White cells from the learned detector, platelets from the stain segmenter (``--platelets``).

    The stain segmenter's platelet step (``StainSegmenter._platelets``) keeps small stained blobs away from its
    own white cells; here a platelet inside or touching one of the detector's white-cell boxes is dropped too.
    """

    name = "learned"

    def __init__(self, learned: LearnedSegmenter):
        from hemaedge.edge.segment.stain import StainSegmenter

        self.learned = learned
        self.stain = StainSegmenter(platelets=True)

    def __getattr__(self, item: str) -> Any:  # scale, bundle, spec ... of the detector
        return getattr(self.learned, item)

    def with_platelets(self, on: bool = True) -> Any:
        """Platelets on (this) or off (the detector alone)."""
        return self if on else self.learned

    def detect(self, frame: Frame | np.ndarray) -> list[Detection]:
        """The detector's white cells, then the stain segmenter's platelets outside them."""
        fr = as_frame(frame)
        cells = self.learned.detect(fr)
        platelets = [d for d in self.stain.detect_verbose(fr)[0] if d.kind == "platelet"]
        return cells + [d for d, near in zip(platelets, touching(boxes_of(platelets), boxes_of(cells))) if not near]


def verify_detector(bundle: Any, precision: str = "auto") -> dict[str, Any]:
    """``hemaedge verify`` for a detector bundle: its golden inputs through this station's ONNX Runtime.

    Compares the centre heatmaps (max |difference| of the probabilities) and the decoded boxes (share of the
    workstation's boxes found again at IoU >= 0.5, and the other way round) with the workstation's outputs at
    the precision run here. Passes at heatmap difference <= 0.01 and box agreement >= 0.99 in FP32, 0.15 and 0.9
    in INT8.
    """
    seg = LearnedSegmenter(bundle, precision=precision)
    report = golden_comparison(seg, seg._ort())
    return {
        "bundle": str(seg.bundle.path),
        "task": "detect",
        "backend": "onnxruntime-cpu" + (f" ({seg.runtime_note})" if seg.runtime_note else ""),
        "precision": seg.precision,
        "model_file": seg.model_path.name,
        **report,
    }


def golden_comparison(seg: LearnedSegmenter, session: Any) -> dict[str, Any]:
    """A detector session's outputs for the bundle's golden inputs against the workstation's (``verify_detector``'s
    thresholds; ``passed`` says whether it computes what the workstation did)."""
    from hemaedge.edge.bundle.golden import load_golden
    from hemaedge.edge.segment.matching import match

    golden = load_golden(seg.bundle)
    got = session.run(None, {session.get_inputs()[0].name: golden.inputs})[0]
    variant = seg.bundle.manifest.artifact(seg.precision, "onnx", "cpu").details.get("target")
    key = "int8_cpu" if seg.precision == "int8" and variant == "cpu" and "int8_cpu" in golden.outputs else seg.precision
    if key not in golden.outputs:
        key = "fp32"
    ref = golden.outputs[key].reshape(got.shape)
    heat = lambda a: 1.0 / (1.0 + np.exp(-a[:, 0].astype(np.float64)))  # noqa: E731
    diff = float(np.abs(heat(got) - heat(ref)).max())
    raw = float(np.abs(got.astype(np.float64) - ref).max())
    size = (got.shape[2] * seg.spec.stride, got.shape[3] * seg.spec.stride)
    found = total = 0
    for g, r in zip(got, ref):
        bg, sg = decode(g, seg.spec, size)
        br, sr = decode(r, seg.spec, size)
        tp, _, _ = match(bg, sg, br)
        found += 2 * tp
        total += len(bg) + len(br)
    agreement = found / total if total else 1.0
    max_diff, min_agree = (0.15, 0.9) if key.startswith("int8") else (0.01, 0.99)
    return {
        "reference": key,
        "samples": int(len(golden.inputs)),
        "heatmap_max_abs_diff": round(diff, 6),
        "raw_max_abs_diff": round(raw, 6),
        "box_agreement": round(agreement, 4),
        "boxes": int(total),
        "max_diff": max_diff,
        "min_agreement": min_agree,
        "passed": diff <= max_diff and agreement >= min_agree,
    }


__all__ = [
    "DetectorSpec",
    "LearnedSegmenter",
    "WithStainPlatelets",
    "decode",
    "golden_comparison",
    "nms",
    "prepare",
    "to_frame",
    "verify_detector",
]
