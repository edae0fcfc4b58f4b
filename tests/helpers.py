"""Small things tests build for themselves: a tiny ONNX classifier bundle, no training data needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hemaedge.edge.bundle import BundleWriter, CropGeometry, InputSpec, Manifest

BLOODMNIST_CLASSES = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "immature granulocyte",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)


def manifest_dict(inp: dict | None = None, **top) -> dict:
    """A minimal manifest as read from JSON (8x8 input, two classes, one artifact), with ``input`` fields ``inp``
    and top-level fields ``top`` added."""
    return {
        "format": "hemaedge-bundle",
        "schema_version": 1,
        "name": "t",
        "classes": ["a", "b"],
        "input": {"height": 8, "width": 8, **(inp or {})},
        "artifacts": [{"file": "model.onnx", "kind": "onnx", "precision": "fp32", "sha256": "0" * 64, "bytes": 1}],
        **top,
    }


def tiny_onnx(path: Path, size: int = 28, classes: int = 8, seed: int = 0) -> Path:
    """A conv -> relu -> global-average-pool -> gemm classifier with random weights (dynamic batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    fw = numpy_helper.from_array(rng.normal(0, 0.3, (classes, 8)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(np.zeros(classes, np.float32), "fb")
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
        [w, b, fw, fb],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def tiny_bundle(
    out: Path,
    size: int = 28,
    classes: tuple[str, ...] = BLOODMNIST_CLASSES,
    int8: bool = True,
    cell_fraction: float = 0.45,
    triage: dict | None = None,
    notice: str = "",
) -> Path:
    """Write a complete, valid bundle with a random tiny model (and ``triage`` rules, a ``notice`` when given)."""
    work = out.parent / (out.name + ".src")
    work.mkdir(parents=True, exist_ok=True)
    fp32 = tiny_onnx(work / "model.onnx", size, len(classes))
    manifest = Manifest(
        name="tiny-test",
        architecture="tiny",
        classes=tuple(classes),
        input=InputSpec(height=size, width=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        crop=CropGeometry(cell_fraction=cell_fraction),
        artifacts=(),
        provenance={"note": "random weights, built by tests/helpers.py"},
        extra={"notice": notice} if notice else {},
    )
    with BundleWriter(out, overwrite=True) as w:
        w.add(fp32, "onnx", "fp32")
        if int8:
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

            class Reader(CalibrationDataReader):
                def __init__(self):
                    rng = np.random.default_rng(1)
                    self.it = iter(
                        [{"input": rng.normal(0, 1, (4, 3, size, size)).astype(np.float32)} for _ in range(4)]
                    )

                def get_next(self):
                    return next(self.it, None)

            q = work / "model.int8.onnx"
            quantize_static(
                str(fp32),
                str(q),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
            w.add(q, "onnx", "int8")
        if triage is not None:
            import json

            rules = work / "triage.json"
            rules.write_text(json.dumps(triage))
            w.add(rules, "triage", None)
        return w.finish(manifest).path


def new_cell(
    frame_index: int,
    frame_name: str,
    box: tuple[float, float, float, float],
    field: int,
    sx: float,
    sy: float,
    probabilities,
    classes,
    crop,
    review: bool | None = None,
    review_threshold: float = 0.6,
    source: str = "synthetic://",
):
    """A ``NewCell`` built from records, as the counting worker builds it (top class of ``probabilities``)."""
    import time

    from hemaedge.edge.records import Crop, Detection, Prediction
    from hemaedge.edge.store import NewCell

    p = np.asarray(probabilities, np.float32)
    k = int(p.argmax())
    pred = Prediction(k, classes[k], float(p[k]), p)
    review = bool(p[k] < review_threshold) if review is None else review
    return NewCell(
        Crop(crop, Detection(box, 1.0), frame_index, frame_name), pred, review, field, sx, sy, source, time.time()
    )


def fake_measure(rates: dict[str, float], failing: tuple[str, ...] = ()):
    """A stand-in for ``hemaedge.edge.classify.measure.measure``: fixed crops/s per candidate key, no timing.

    Candidates named in ``failing`` fail the golden check; every other one passes it. Selection tests
    monkeypatch it in, so what ``--backend auto`` picks does not depend on this machine's load.
    """
    from hemaedge.edge.classify.measure import Measurement

    calls: list[list[str]] = []

    def measure(candidates, bundle, batch=8, **_):  # noqa: ANN001
        calls.append([c.key for c in candidates])
        out = {}
        for c in candidates:
            bad = c.key in failing
            golden = {
                "reference": c.precision,
                "samples": 24,
                "top1_agreement": 0.5 if bad else 1.0,
                "max_abs_diff": 0.4 if bad else 0.0,
                "passed": not bad,
                "top1_vs_fp32": 0.5 if bad else 1.0,
            }
            rate = rates.get(c.key, 1.0)
            out[c.key] = Measurement(
                c.key, c.label, c.precision, rate, rate * 0.9, rate * 1.1, golden, excluded=c.excluded
            )
        return out

    measure.calls = calls
    return measure


def tiny_detector_onnx(path: Path, box_cells: float = 6.0) -> Path:
    """A hand-made "detector" (no torch): one 4x4 stride-4 convolution whose heatmap fires on dark, blue-violet
    pixels (nuclei) and whose boxes are 24 working pixels (6 cells) wide; dynamic height and width."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((5, 3, 4, 4), np.float32)
    w[0, 0] = -4.0 / 16  # red channel (RGB input): nuclei are dark in red and green, bright in blue
    w[0, 1] = -4.0 / 16
    w[0, 2] = 1.0 / 16
    b = np.asarray([-1.5, np.log(box_cells), np.log(box_cells), 0.5, 0.5], np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["output"], kernel_shape=[4, 4], strides=[4, 4])]
    graph = helper.make_graph(
        nodes,
        "tiny-detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 5, "h", "w"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def tiny_detector_bundle(out: Path, px_per_um: float = 1.75, threshold: float = 0.5, box_cells: float = 6.0) -> Path:
    """A complete detector bundle (``"task": "detect"``) around ``tiny_detector_onnx`` (boxes ``box_cells`` x 4
    working pixels wide: 6 -> 24 px, 13.7 um at 1.75 px/um, a white cell's usual size)."""
    work = out.parent / (out.name + ".src")
    work.mkdir(parents=True, exist_ok=True)
    fp32 = tiny_detector_onnx(work / "model.onnx", box_cells)
    manifest = Manifest(
        name="tiny-detector",
        architecture="tiny-detector",
        classes=("wbc",),
        input=InputSpec(height=128, width=128, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), white_balance=True),
        crop=CropGeometry(),
        artifacts=(),
        provenance={"note": "hand-made weights, built by tests/helpers.py"},
        extra={"task": "detect", "detector": {"px_per_um": px_per_um, "stride": 4, "threshold": threshold}},
    )
    with BundleWriter(out, overwrite=True) as w:
        w.add(fp32, "onnx", "fp32")
        return w.finish(manifest).path
