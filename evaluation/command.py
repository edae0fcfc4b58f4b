"""``hemaedge evaluate``: how well a bundle, and the station around it, do on labelled data.

Two questions, one command:

* ``--station DATA``: the station's own path (segment, crop with the bundle's geometry at session scale,
  classify) on labelled cells of *your* microscope: single-cell images ``DATA/<class>/*``, BCCD-style frames, or
  frames listed in ``DATA/labels.csv`` (``hemaedge.evaluation.labelled``). This is how a lab validates a station::

      hemaedge evaluate --station my_cells/ --classes neutrophil,lymphocyte,monocyte,eosinophil,basophil --json
      hemaedge evaluate --station my_cells/ --map "seg=neutrophil" --map "reactive=lymphocyte"

* ``--data D``: the model alone on a training-style data set (a MedMNIST ``.npz`` or a class-folder tree), each
  image fed whole as in training: what ``export-model``'s accuracy gate measures.
"""

from __future__ import annotations

import argparse
import json

from hemaedge.edge.errors import UsageError


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge evaluate``."""
    p.add_argument("--bundle", default=None, help="bundle directory or shipped name (default: the shipped bundle)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--station",
        metavar="DATA",
        help="labelled cells through the station's path: DATA/<class>/*, BCCD-style frames, or DATA/labels.csv",
    )
    what.add_argument("--data", help="the model alone on a MedMNIST .npz or a class-folder tree (as in training)")
    what.add_argument(
        "--detect",
        nargs="+",
        metavar="DATA",
        help="white-cell detection on labelled frames: Pascal VOC or YOLO folders (recall, precision per source)",
    )
    p.add_argument(
        "--split",
        choices=["train", "val", "test", "all"],
        default=None,
        help="split (--data: default val; --detect: all)",
    )
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="LABEL=CLASS",
        help="--station: the data set's LABEL is the bundle's CLASS (repeat; a label may map to several classes)",
    )
    p.add_argument(
        "--classes",
        default="",
        help="--station: evaluate only cells labelled with these comma-separated labels (e.g. the five common types)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "int8"],
        default=None,
        help="--station: default auto (what count runs); --data: default int8",
    )
    p.add_argument(
        "--backend",
        default="auto",
        help="backend (as for count; default auto). --data: onnxruntime (auto) or openvino (the portable INT8 model)",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="--data with --backend openvino --precision int8 on the full val split: write the numbers into the "
        "bundle's manifest as its INT8 gate on OpenVINO (metrics.int8_openvino), for bundles exported before "
        "export-model measured it",
    )
    p.add_argument(
        "--segmenter",
        default=None,
        help="--station, --detect: white-cell segmenter, stain or learned (default: count's)",
    )
    p.add_argument(
        "--variant",
        choices=["auto", "portable", "cpu"],
        default="auto",
        help="--data: INT8 model; auto = what the station runs here (the CPU variant on a CPU-only machine)",
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--limit", type=int, default=0, help="--data: evaluate only the first N images (0 = all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    from hemaedge.evaluation.detection import configure_detect

    configure_detect(p)


def evaluate_bundle(
    bundle,
    data,
    split: str,
    precision: str,
    batch: int = 256,
    limit: int = 0,
    progress: bool = False,
    variant: str = "auto",
    backend: str = "onnxruntime",
):
    """Run a bundle over a labelled split and return ``classification_report``'s dict.

    ``variant``: ``auto`` evaluates the model the station runs here (the CPU variant on a CPU-only
    machine, when the bundle has one), ``portable`` the TensorRT-compatible one (ONNX Runtime only).
    ``backend``: ``onnxruntime`` or ``openvino`` (which runs the portable INT8 model, as the station does).
    """
    from pathlib import Path

    import numpy as np
    from hemaedge.calibration.datasets import batches, open_dataset
    from hemaedge.edge.classify.onnxruntime import OrtBackend
    from hemaedge.evaluation.metrics import classification_report

    classes = bundle.manifest.classes
    # class folders are matched to the bundle's classes by name (in any order, any spelling); an .npz's labels are
    # indices in the bundle's order already
    images = open_dataset(data, split, classes if Path(data).is_dir() else None)
    if len(images.classes) != len(classes):
        raise UsageError(f"data set has {len(images.classes)} classes, bundle has {len(classes)}")
    idx = np.arange(min(limit, len(images)) if limit else len(images))
    probs, labels = [], []
    if backend == "openvino":
        from hemaedge.edge.classify.openvino import OpenVinoBackend

        if variant not in ("auto", "portable"):
            raise UsageError("OpenVINO runs the portable INT8 model: --variant cpu is an ONNX Runtime model")
        runner = OpenVinoBackend(bundle, precision)
    else:
        runner = OrtBackend(bundle, precision, variant=variant)
    with runner as be:
        for x, y in batches(images, bundle.manifest.input, idx, batch):
            probs.append(be.classify(x))
            labels.append(y)
        model_file = be.model_path.name
    report = classification_report(np.concatenate(probs), np.concatenate(labels), classes)
    report.update(
        {
            "bundle": str(bundle.path),
            "data": str(data),
            "split": split,
            "precision": precision,
            "backend": backend,
            "runtime_version": getattr(be, "version", "") or _ort_version(),
            "model_file": model_file,
        }
    )
    return report


def _ort_version() -> str:
    from hemaedge.edge.classify.onnxruntime import onnxruntime_version

    return onnxruntime_version()


def record_openvino_gate(bundle, report: dict) -> dict:  # noqa: ANN001
    """Write OpenVINO's INT8 gate numbers (``report`` from the full val split) into the bundle's manifest."""
    import dataclasses

    from hemaedge.edge.bundle.io import write_manifest
    from hemaedge.export.exporter import openvino_gate_record

    metrics = dict(bundle.manifest.metrics or {})
    if report["backend"] != "openvino" or report["precision"] != "int8":
        raise UsageError("--record stores OpenVINO's INT8 gate: use it with --backend openvino --precision int8")
    if report["split"] != metrics.get("split", "val") or "fp32" not in metrics:
        raise UsageError(
            f"--record needs the split the bundle's gate used ({metrics.get('split', 'val')}) and its FP32 metrics"
        )
    if metrics.get("n") is not None and report["n"] != metrics["n"]:
        raise UsageError(
            f"--record: {report['n']} images evaluated, the bundle's gate used {metrics['n']} (the same data, no --limit)"
        )
    drop = (metrics["fp32"]["accuracy"] - report["accuracy"]) * 100
    max_drop = float(metrics.get("max_drop", 1.0))
    gate = openvino_gate_record(report, drop, max_drop, report["runtime_version"], report["model_file"])
    gate["recorded_by"] = "hemaedge evaluate --backend openvino --record"
    write_manifest(bundle.path, dataclasses.replace(bundle.manifest, metrics={**metrics, "int8_openvino": gate}))
    return gate


def print_report(report: dict) -> None:
    """Rich tables: headline numbers, per-class metrics, confusion matrix."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    auroc = report["macro_auroc"]
    con.print(
        f"[bold]{report['bundle']}[/] on {report['data']} \\[{report['split']}], {report['precision']} "
        f"({report['backend']} {report.get('runtime_version', '')}, {report['model_file']}): "
        f"accuracy [bold]{report['accuracy']:.4f}[/]  macro F1 {report['macro_f1']:.4f}  "
        f"macro AUROC {'n/a' if auroc is None else f'{auroc:.4f}'}  (n={report['n']})"
    )
    t = Table("class", "precision", "recall", "F1", "AUROC", "support")
    for name, m in report["per_class"].items():
        t.add_row(
            name,
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['f1']:.3f}",
            "n/a" if m["auroc"] is None else f"{m['auroc']:.4f}",
            str(m["support"]),
        )
    con.print(t)
    cm = Table("true \\ pred", *[c[:6] for c in report["classes"]], title="confusion matrix")
    for name, row in zip(report["classes"], report["confusion_matrix"]):
        cm.add_row(name, *[str(v) for v in row])
    con.print(cm)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print."""
    if args.detect:
        from hemaedge.evaluation.detection import run_detect

        return run_detect(args)
    if args.station:
        return run_station(args)
    if args.split == "all":
        raise UsageError("--split all is for --detect")
    if args.map or args.classes:
        raise UsageError("--map and --classes apply to --station")
    from hemaedge.edge.station import resolve_bundle

    backend = "openvino" if args.backend == "openvino" else "onnxruntime"
    if args.backend not in ("auto", "openvino", "onnxruntime", "ort", "ort-cpu", "cpu"):
        raise UsageError(f"--data evaluates on onnxruntime or openvino, not --backend {args.backend}")
    precision = args.precision or "int8"
    if args.record and (backend != "openvino" or precision != "int8" or args.limit):
        raise UsageError("--record needs --backend openvino --precision int8 and no --limit")
    bundle = resolve_bundle(args.bundle)
    report = evaluate_bundle(
        bundle, args.data, args.split or "val", precision, args.batch, args.limit, variant=args.variant, backend=backend
    )
    if args.record:
        report["recorded"] = record_openvino_gate(bundle, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        if "recorded" in report:
            g = report["recorded"]
            print(
                f"recorded in {bundle.path / 'manifest.json'}: INT8 on {g['runtime']} drops {g['drop_points']:.2f} "
                f"points (gate {g['max_drop']}): {'passed' if g['passed'] else 'MISSED: the station will not run it'}"
            )
    return 0


def run_station(args: argparse.Namespace) -> int:
    """``--station DATA``: the station path on labelled cells."""
    from hemaedge.edge.station import Station
    from hemaedge.evaluation.labelled import read_labelled
    from hemaedge.evaluation.station import evaluate_station, match_labels, parse_map, print_station_report
    from rich.console import Console

    station = Station.from_bundle(
        args.bundle,
        segmenter=args.segmenter,
        backend=args.backend,
        precision=args.precision or "auto",
        detector=args.detector,
    )
    cells, kind = read_labelled(args.station, args.split)
    keep = [c.strip() for c in args.classes.split(",") if c.strip()]
    if keep:
        have = {c.label for c in cells}
        absent = [k for k in keep if k not in have]
        if absent:
            raise UsageError(f"--classes {absent}: no cells labelled so in {args.station} (labels: {sorted(have)})")
        cells = [c for c in cells if c.label in keep]
    m = station.manifest
    from hemaedge.edge.bundle.class_groups import default_class_groups

    groups = m.class_groups or default_class_groups(m.classes)
    matches = match_labels((c.label for c in cells), m.classes, groups, parse_map(args.map))
    err = Console(stderr=True, highlight=False)
    if not args.json:
        err.print(f"[dim]{len(cells)} labelled cells ({kind}) | {station.backend_reason}[/]")
    with station:
        res = evaluate_station(station, cells, matches, data=str(args.station), layout=kind, batch=min(args.batch, 64))
    doc = res.to_dict()
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print_station_report(doc)
    return 0
