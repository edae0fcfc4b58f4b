"""``hemaedge evaluate``: metrics of a bundle on a data set, through the runtime's own backend."""

from __future__ import annotations

import argparse
import json

from hemaedge.edge.errors import UsageError


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge evaluate``."""
    p.add_argument("--bundle", default=None, help="bundle directory (default: the shipped bundle)")
    p.add_argument("--data", required=True, help="a MedMNIST .npz or a class-folder tree")
    p.add_argument("--split", choices=["train", "val", "test"], default="val")
    p.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    p.add_argument(
        "--variant",
        choices=["auto", "portable", "cpu"],
        default="auto",
        help="INT8 model: auto = what the station runs here (the CPU variant on a CPU-only machine)",
    )
    p.add_argument(
        "--backend",
        choices=["onnxruntime", "openvino"],
        default="onnxruntime",
        help="runtime to evaluate on (openvino runs the portable INT8 model; needs 'hemaedge[openvino]')",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="with --backend openvino --precision int8 on the full val split: write the numbers into the bundle's "
        "manifest as its INT8 gate on OpenVINO (metrics.int8_openvino), for bundles exported before export-model "
        "measured it",
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


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
    import numpy as np
    from hemaedge.calibration.datasets import batches, open_dataset
    from hemaedge.edge.classify.onnxruntime import OrtBackend
    from hemaedge.edge.classify.openvino import OpenVinoBackend
    from hemaedge.export.metrics import classification_report

    classes = bundle.manifest.classes
    images = open_dataset(data, split)
    if len(images.classes) != len(classes):
        raise UsageError(f"data set has {len(images.classes)} classes, bundle has {len(classes)}")
    idx = np.arange(min(limit, len(images)) if limit else len(images))
    probs, labels = [], []
    if backend == "openvino":
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
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.models import default_bundle_path

    bundle = load_bundle(args.bundle or default_bundle_path())
    if args.record and (args.backend != "openvino" or args.precision != "int8" or args.limit):
        raise UsageError("--record needs --backend openvino --precision int8 and no --limit")
    report = evaluate_bundle(
        bundle,
        args.data,
        args.split,
        args.precision,
        args.batch,
        args.limit,
        variant=args.variant,
        backend=args.backend,
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
