"""``export-model``: source model -> checked FP32 ONNX -> (INT8 QDQ, accuracy gate) -> bundle.

Every option is checked before any work (``ExportOptions.validate``). The
manifest records the precision actually built and the metrics measured here.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.calibration.datasets import ImageSet, batches, open_dataset, stratified_sample
from hemaedge.edge import __version__
from hemaedge.edge.bundle import Bundle, BundleWriter, CropGeometry, InputSpec, Manifest, sha256_file
from hemaedge.edge.bundle.class_groups import default_class_groups
from hemaedge.edge.bundle.manifest import stain_fields
from hemaedge.edge.bundle.vocabulary import canonical_classes
from hemaedge.edge.classify.views import VIEWS
from hemaedge.edge.errors import InputError, MissingDependencyError, UsageError
from hemaedge.export.gates import accuracy_gate, class_drops, class_gate, default_critical, misses_class_gate
from hemaedge.export.quantize import METHODS, QUANT_OPS, quantize_int8
from hemaedge.export.to_onnx import (
    Source,
    adapt_foreign_onnx,
    check_and_simplify,
    detect_kind,
    export_torch,
    load_source,
    torch_forward,
)

PARITY_IMAGES = 256
GOLDEN_IMAGES = 16


@dataclass
class ExportOptions:
    """What the user asked ``export-model`` for."""

    source: str | None
    out: str
    data: str | None = None
    int8: bool = False
    calib: str | None = None
    calib_size: int | None = None  # None: a bundle source's own calibration size, else 500
    calib_method: str = "entropy"
    per_channel: bool = True
    max_drop: float = 1.0
    max_class_drop: float = 2.0
    critical_classes: list[str] | None = None
    arch: str | None = None
    classes: list[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    cell_fraction: float | None = None
    crop_scale: str | None = None  # None: the parent bundle's (a bundle source), else "session"
    input_size: tuple[int, int] | None = None
    target: str = "onnx"
    search: bool = False
    ensemble: list[tuple[str, float]] = field(default_factory=list)
    overwrite: bool = False
    name: str | None = None
    seed: int = 0
    command: str = ""
    triage: str | None = None
    views: int | None = None  # test-time views per crop (edge/classify/views.py); None: the parent bundle's, else 1
    quant_ops: str = "weighted"  # where the portable INT8 model's Q/DQ pairs go (export/quantize.py QUANT_OPS)

    def validate(self) -> None:
        """Refuse contradictory or unsupported options before any work is done."""
        if self.ensemble and self.source:
            raise UsageError("give either a model or --ensemble members, not both")
        if not self.ensemble and not self.source:
            raise UsageError("no model given: export-model MODEL --out DIR (or --ensemble a.pt:0.4 b.pt:0.6)")
        for p in [self.source] if self.source else [m for m, _ in self.ensemble]:
            if not Path(p).is_file() and not (Path(p) / "manifest.json").is_file():
                raise InputError(f"model {p} does not exist")
        if self.source and Path(self.out).resolve() == Path(self.source).resolve():
            raise UsageError(f"--out {self.out} is the bundle being re-exported: write the new bundle elsewhere")
        if self.max_drop < 0:
            raise UsageError(f"--max-drop must be >= 0 percentage points, not {self.max_drop}")
        if self.max_class_drop < 0:
            raise UsageError(f"--max-class-drop must be >= 0 percentage points, not {self.max_class_drop}")
        if self.calib_method not in METHODS:
            raise UsageError(f"--calib-method must be one of {', '.join(METHODS)}")
        if self.calib_size is not None and self.calib_size < 1:
            raise UsageError("--calib-size must be at least 1")
        if self.quant_ops not in QUANT_OPS:
            raise UsageError(f"--quant-ops must be one of {', '.join(QUANT_OPS)}, not {self.quant_ops!r}")
        if self.views is not None and self.views not in VIEWS:
            raise UsageError(f"--views must be one of {', '.join(map(str, VIEWS))}, not {self.views}")
        if self.triage is not None:
            from hemaedge.edge.count.triage import load_rules

            if not Path(self.triage).is_file():
                raise InputError(f"--triage {self.triage} does not exist")
            try:
                load_rules(self.triage)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"--triage {self.triage}: not valid triage rules ({exc})") from exc
        if not self.int8 and (self.calib or self.search):
            raise UsageError("--calib and --search only make sense with --int8")
        if self.target not in ("onnx", "tensorrt"):
            raise UsageError(f"--target must be onnx or tensorrt, not {self.target!r}")
        if self.target == "tensorrt":
            try:
                import tensorrt  # noqa: F401
            except ImportError as exc:
                raise MissingDependencyError(
                    "--target tensorrt needs TensorRT's Python bindings on this workstation (not installable from "
                    "PyPI here); export without it and run 'hemaedge build-engine BUNDLE' on the station"
                ) from exc
        if self.data is None:
            raise UsageError(
                "--data is needed: the data set whose train split calibrates and whose val split checks the model"
            )
        data = Path(self.data)
        if not data.exists():
            raise InputError(f"data set {data} does not exist")
        if self.calib:
            calib = Path(self.calib).resolve()
            if not calib.exists():
                raise InputError(f"calibration folder {calib} does not exist")
            if calib.name in ("val", "test") or calib == (data / "val").resolve():
                raise UsageError(
                    f"--calib {self.calib} is a validation/test split; calibrate on training or station images"
                )
        if self.mean is not None and self.std is not None and (len(self.mean) != 3 or len(self.std) != 3):
            raise UsageError("--mean and --std take three comma-separated values")
        if self.crop_scale is not None and self.crop_scale not in ("cell", "session"):
            raise UsageError(f"--crop-scale must be cell or session, not {self.crop_scale!r}")
        if self.cell_fraction is not None and not 0.05 <= self.cell_fraction <= 1:
            raise UsageError("--cell-fraction must be between 0.05 and 1")
        out = Path(self.out)
        if out.exists() and not self.overwrite:
            raise UsageError(f"output {out} already exists (pass --overwrite to replace it)")


def _git_version() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"hemaedge {__version__}" + (f" ({rev})" if rev else "")


def _ort_probs(path: Path, images: ImageSet, spec: InputSpec, idx: np.ndarray, output_kind: str) -> np.ndarray:
    from hemaedge.edge.classify.base import softmax
    from hemaedge.edge.classify.onnxruntime import reference_session

    sess = reference_session(path)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x})[0] for x, _ in batches(images, spec, idx, 256)]
    out = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    return out if output_kind == "probabilities" else softmax(out)


def _raw(path: Path, x: np.ndarray) -> np.ndarray:
    from hemaedge.edge.classify.onnxruntime import reference_session

    sess = reference_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _raw_original_onnx(path: Path, x: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """Run a foreign ONNX as it came (its own layout and batch size) for the parity check."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    if info.get("layout", "").startswith("NHWC"):
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    fixed = info.get("original_shape", [None])[0]
    if fixed:
        return np.concatenate([sess.run(None, {name: x[i : i + fixed]})[0] for i in range(0, len(x), fixed)])
    return sess.run(None, {name: x})[0]


