"""``export-model DETECTOR.pt``: a white-cell detector checkpoint -> checked FP32 ONNX -> INT8 (gated) -> bundle.

The same steps as a classifier's export, measured the way a detector is judged:

1. ONNX with a dynamic height and width (the working image's size follows the frame and its scale),
   ``onnx.checker`` + onnxslim, and FP32 parity against PyTorch on real frames brought to the working
   scale (max |difference| of the raw outputs; every decoded box must agree);
2. static INT8 QDQ with ONNX Runtime, calibrated on training frames prepared exactly as the station
   prepares them (measured scale, resize, white balance), cut to ``CALIB_SIDE`` squares; a portable
   symmetric model (TensorRT) and a CPU variant with asymmetric activations, as for classifiers;
3. the gate: recall and precision at IoU >= 0.5 on the gate frames (BCCD val, never trained on, TXL-PBC's val
   folder, and the TXL-PBC frames of any source the checkpoint held out; ``gate_items``) for FP32 and each INT8
   model, each run through
   the station's own ``LearnedSegmenter`` (scale measured per frame, the white cells' check); a model
   losing more than ``max_drop`` points of either is refused (the CPU variant is then left out, the
   portable one fails the export);
4. golden inputs and outputs for ``hemaedge verify``, sha256 of every file, and a manifest with
   ``"task": "detect"`` and a ``detector`` section (working scale, stride, threshold, ...) that
   ``hemaedge.edge.segment.learned`` reads.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.bundle import BundleWriter, CropGeometry, InputSpec, Manifest, sha256_file
from hemaedge.edge.errors import AccuracyGateError, InputError, UsageError
from hemaedge.edge.segment.learned import DetectorSpec, decode, prepare, to_frame
from hemaedge.edge.segment.scale import estimate_scale, frame_guess

CALIB_SIDE = 128
GOLDEN_FRAMES = 4
DEFAULT_THRESHOLD = 0.4


@dataclass
class DetectorExportOptions:
    """What ``export-model`` was asked for, for a detector checkpoint."""

    checkpoint: str
    out: str
    data: str
    int8: bool = True
    calib_size: int = 200
    calib_method: str = "minmax"
    max_drop: float = 1.0
    threshold: float | None = None
    name: str | None = None
    overwrite: bool = False
    seed: int = 0
    command: str = ""


def is_detector_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint written by ``hemaedge train-detector``."""
    p = Path(path)
    if p.suffix.lower() in (".onnx", ".pt2") or not p.is_file():
        return False
    try:
        from hemaedge.export import checkpoint

        return checkpoint.load(p).get("task") == "detect"
    except Exception:  # noqa: BLE001 - anything unreadable is not ours; the classifier path reports it
        return False


def _ort(path: Path, threads: int = 1) -> Any:
    from hemaedge.edge.classify.onnxruntime import reference_session

    return reference_session(path, threads)


class _Frames:
    """Gate / calibration frames read once, with their measured scales and prepared inputs."""

    def __init__(self, items: list, spec: DetectorSpec, mean: tuple, std: tuple):
        import cv2

        self.items, self.inputs, self.sizes, self.shapes = [], [], [], []
        for it in items:
            img = cv2.imread(str(it.path), cv2.IMREAD_COLOR)
            if img is None:
                continue
            scale = estimate_scale(img) or frame_guess(img.shape)
            h, w = img.shape[:2]
            f = min(scale.factor_to(spec.px_per_um), spec.max_side / max(h, w))
            x, size = prepare(img, f, spec, mean, std)
            self.items.append(it)
            self.inputs.append(x)
            self.sizes.append(size)
            self.shapes.append((h, w))

    def outputs(self, run) -> list[np.ndarray]:  # noqa: ANN001
        return [run(x)[0] for x in self.inputs]

    def score(self, outs: list[np.ndarray], spec: DetectorSpec) -> dict[str, Any]:
        from hemaedge.edge.segment.matching import match
        from hemaedge.evaluation.groundtruth import Tally

        tallies: dict[str, Tally] = {"all": Tally()}
        for it, out, size, shape in zip(self.items, outs, self.sizes, self.shapes):
            boxes, scores = decode(out, spec, size)
            c = match(to_frame(boxes, size, shape), scores, it.boxes)
            tallies.setdefault(it.source, Tally()).add(*c)
            tallies["all"].add(*c)
        return {k: v.as_dict() for k, v in tallies.items()}


