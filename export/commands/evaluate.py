"""``hemaedge evaluate``: metrics of a bundle on a data set, through the runtime's own backend."""

from __future__ import annotations

import argparse
import json

from hemaedge.edge.errors import UsageError


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge evaluate``."""
    p.add_argument("--bundle", default=None, help="bundle directory (default: the shipped bundle)")
    p.add_argument("--data", help="a MedMNIST .npz or a class-folder tree")
    p.add_argument(
        "--split", choices=["train", "val", "test", "all"], default=None, help="default: val (--detect: all)"
    )
    p.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    p.add_argument(
        "--variant",
        choices=["auto", "portable", "cpu"],
        default="auto",
        help="INT8 model: auto = what the station runs here (the CPU variant on a CPU-only machine)",
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    from hemaedge.export.commands.evaluate_detect import configure_detect

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
):
    """Run a bundle over a labelled split and return ``classification_report``'s dict.

    ``variant``: ``auto`` evaluates the model the station runs here (the CPU variant on a CPU-only
    machine, when the bundle has one), ``portable`` the TensorRT-compatible one.
    """
    import numpy as np
    from hemaedge.calibration.datasets import batches, open_dataset
    from hemaedge.edge.classify.onnxruntime import OrtBackend
    from hemaedge.export.metrics import classification_report

    classes = bundle.manifest.classes
    images = open_dataset(data, split)
    if len(images.classes) != len(classes):
        raise UsageError(f"data set has {len(images.classes)} classes, bundle has {len(classes)}")
    idx = np.arange(min(limit, len(images)) if limit else len(images))
    probs, labels = [], []
    with OrtBackend(bundle, precision, variant=variant) as be:
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
            "backend": "onnxruntime",
            "model_file": model_file,
        }
    )
    return report


def print_report(report: dict) -> None:
    """Rich tables: headline numbers, per-class metrics, confusion matrix."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    auroc = report["macro_auroc"]
    con.print(
        f"[bold]{report['bundle']}[/] on {report['data']} [{report['split']}], {report['precision']}: "
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

    if args.detect:
        from hemaedge.export.commands.evaluate_detect import run_detect

        return run_detect(args)
    if not args.data:
        raise UsageError("give --data (a classifier's data set) or --detect FOLDER (white-cell detection)")
    args.split = args.split or "val"
    if args.split == "all":
        raise UsageError("--split all is for --detect; a classifier is evaluated on one split")

    bundle = load_bundle(args.bundle or default_bundle_path())
    report = evaluate_bundle(
        bundle, args.data, args.split, args.precision, args.batch, args.limit, variant=args.variant
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0