def _spec_from(source: Source, opts: ExportOptions, info: dict[str, Any], data: ImageSet) -> InputSpec:
    meta_in = source.meta.get("input") or {}
    size = opts.input_size or (meta_in.get("height"), meta_in.get("width"))
    if not all(size):
        size = (info.get("height"), info.get("width"))
    if not all(size):  # TorchScript / .pt2 do not record it: the data's image size is what it was trained on
        size = data.image(0).shape[:2]
    h, w = size
    mean = opts.mean or tuple(meta_in.get("mean") or ())
    std = opts.std or tuple(meta_in.get("std") or ())
    if not mean or not std:
        raise UsageError(
            f"{source.path.name} does not record its normalisation: pass --mean R,G,B --std R,G,B "
            "(pixel = (value/255 - mean) / std; for raw 0..255 input use --mean 0,0,0 --std 0.00392157,...)"
        )
    return InputSpec(
        height=int(h),
        width=int(w),
        mean=tuple(mean),
        std=tuple(std),
        colour_order=meta_in.get("colour_order", "RGB"),
        resize=meta_in.get("resize", "area"),
        white_balance=bool(meta_in.get("white_balance", False)),
        **stain_fields(meta_in),
    )


def _check_triage_classes(path: str, classes: Sequence[str], groups: Mapping[str, Sequence[str]] | None) -> None:
    """Refuse triage rules whose evidence (and APL features) name nothing this bundle's model can output."""
    from hemaedge.edge.count.triage import load_rules

    rules = load_rules(path)
    groups = groups or {}
    evidence = [c for g in rules.evidence_groups for c in groups.get(g, [])] + [
        c for c in rules.evidence_classes if c in classes
    ]
    if not evidence:
        raise UsageError(
            f"--triage {path}: its evidence ({', '.join(rules.evidence_groups + rules.evidence_classes)}) names no "
            f"class or group of this model ({', '.join(classes)}): the slide call could never see leukaemia"
        )
    missing = [f for f in (rules.apl.features if rules.apl else ()) if f not in classes]
    if missing:
        raise UsageError(f"--triage {path}: its APL model uses classes this model lacks: {', '.join(missing)}")


@dataclass
class _Model:
    """The model to export as loaded, the validation split it is checked on, and how its input is prepared."""

    source: Source
    info: dict[str, Any]  # what adapting a foreign ONNX or building an ensemble found out
    classes: list[str]
    val: ImageSet
    spec: InputSpec
    output_kind: str

    def probs(self, path: Path) -> np.ndarray:
        """Class probabilities of an ONNX file on the whole validation split (ONNX Runtime, CPU)."""
        return _ort_probs(path, self.val, self.spec, np.arange(len(self.val)), self.output_kind)


@dataclass
class _Checked:
    """The FP32 ONNX file's checks: the simplifier's node counts and its parity with the source model."""

    simplify: dict[str, Any]
    parity: dict[str, Any]
    timings: dict[str, float]


@dataclass
class _Fp32:
    """The FP32 model's scores on the validation split."""

    report: dict[str, Any]  # classification_report
    metrics: dict[str, Any]  # the manifest's metrics, before the INT8 stages add theirs
    timings: dict[str, float]


@dataclass
class _Calibrated:
    """The INT8 model as first quantized, how (the manifest's calibration record) and its calibration reader."""

    path: Path
    calibration: dict[str, Any]
    reader: Callable[[], Any]  # a fresh calibration reader, to quantize again with the same images
    seconds: float