def _squares(inputs: list[np.ndarray], side: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``side`` x ``side`` cuts of prepared inputs (padded with their own background where smaller)."""
    out = []
    for x in inputs:
        _, c, h, w = x.shape
        pad_val = x[0, :, -1, -1].reshape(1, c, 1, 1)  # bottom-right padding is background
        sq = np.broadcast_to(pad_val, (1, c, side, side)).copy()
        y0 = int(rng.integers(0, h - side + 1)) if h > side else 0
        x0 = int(rng.integers(0, w - side + 1)) if w > side else 0
        part = x[:, :, y0 : y0 + side, x0 : x0 + side]
        sq[:, :, : part.shape[2], : part.shape[3]] = part
        out.append(np.ascontiguousarray(sq, np.float32))
    return out


class _Reader:
    def __init__(self, xs: list[np.ndarray], name: str = "input"):
        self._it = iter([{name: x} for x in xs])

    def get_next(self):  # noqa: ANN201
        return next(self._it, None)


def gate_items(root: Path, held_out: tuple[str, ...]) -> list:
    """BCCD val (VOC labels, never trained on), TXL-PBC's own val folder (source ``TXL-val``; trained on unless its
    source was held out: it measures what INT8 loses, not how well the detector generalises) and every TXL-PBC
    frame of the checkpoint's held-out sources. One box is about 0.3 points of recall on these 300-odd cells;
    on BCCD val alone it would be 1.1, coarser than the gate."""
    from hemaedge.evaluation.groundtruth import Labelled
    from hemaedge.evaluation.groundtruth import txl_items as _txl
    from hemaedge.export.detector.data import bccd_duplicates, source_of
    from hemaedge.export.detector.train import held_out_items

    items = held_out_items(root, tuple(s for s in held_out if s != "BCCD"), "val") + (
        held_out_items(root, ("BCCD",), "") if "BCCD" in held_out else []
    )
    seen = {str(it.path) for it in items}
    dup = bccd_duplicates(root)
    for it in _txl(root / "txl-pbc", "val"):
        if str(it.path) in seen or dup.get(Path(it.path).name) == "val":  # BCCD val frames are already in, as VOC
            continue
        if source_of(it.source) in held_out:
            continue
        items.append(Labelled(it.path, it.boxes, "TXL-val", it.split))
    return items


def export_detector(opts: DetectorExportOptions, log=print) -> dict[str, Any]:  # noqa: ANN001
    """Export a detector checkpoint to a bundle; returns the summary (what ``--json`` prints)."""
    import onnx
    import torch
    from hemaedge.export.detector.data import frame_list
    from hemaedge.export.detector.train import load_model
    from hemaedge.export.exporter import _git_version
    from hemaedge.export.quantize import METHODS, quantize_int8
    from hemaedge.export.to_onnx import check_and_simplify

    t0 = time.time()
    if opts.calib_method not in METHODS:
        raise UsageError(f"--calib-method must be one of {', '.join(METHODS)}")
    if opts.max_drop < 0:
        raise UsageError(f"--max-drop must be >= 0 points, not {opts.max_drop}")
    root = Path(opts.data)
    if not (root / "bccd").is_dir() or not (root / "txl-pbc").is_dir():
        raise InputError(f"--data {root} must hold bccd/ and txl-pbc/ (the detector's gate and calibration frames)")
    model, ck = load_model(opts.checkpoint)
    recipe = ck.get("recipe") or {}
    det = ck.get("detector") or {}
    held_out = tuple(recipe.get("hold_out") or ())
    threshold = opts.threshold if opts.threshold is not None else float(det.get("threshold", DEFAULT_THRESHOLD))
    spec = DetectorSpec(px_per_um=float(det["px_per_um"]), stride=int(det.get("stride", 4)), threshold=threshold)
    mean, std = tuple(ck["input"]["mean"]), tuple(ck["input"]["std"])
    rng = np.random.default_rng(opts.seed)
    log(f"detector {Path(opts.checkpoint).name}: epoch {ck.get('epoch')}, working scale {spec.px_per_um} px/um")

    gate = _Frames(gate_items(root, held_out), spec, mean, std)
    if not gate.items:
        raise InputError(f"no gate frames found under {root}")
    log(f"gate frames: {len(gate.items)} ({', '.join(sorted({it.source for it in gate.items}))})")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        fp32 = tmp / "model.onnx"
        import contextlib
        import io
        import warnings

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.zeros(1, 3, CALIB_SIDE, CALIB_SIDE),),
                str(fp32),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "n", 2: "height", 3: "width"}, "output": {0: "n", 2: "h4", 3: "w4"}},
                opset_version=17,
                dynamo=False,
            )
        simplify = check_and_simplify(fp32)
        log(f"ONNX checked and simplified: {simplify['nodes_before']} -> {simplify['nodes_after']} nodes")

        def torch_run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()

        def ort_run(path: Path):  # noqa: ANN202
            sess = _ort(path)
            return lambda x: sess.run(None, {"input": x})[0]

        ref = gate.outputs(torch_run)
        got = gate.outputs(ort_run(fp32))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, got))
        same = gate.score(ref, spec)["all"] == gate.score(got, spec)["all"]
        parity = {"frames": len(ref), "max_abs_diff": diff, "same_counts": same}
        log(
            f"FP32 parity vs PyTorch on {len(ref)} gate frames: max |diff| {diff:.2e}, same hits: {parity['same_counts']}"
        )
        if diff > 1e-2 or not parity["same_counts"]:
            raise UsageError("exported ONNX disagrees with the PyTorch detector; refusing to ship it")

        def station_score(path: Path) -> dict[str, Any]:
            """Recall/precision of a model through the station's own segmenter (scale per frame, white-cell check)."""
            from hemaedge.edge.segment.learned import LearnedSegmenter
            from hemaedge.evaluation.frames import score_detections

            seg = LearnedSegmenter.from_model(path, spec, mean, std, "frame")
            return {k: v.as_dict() for k, v in score_detections(seg.detect, gate.items).items()}

        m32 = station_score(fp32)
        log(_line("FP32", m32["all"]))
        metrics: dict[str, Any] = {
            "gate_frames": "BCCD val (VOC, held out) + TXL-PBC val folder (trained on: it gates what INT8 loses)"
            + (f" + TXL-PBC {'/'.join(held_out)} (held out in training)" if held_out else ""),
            "iou": 0.5,
            "threshold": threshold,
            "fp32": m32,
        }
        int8_path = cpu_path = None
        calibration = None
        if opts.int8:
            t = time.time()
            cal_items = [_Item(p, b, s) for p, s, _, b, _ in frame_list(root, ("train",)) if s not in held_out]
            pick = rng.choice(len(cal_items), size=min(opts.calib_size, len(cal_items)), replace=False)
            cal = _Frames([cal_items[int(i)] for i in np.sort(pick)], spec, mean, std)
            xs = _squares(cal.inputs, CALIB_SIDE, rng)
            calibration = {
                "method": opts.calib_method,
                "num_images": len(xs),
                "set": f"{root} training frames (TXL-PBC + BCCD train{', without ' + '/'.join(held_out) if held_out else ''}), "
                f"prepared as the station does, cut to {CALIB_SIDE}x{CALIB_SIDE}",
                "digest": _digest(xs),
                "per_channel": True,
                "format": "QDQ",
                "seed": opts.seed,
            }
            int8_path = tmp / "model.int8.onnx"
            quantize_int8(fp32, int8_path, _Reader(xs), opts.calib_method, True, symmetric=True, dynamic_shapes=True)
            m8 = station_score(int8_path)
            log(_line("INT8", m8["all"], m32["all"]))
            metrics["int8"] = m8
            metrics["max_drop"] = opts.max_drop
            detection_gate(m32["all"], m8["all"], opts.max_drop, "INT8")
            cpu_path = tmp / "model.int8.cpu.onnx"
            quantize_int8(fp32, cpu_path, _Reader(xs), opts.calib_method, True, symmetric=False, dynamic_shapes=True)
            mc = station_score(cpu_path)
            metrics["int8_cpu"] = mc
            try:
                detection_gate(m32["all"], mc["all"], opts.max_drop, "INT8 CPU variant")
                log(_line("INT8 CPU variant", mc["all"], m32["all"]))
                mc["shipped"] = True
            except AccuracyGateError as exc:
                log(f"{exc}: not shipped, the station's CPU runs the portable INT8 model")
                mc["shipped"] = False
                cpu_path = None
            metrics["quantize_s"] = round(time.time() - t, 1)
            metrics["cpu_speed"] = _speed({"fp32": fp32, "int8": cpu_path or int8_path}, log)
        source_sha = sha256_file(opts.checkpoint)
        provenance = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": _git_version(),
            "source_model": {
                "file": Path(opts.checkpoint).name,
                "kind": "checkpoint",
                "sha256": source_sha,
                "arch": ck.get("arch"),
                "epoch": ck.get("epoch"),
            },
            "data": {"path": str(root), "train_frames": ck.get("train_frames")},
            "training_recipe": recipe,
            "training_command": ck.get("command"),
            "export_command": opts.command,
        }
        detector = {
            **{k: v for k, v in spec.__dict__.items() if k != "outputs"},
            "outputs": list(spec.outputs),
            "scale": "session",
            "arch": ck.get("arch_kwargs"),
        }
        manifest = Manifest(
            name=opts.name or Path(opts.out).name,
            architecture=str(ck.get("arch")),
            classes=("wbc",),
            input=InputSpec(
                height=CALIB_SIDE,
                width=CALIB_SIDE,
                mean=mean,
                std=std,
                colour_order="RGB",
                resize="area",
                white_balance=True,
            ),
            crop=CropGeometry(),
            artifacts=(),
            output_kind="logits",
            output_name="output",
            calibration=calibration,
            metrics=metrics,
            provenance=provenance,
            extra={"task": "detect", "detector": detector, "parity": parity, "onnx": simplify},
        )
        with BundleWriter(opts.out, overwrite=opts.overwrite) as w:
            w.add(fp32, "onnx", "fp32", opset=_opset(onnx, fp32), dynamic="height,width")
            if int8_path is not None:
                w.add(int8_path, "onnx", "int8", opset=_opset(onnx, int8_path), format="QDQ", activations="symmetric")
            if cpu_path is not None:
                w.add(
                    cpu_path,
                    "onnx",
                    "int8",
                    opset=_opset(onnx, cpu_path),
                    format="QDQ",
                    activations="asymmetric",
                    target="cpu",
                )
            golden = _golden(w, gate, fp32, int8_path, cpu_path, rng)
            bundle = w.finish(manifest)
    return {
        "bundle": str(bundle.path),
        "task": "detect",
        "parity": parity,
        "metrics": metrics,
        "calibration": calibration,
        "artifacts": [a.file for a in bundle.manifest.artifacts],
        "golden": golden,
        "seconds": round(time.time() - t0, 1),
        "gate": "passed" if opts.int8 else "n/a",
    }