@dataclass
class _Gated:
    """The INT8 model's metrics once it passed its gates, and the classes whose recall was gated."""

    metrics: dict[str, Any]
    critical: list[str]


@dataclass
class _Runtimes:
    """The INT8 model on the station's runtimes: the CPU variant (if it passed its gate), OpenVINO, CPU speed."""

    cpu_path: Path | None
    metrics: dict[str, Any]
    timings: dict[str, float]


@dataclass
class _Int8:
    """What the INT8 stages built and measured (nothing without ``--int8``)."""

    path: Path | None = None
    cpu_path: Path | None = None
    calibration: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Crop:
    """The crop geometry the bundle asks the station for, and where its cell fraction came from."""

    geometry: CropGeometry
    source: str
    measured: dict[str, Any] | None  # measure_training_framing's record, when it was measured


@dataclass
class _Written:
    """The finished bundle and its golden outputs' record (None when the golden writer is not installed)."""

    bundle: Bundle
    golden: dict[str, Any] | None


def run_export(opts: ExportOptions, log=print) -> dict[str, Any]:
    """Export a model to a bundle; returns the summary (also what ``--json`` prints).

    Raises:
        AccuracyGateError: INT8 lost more than ``max_drop`` points on the validation split.
    """
    opts.validate()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        fp32 = tmp / "model.onnx"
        model = _load_model(opts, fp32, log)
        opts = _with_source_defaults(opts, model.source)
        checked = _export_and_check(opts, model, fp32, log)
        base = _fp32_metrics(opts, model, fp32, log)
        int8 = _int8(opts, model, base, fp32, tmp, log) if opts.int8 else _Int8()
        crop = _crop_geometry(opts, model, log)
        metrics = {**base.metrics, **int8.metrics}
        manifest = _manifest(opts, model, checked, metrics, int8, crop)
        written = _write_bundle(opts, manifest, model, fp32, int8)
    summary = {
        "bundle": str(written.bundle.path),
        "classes": list(written.bundle.manifest.classes),
        "input": [model.spec.height, model.spec.width],
        "parity": checked.parity,
        "metrics": metrics,
        "calibration": int8.calibration,
        "artifacts": [a.file for a in written.bundle.manifest.artifacts],
        "golden": written.golden,
        "seconds": round(time.time() - t0, 1),
        "timings": {**checked.timings, **base.timings, **int8.timings},
        "gate": "passed" if opts.int8 else "n/a",
    }
    if int8.search:
        summary["int8_search"] = int8.search
    return summary


def _with_source_defaults(opts: ExportOptions, source: Source) -> ExportOptions:
    """Options not given on the command line: a bundle source's own (views, crop scale, calibration size, name,
    critical classes, triage rules), else the defaults."""
    import dataclasses

    meta = source.meta if source.kind == "bundle" else {}
    crop = meta.get("crop") or {}
    return dataclasses.replace(
        opts,
        views=opts.views if opts.views is not None else int(meta.get("views") or 1),
        crop_scale=opts.crop_scale or crop.get("scale") or "session",
        calib_size=opts.calib_size
        or int((meta.get("parent_bundle", {}).get("calibration") or {}).get("num_images") or 500),
        name=opts.name or meta.get("parent_bundle", {}).get("name"),
        critical_classes=opts.critical_classes if opts.critical_classes is not None else meta.get("critical_classes"),
        triage=opts.triage if opts.triage is not None else meta.get("triage"),
    )


def _load_model(opts: ExportOptions, fp32: Path, log) -> _Model:  # noqa: ANN001
    """Resolve and load the source model (an ensemble's or a foreign ONNX's FP32 file is written to ``fp32`` here)
    and open the validation split in the model's class order."""
    info: dict[str, Any] = {}
    if opts.ensemble:
        from hemaedge.export.ensemble import export_ensemble  # issue 6

        source, info = export_ensemble(opts.ensemble, fp32)
    else:
        kind = detect_kind(Path(opts.source))
        val_probe = open_dataset(opts.data, "val") if kind != "checkpoint" or opts.arch else None
        source = load_source(opts.source, opts.arch, list(val_probe.classes) if val_probe else None)
        log(f"source: {source.kind} {opts.source if source.kind == 'bundle' else source.path}")
        if source.kind == "onnx":
            info = adapt_foreign_onnx(source.path, fp32)
        elif source.kind == "bundle":  # its FP32 model as it is: re-quantized, re-gated, re-measured
            shutil.copyfile(source.path, fp32)
    classes = list(opts.classes or source.meta.get("classes") or [])
    val = open_dataset(opts.data, "val", classes=classes or None)
    classes = classes or list(val.classes)
    if len(classes) != len(val.classes):
        raise UsageError(f"the model has {len(classes)} classes but {opts.data} has {len(val.classes)}")
    spec = _spec_from(source, opts, info, val)
    output_kind = info.get("output_kind", source.meta.get("output_kind", "logits"))
    return _Model(source, info, classes, val, spec, output_kind)


def _export_and_check(opts: ExportOptions, model: _Model, fp32: Path, log) -> _Checked:  # noqa: ANN001
    """Export a torch model to ``fp32`` (the other kinds are there already), check and simplify the ONNX file and
    refuse it unless it agrees with the source model."""
    timings: dict[str, float] = {}
    if model.source.kind not in ("onnx", "bundle") and not opts.ensemble:
        t = time.time()
        export_torch(model.source, model.spec.height, model.spec.width, fp32)
        timings["onnx_export_s"] = round(time.time() - t, 2)
    simplify = check_and_simplify(fp32)
    log(f"ONNX checked and simplified: {simplify['nodes_before']} -> {simplify['nodes_after']} nodes")
    return _Checked(simplify, _parity(opts, model, fp32, log), timings)


def _parity(opts: ExportOptions, model: _Model, fp32: Path, log) -> dict[str, Any]:  # noqa: ANN001
    """FP32 parity against the source model on real validation images; refuses an export that disagrees."""
    source, info = model.source, model.info
    pidx = stratified_sample(model.val.labels, PARITY_IMAGES, opts.seed)
    px = np.concatenate([x for x, _ in batches(model.val, model.spec, pidx, 256)])
    ref = (
        _raw_original_onnx(source.path, px, info)
        if source.kind == "onnx"
        else _raw(source.path, px)
        if source.kind == "bundle"
        else (info["reference"](px) if "reference" in info else torch_forward(source, px))
    )
    got = _raw(fp32, px)
    parity = {
        "images": int(len(px)),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
    }
    log(
        f"FP32 parity vs source on {len(px)} val images: max |diff| {parity['max_abs_diff']:.2e}, "
        f"top-1 agreement {parity['top1_agreement']:.4f}"
    )
    if parity["top1_agreement"] < 0.99:
        raise UsageError(
            f"exported ONNX disagrees with the source model on {1 - parity['top1_agreement']:.1%} "
            "of images; refusing to ship it"
        )
    return parity


def _fp32_metrics(opts: ExportOptions, model: _Model, fp32: Path, log) -> _Fp32:  # noqa: ANN001
    """Score the FP32 ONNX model on the whole validation split."""
    t = time.time()
    p32 = model.probs(fp32)
    from hemaedge.evaluation.metrics import classification_report

    m32 = classification_report(p32, model.val.labels, model.classes)
    timings = {"eval_fp32_s": round(time.time() - t, 2)}
    metrics: dict[str, Any] = {
        "split": "val",
        "data": str(opts.data),
        "n": int(len(model.val)),
        "fp32": {k: m32[k] for k in ("accuracy", "macro_f1", "macro_auroc")},
    }
    log(f"FP32 on val: accuracy {m32['accuracy']:.4f}, macro F1 {m32['macro_f1']:.4f}")
    return _Fp32(m32, metrics, timings)


def _int8(opts: ExportOptions, model: _Model, base: _Fp32, fp32: Path, tmp: Path, log) -> _Int8:  # noqa: ANN001
    """Quantize, score (searching float nodes if asked and the drop is too large), gate, then the runtime variants."""
    from hemaedge.evaluation.metrics import classification_report

    q = _quantize(opts, model, fp32, tmp)
    timings = {"quantize_s": q.seconds}
    t = time.time()
    m8 = classification_report(model.probs(q.path), model.val.labels, model.classes)
    timings["eval_int8_s"] = round(time.time() - t, 2)
    drop = (base.report["accuracy"] - m8["accuracy"]) * 100
    log(f"INT8 on val: accuracy {m8['accuracy']:.4f} (drop {drop:+.2f} points, gate {opts.max_drop})")
    search = None
    if drop > opts.max_drop and opts.search:
        search = _search_int8(opts, model, base, fp32, q, tmp, log)
        q.calibration.update(
            method=search["method"], per_channel=search["per_channel"], float_nodes=list(search["float_nodes"])
        )
        m8 = classification_report(model.probs(q.path), model.val.labels, model.classes)
        drop = (base.report["accuracy"] - m8["accuracy"]) * 100
    gated = _gate_int8(opts, model.classes, base.report, m8, drop, log)
    rt = _int8_runtimes(opts, model, base, fp32, q, gated.critical, log)
    return _Int8(
        path=q.path,
        cpu_path=rt.cpu_path,
        calibration=q.calibration,
        search=search,
        metrics={**gated.metrics, **rt.metrics},
        timings={**timings, **rt.timings},
    )


def _quantize(opts: ExportOptions, model: _Model, fp32: Path, tmp: Path) -> _Calibrated:
    """Quantize the FP32 model to INT8 (QDQ, symmetric) on a stratified sample of the calibration set."""
    t = time.time()
    if opts.calib:
        cal_set = open_dataset(opts.calib, None)
        cal_name = f"{opts.calib} (folder)"
    else:
        cal_set = open_dataset(opts.data, "train", classes=model.classes)
        cal_name = f"{opts.data} [train split]"
    from hemaedge.calibration.ort import equal_batches, make_reader

    cidx = equal_batches(stratified_sample(cal_set.labels, opts.calib_size, opts.seed))

    path = tmp / "model.int8.onnx"
    quantize_int8(
        fp32, path, make_reader(cal_set, model.spec, cidx), opts.calib_method, opts.per_channel, ops=opts.quant_ops
    )
    seconds = round(time.time() - t, 2)
    calibration = {
        "method": opts.calib_method,
        "num_images": int(len(cidx)),
        "set": cal_name,
        "digest": cal_set.subset(cidx).digest,
        "per_channel": opts.per_channel,
        "symmetric": True,
        "format": "QDQ",
        "ops": opts.quant_ops,
        "stratified": True,
        "seed": opts.seed,
    }
    return _Calibrated(path, calibration, lambda: make_reader(cal_set, model.spec, cidx), seconds)