@dataclass(frozen=True)
class _Item:
    path: Path
    boxes: np.ndarray
    source: str


def _line(what: str, m: dict, ref: dict | None = None) -> str:
    s = f"{what} on the gate frames: recall {m['recall']:.4f}, precision {m['precision']:.4f} ({m['truth']} cells)"
    if ref is not None:
        s += f" (drops {100 * (ref['recall'] - m['recall']):+.2f} / {100 * (ref['precision'] - m['precision']):+.2f} points)"
    return s


def detection_gate(fp32: dict, int8: dict, max_drop: float, what: str = "INT8") -> None:
    """Raise AccuracyGateError (with both numbers) when ``int8`` loses more than ``max_drop`` points of recall or precision."""
    for key in ("recall", "precision"):
        drop = 100 * (fp32[key] - int8[key])
        if drop > max_drop:
            raise AccuracyGateError(
                f"{what} fails the detection gate: {key} FP32 {fp32[key]:.4f}, {what} {int8[key]:.4f}, "
                f"drop {drop:.2f} points > --max-drop {max_drop} (try --calib-method or more --calib-size)"
            )


def _digest(xs: list[np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for x in xs:
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


def _opset(onnx, path: Path) -> int:  # noqa: ANN001
    m = onnx.load(str(path), load_external_data=False)
    return int(next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0))


def _speed(models: dict[str, Path], log, side: tuple[int, int] = (144, 192), repeats: int = 30) -> dict:  # noqa: ANN001
    """ms per working image of ``side`` (a 640x480 frame of the synthetic slide at the working scale), 1 thread."""
    x = np.random.default_rng(0).normal(0, 1, (1, 3, *side)).astype(np.float32)
    out: dict[str, Any] = {"input": list(side), "threads": 1}
    for name, path in models.items():
        sess = _ort(path)
        for _ in range(3):
            sess.run(None, {"input": x})
        ts = []
        for _ in range(repeats):
            t = time.process_time()
            sess.run(None, {"input": x})
            ts.append(time.process_time() - t)
        out[name] = round(1000 * float(np.median(ts)), 3)
        out[f"{name}_model"] = path.name
    log(
        f"CPU time per {side[1]}x{side[0]} working image (1 thread): "
        + ", ".join(f"{k} {out[k]:.2f} ms" for k in models)
    )
    return out


def _golden(w: BundleWriter, gate: _Frames, fp32: Path, int8: Path | None, cpu: Path | None, rng) -> dict | None:  # noqa: ANN001
    from hemaedge.edge.bundle.golden import write_golden

    xs = np.concatenate(_squares(gate.inputs[:GOLDEN_FRAMES], CALIB_SIDE, rng))
    outs = {"fp32": _ort(fp32).run(None, {"input": xs})[0]}
    if int8 is not None:
        outs["int8"] = _ort(int8).run(None, {"input": xs})[0]
    if cpu is not None:
        outs["int8_cpu"] = _ort(cpu).run(None, {"input": xs})[0]
    return write_golden(w, xs, {k: v.reshape(len(v), -1) for k, v in outs.items()}, output_kind="logits")