def _search_int8(
    opts: ExportOptions,
    model: _Model,
    base: _Fp32,
    fp32: Path,
    q: _Calibrated,
    tmp: Path,
    log,  # noqa: ANN001
) -> dict[str, Any]:
    """Search a quantization that passes the gate (method, per-channel, nodes left in float); it replaces the INT8
    model at ``q.path``. Returns the manifest's ``int8_search`` record."""
    from hemaedge.export.quant_search import search_int8  # issue 6

    def eval_fn(path: Path) -> float:
        return float((model.probs(path).argmax(1) == model.val.labels).mean())

    plain_path = tmp / "plain.int8.onnx"
    shutil.copyfile(q.path, plain_path)
    res = search_int8(
        fp32,
        q.reader,
        eval_fn,
        opts.max_drop,
        out=q.path,
        baseline=base.report["accuracy"],
        log=log,
        ops=opts.quant_ops,
    )
    return {
        "method": res.method,
        "per_channel": res.per_channel,
        "float_nodes": list(res.excluded_nodes),
        "float_node_labels": res.excluded_labels,
        "drop": res.drop,
        "passed": res.passed,
        "log": res.log,
        "speed": search_speed_cost(fp32, plain_path, q.path, model.spec, log),
    }


def _gate_int8(
    opts: ExportOptions,
    classes: list[str],
    m32: dict[str, Any],
    m8: dict[str, Any],
    drop: float,
    log,  # noqa: ANN001
) -> _Gated:
    """The INT8 gates: overall accuracy (``--max-drop``), then the recall of each critical class (``--max-class-drop``).

    Raises:
        AccuracyGateError: either gate missed.
    """
    metrics: dict[str, Any] = {
        "int8": {k: m8[k] for k in ("accuracy", "macro_f1", "macro_auroc")},
        "drop_points": round(drop, 4),
        "max_drop": opts.max_drop,
    }
    accuracy_gate(m32["accuracy"], m8["accuracy"], opts.max_drop)
    critical = opts.critical_classes if opts.critical_classes is not None else default_critical(classes)
    drops = class_drops(m32, m8, critical, classes)
    if drops:
        metrics["critical_classes"] = drops
        metrics["max_class_drop"] = opts.max_class_drop
        log(
            "INT8 recall of critical classes: "
            + ", ".join(f"{n} {d['fp32_recall']:.3f} -> {d['int8_recall']:.3f}" for n, d in drops.items())
        )
        class_gate(drops, opts.max_class_drop)
    return _Gated(metrics, critical)


def _int8_runtimes(
    opts: ExportOptions,
    model: _Model,
    base: _Fp32,
    fp32: Path,
    q: _Calibrated,
    critical: list[str],
    log,  # noqa: ANN001
) -> _Runtimes:
    """The INT8 model for ONNX Runtime's CPU kernels (gated like the portable one), OpenVINO's gate, CPU speed."""
    m32, classes = base.report, model.classes
    metrics: dict[str, Any] = {}
    timings: dict[str, float] = {}
    t = time.time()
    cpu_path = _cpu_variant(
        fp32,
        q.path.parent / "model.int8.cpu.onnx",  # next to the portable INT8 model
        q.reader,
        q.calibration,
        model.probs,
        model.val.labels,
        classes,
        m32["accuracy"],
        opts.max_drop,
        metrics,
        log,
        gate_classes=lambda m: misses_class_gate(class_drops(m32, m, critical, classes), opts.max_class_drop),
    )
    timings["cpu_variant_s"] = round(time.time() - t, 2)
    t = time.time()
    ov_gate = openvino_gate(
        q.path,
        lambda p: _ov_probs(p, model.val, model.spec, np.arange(len(model.val)), model.output_kind),
        model.val.labels,
        classes,
        m32["accuracy"],
        opts.max_drop,
        log,
    )
    if ov_gate is not None:
        metrics["int8_openvino"] = ov_gate
        timings["openvino_gate_s"] = round(time.time() - t, 2)
    metrics["cpu_speed"] = _cpu_speed(fp32, cpu_path or q.path, model.spec, log)
    return _Runtimes(cpu_path, metrics, timings)


def _crop_geometry(opts: ExportOptions, model: _Model, log) -> _Crop:  # noqa: ANN001
    """The cell fraction: ``--cell-fraction``, else the checkpoint's, else measured on the training images."""
    crop = model.source.meta.get("crop") or {}
    fraction, crop_source = opts.cell_fraction, "--cell-fraction"
    crop_measure = None
    if fraction is None and crop.get("cell_fraction"):
        fraction, crop_source = crop["cell_fraction"], crop.get("from") or f"the {model.source.kind}"
        crop_measure = crop.get("measurement")  # a bundle source's own record of how it was measured
    if fraction is None:
        crop_measure = measure_training_framing(opts.data, model.classes, opts.seed)
        if crop_measure:
            fraction, crop_source = crop_measure["median"], "measured on the training images"
        else:
            fraction, crop_source = CropGeometry.cell_fraction, "default (no cell found in the training images)"
    geom = CropGeometry(cell_fraction=fraction, scale=opts.crop_scale)
    log(
        f"crop geometry: the {'typical ' if geom.scale == 'session' else ''}cell spans {geom.cell_fraction:.3f} "
        f"of the crop side ({crop_source}), scale {geom.scale}"
    )
    return _Crop(geom, crop_source, crop_measure)


def _manifest(
    opts: ExportOptions,
    model: _Model,
    checked: _Checked,
    metrics: dict[str, Any],
    int8: _Int8,
    crop: _Crop,
) -> Manifest:
    """The bundle's manifest (its artifacts are added as the bundle is written)."""
    source, info = model.source, model.info
    # one vocabulary across bundles: the manifest lists canonical class names ("ig" -> "immature_granulocyte")
    bundle_classes = canonical_classes(model.classes)
    extra: dict[str, Any] = {"parity": checked.parity, "onnx": checked.simplify, "crop_geometry_from": crop.source}
    if opts.views > 1:  # the station classifies each crop in this many views and averages them
        if opts.views > 2 and model.spec.height != model.spec.width:
            raise UsageError(f"--views {opts.views} turns crops by 90 degrees: the model's input must be square")
        extra["views"] = opts.views
    if source.meta.get("notice"):  # terms of the training data (DeepAPL: research use only) travel with the model
        extra["notice"] = str(source.meta["notice"])
    if metrics.get("critical_classes"):  # gated per class at export: the station's reports may single them out
        extra["critical_classes"] = sorted(metrics["critical_classes"])
    if crop.measured:
        extra["crop_measurement"] = crop.measured
    if info.get("members"):
        extra["ensemble"] = info["members"]
    if info.get("original_input"):
        extra["foreign_onnx"] = {k: v for k, v in info.items() if k not in ("reference",)}
    if int8.search:
        extra["int8_search"] = int8.search
    return Manifest(
        name=opts.name or Path(opts.out).name,
        architecture=str(source.meta.get("arch") or info.get("arch") or source.kind),
        classes=tuple(bundle_classes),
        input=model.spec,
        crop=crop.geometry,
        artifacts=(),
        output_kind=model.output_kind,
        output_name="output",
        class_groups=default_class_groups(bundle_classes),
        calibration=int8.calibration,
        metrics=metrics,
        provenance=_provenance(opts, model),
        extra=extra,
    )


def _provenance(opts: ExportOptions, model: _Model) -> dict[str, Any]:
    """Where the bundle came from: the source model, the data, the training recipe and lineage, the command."""
    source = model.source
    bundle = source.kind == "bundle"
    model_file = source.path if bundle else opts.source  # a bundle's: its FP32 model, named with the bundle
    provenance = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": _git_version(),
        "source_model": {
            "file": (f"{Path(opts.source).name}/" if bundle else "") + Path(model_file).name if model_file else None,
            "kind": source.kind,
            "sha256": sha256_file(model_file) if model_file else None,
            "arch": source.meta.get("arch"),
            "epoch": source.meta.get("epoch"),
        },
        "data": {
            "path": str(opts.data),
            "val_digest": model.val.digest,
            "train_digest": (source.meta.get("data") or {}).get("train_digest"),
        },
        "training_recipe": source.meta.get("recipe"),
        "training_lineage": source.meta.get("lineage") or [],
        "export_command": opts.command,
    }
    if (source.meta.get("data") or {}).get("sources"):  # hemaedge train: every source, its weight and digests
        provenance["data"]["train_sources"] = source.meta["data"]["sources"]
    if source.meta.get("adaptation"):  # hemaedge adapt: the parent bundle and the cells it learned from
        provenance["adaptation"] = source.meta["adaptation"]
    if bundle:  # re-exported from a bundle's FP32 model: which bundle, and how it had been made
        provenance["parent_bundle"] = source.meta["parent_bundle"]
    return provenance


def _write_bundle(opts: ExportOptions, manifest: Manifest, model: _Model, fp32: Path, int8: _Int8) -> _Written:
    """Write the bundle: its models (FP32, portable INT8, CPU INT8), the triage rules and the golden outputs."""
    if opts.triage is not None:
        _check_triage_classes(opts.triage, manifest.classes, manifest.class_groups)
    with BundleWriter(opts.out, overwrite=opts.overwrite) as w:
        w.add(fp32, "onnx", "fp32", opset=_opset(fp32))
        if opts.triage is not None:
            w.add(Path(opts.triage), "triage", None)
        if int8.path is not None:
            w.add(int8.path, "onnx", "int8", opset=_opset(int8.path), format="QDQ", activations="symmetric")
        if int8.cpu_path is not None:
            w.add(
                int8.cpu_path,
                "onnx",
                "int8",
                opset=_opset(int8.cpu_path),
                format="QDQ",
                activations="asymmetric",
                target="cpu",
            )
        golden = _write_golden(w, model.val, model.spec, fp32, int8.path, opts.seed, model.output_kind, int8.cpu_path)
        return _Written(w.finish(manifest), golden)


def measure_training_framing(data: str | None, classes: list[str], seed: int = 0, n: int = 200) -> dict | None:
    """How much of a training image's side its white cell spans, as the station's segmenter sees it.

    The station cuts each crop so the detected cell spans ``crop.cell_fraction`` of its side; it
    must match the training images or the model sees cells at the wrong scale (BloodMNIST's
    MedMNIST recipe centre-crops 200 of 360 pixels, so its cells span about 0.72; whole-field
    PBC images about 0.40). Small images are upscaled to 200 pixels first, so the segmenter
    sees the cell. Returns ``{"median", "iqr", "images", "found"}`` or None if no cell was found.
    """
    import cv2
    from hemaedge.edge.records import Frame
    from hemaedge.edge.segment.crops import cell_fractions

    if not data:
        return None
    try:
        train = open_dataset(data, "train", classes=classes)
    except Exception:  # noqa: BLE001 - no train split: the caller falls back to the default
        return None
    idx = stratified_sample(train.labels, min(n, len(train)), seed)
    frames = []
    for i in idx:
        img = train.image(int(i))
        side = min(img.shape[:2])
        if side < 200:
            img = cv2.resize(img, None, fx=200 / side, fy=200 / side, interpolation=cv2.INTER_CUBIC)
        frames.append(Frame(np.ascontiguousarray(img), "RGB", 0.0, "training", int(i)))
    fr = cell_fractions(frames)
    if not len(fr):
        return None
    return {
        "median": round(float(np.median(fr)), 3),
        "iqr": [round(float(q), 3) for q in np.percentile(fr, [25, 75])],
        "images": int(len(idx)),
        "found": int(len(fr)),
    }


def _cpu_variant(
    fp32: Path,
    out: Path,
    reader_factory,
    calibration: dict,
    probs_of,
    labels: np.ndarray,  # noqa: ANN001
    classes: list[str],
    fp32_accuracy: float,
    max_drop: float,
    metrics: dict,
    log,
    gate_classes=lambda m: "",  # noqa: ANN001 - report -> "" or why a critical class misses its gate
) -> Path | None:  # noqa: ANN001
    """The INT8 model for ONNX Runtime on CPU: the same calibration, activations asymmetric.

    The portable INT8 model is symmetric (zero points 0), which TensorRT requires, and may quantize only the inputs
    of weighted operators (``--quant-ops weighted``). This one quantizes every operator ONNX Runtime can (its
    kernels then keep a ReLU network in INT8 from layer to layer) with asymmetric activations: with symmetric ones
    a ReLU cannot be folded into the quantization that follows it, so ONNX Runtime's CPU kernels run every ReLU
    (and the max-pool after it) in float between a dequantize and a quantize. With asymmetric activations a ReLU's
    output range starts at the zero point and ONNX Runtime drops it. Same calibration set, method, weights and float nodes; gated like the portable model,
    and left out of the bundle (the station then runs the portable model) if it misses the gate.
    """
    import contextlib

    from hemaedge.evaluation.metrics import classification_report
    from hemaedge.export.quant_search import entropy_bins

    method = calibration["method"]
    searched = "float_nodes" in calibration
    with entropy_bins() if method == "entropy" and searched else contextlib.nullcontext():
        quantize_int8(
            fp32,
            out,
            reader_factory(),
            method,
            calibration["per_channel"],
            symmetric=False,
            exclude=calibration.get("float_nodes") or (),
            ops="all",
        )
    m = classification_report(probs_of(out), labels, classes)
    drop = (fp32_accuracy - m["accuracy"]) * 100
    metrics["int8_cpu"] = {
        **{k: m[k] for k in ("accuracy", "macro_f1", "macro_auroc")},
        "drop_points": round(drop, 4),
        "activations": "asymmetric",
        "ops": "all",
    }
    class_miss = gate_classes(m)
    if drop > max_drop or class_miss:
        why = f"drop {drop:+.2f} points" if drop > max_drop else class_miss
        log(
            f"INT8 CPU variant on val: accuracy {m['accuracy']:.4f} ({why}) misses the gate: "
            "not shipped, the station's CPU runs the portable INT8 model"
        )
        metrics["int8_cpu"]["shipped"] = False
        return None
    log(f"INT8 CPU variant (asymmetric activations) on val: accuracy {m['accuracy']:.4f} (drop {drop:+.2f} points)")
    metrics["int8_cpu"]["shipped"] = True
    return out


def _ov_probs(path: Path, images: ImageSet, spec: InputSpec, idx: np.ndarray, output_kind: str) -> np.ndarray:
    """Class probabilities of an ONNX file run by OpenVINO, compiled as the station compiles it."""
    from hemaedge.edge.classify.base import softmax
    from hemaedge.edge.classify.openvino import compile_onnx

    compiled = compile_onnx(path)
    request, output = compiled.create_infer_request(), compiled.output(0)
    outs = [np.array(request.infer({0: x})[output], dtype=np.float32) for x, _ in batches(images, spec, idx, 256)]
    out = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    return out if output_kind == "probabilities" else softmax(out)


def openvino_gate(
    int8: Path,
    probs_of,  # noqa: ANN001
    labels: np.ndarray,
    classes: list[str],
    fp32_accuracy: float,
    max_drop: float,
    log,  # noqa: ANN001
) -> dict | None:
    """The INT8 accuracy gate of the portable INT8 model run by OpenVINO, as for the ONNX Runtime CPU variant.

    OpenVINO executes the same QDQ model with its own kernels (fused, its own rounding), so its accuracy is measured
    on the validation split rather than assumed. A miss does not fail the export (ONNX Runtime's INT8 passed its
    gate): it is recorded with ``passed: false`` and the station never runs INT8 on OpenVINO for this bundle.
    None (nothing recorded) when OpenVINO is not installed here: ``hemaedge evaluate --backend openvino --record``
    adds the numbers later.
    """
    from hemaedge.edge.classify.openvino import openvino_version
    from hemaedge.evaluation.metrics import classification_report

    version = openvino_version()
    if not version:
        log(
            "OpenVINO not installed: its INT8 gate is not measured (later: hemaedge evaluate --backend openvino --record)"
        )
        return None
    m = classification_report(probs_of(int8), labels, classes)
    drop = (fp32_accuracy - m["accuracy"]) * 100
    gate = openvino_gate_record(m, drop, max_drop, version, int8.name)
    log(
        f"INT8 on OpenVINO {version} on val: accuracy {m['accuracy']:.4f} (drop {drop:+.2f} points): "
        + ("passes the gate" if gate["passed"] else "misses the gate: the station will not run INT8 on OpenVINO")
    )
    return gate


def openvino_gate_record(report: dict, drop: float, max_drop: float, version: str, model_file: str) -> dict:
    """What the manifest records of OpenVINO's INT8 gate (``metrics.int8_openvino``)."""
    return {
        **{k: report[k] for k in ("accuracy", "macro_f1", "macro_auroc")},
        "drop_points": round(drop, 4),
        "max_drop": max_drop,
        "passed": drop <= max_drop,
        "runtime": f"openvino {version}",
        "model_file": model_file,
    }


def _cpu_speed(fp32: Path, int8: Path, spec: InputSpec, log) -> dict:  # noqa: ANN001
    """FP32 vs INT8 crops per CPU-second on this workstation's CPU (ONNX Runtime, 1 thread, batch 16).

    A station's ``--precision auto`` on ONNX Runtime CPU reads this: INT8 is not always faster
    on CPU (EfficientNet's SiLU / sigmoid / SE run in float between DQ and Q there), and
    the station then runs FP32.
    """
    import platform

    from hemaedge.export.quant_search import speed_table

    table = speed_table({"fp32": fp32, "int8": int8}, (16, 3, spec.height, spec.width), repeats=5)
    out = {
        "fp32": table["fp32"]["crops_per_cpu_s"],
        "int8": table["int8"]["crops_per_cpu_s"],
        "int8_model": int8.name,
        "batch": 16,
        "threads": 1,
        "cpu": platform.machine(),
    }
    log(
        f"CPU speed (ONNX Runtime, 1 thread, batch 16): FP32 {out['fp32']:.0f}, INT8 {out['int8']:.0f} crops per CPU-second"
    )
    return out


def search_speed_cost(fp32: Path, plain: Path, searched: Path, spec, log) -> dict:  # noqa: ANN001
    """What the search's float nodes cost: crops/s of FP32, plain INT8 and the searched model (ORT CPU, 1 thread).

    One batch of 16 random crops, runs interleaved, medians of 5; a rough guide on this CPU, not
    a benchmark (``hemaedge bench`` measures a bundle properly).
    """
    from hemaedge.export.quant_search import speed_table

    table = speed_table(
        {"fp32": fp32, "int8_plain": plain, "int8_searched": searched}, (16, 3, spec.height, spec.width), repeats=5
    )
    plain_rate = table["int8_plain"]["crops_per_cpu_s"]
    searched_rate = table["int8_searched"]["crops_per_cpu_s"]
    table["searched_vs_plain"] = round(searched_rate / plain_rate, 3) if plain_rate else None
    table["searched_vs_fp32"] = round(searched_rate / table["fp32"]["crops_per_cpu_s"], 3)
    log(
        f"  int8 search speed (CPU, 1 thread, batch 16): FP32 {table['fp32']['crops_per_cpu_s']:.1f}, "
        f"plain INT8 {plain_rate:.1f}, searched {searched_rate:.1f} crops per CPU-second "
        f"({table['searched_vs_plain']:.2f}x plain INT8)"
    )
    return table


def _opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0))


def _write_golden(
    writer: BundleWriter,
    val: ImageSet,
    spec: InputSpec,
    fp32: Path,
    int8: Path | None,
    seed: int,
    output_kind: str = "logits",
    int8_cpu: Path | None = None,
):
    """Save a few preprocessed inputs and their FP32/INT8 outputs for ``hemaedge verify`` on the station."""
    try:
        from hemaedge.edge.bundle.golden import write_golden
    except ImportError:
        return None
    idx = stratified_sample(val.labels, GOLDEN_IMAGES, seed)
    x = np.concatenate([b for b, _ in batches(val, spec, idx, 256)])
    outs = {"fp32": _raw(fp32, x)}
    if int8 is not None:
        outs["int8"] = _raw(int8, x)
    if int8_cpu is not None:
        outs["int8_cpu"] = _raw(int8_cpu, x)
    return write_golden(writer, x, outs, output_kind=output_kind)
