"""``export-model`` / ``hemaedge export``: a checked, calibrated bundle from a trained model."""

from __future__ import annotations

import argparse
import json
import sys

from hemaedge.edge.errors import UsageError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _member(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"ensemble member must be PATH:WEIGHT, got {text!r}")
    try:
        return path, float(weight)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad weight in {text!r}") from exc


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``export-model``."""
    p.add_argument(
        "model",
        nargs="?",
        help="checkpoint (.pt), TorchScript (.pt), torch.export (.pt2), ONNX (.onnx), or a bundle folder: its FP32 "
        "model re-exported (e.g. re-quantized with --quant-ops), keeping what it records of its training",
    )
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument(
        "--data",
        help="data set (.npz or class folders): train split calibrates, val split checks "
        "(default: the one the checkpoint or bundle was made with)",
    )
    p.add_argument("--int8", action="store_true", help="also build a static INT8 QDQ model and gate its accuracy")
    p.add_argument(
        "--calib", help="calibrate on this image folder instead of the train split (e.g. 'hemaedge collect' output)"
    )
    p.add_argument(
        "--calib-size",
        type=int,
        help="calibration images, stratified (default: a bundle source's own number, else 500)",
    )
    p.add_argument("--calib-method", default="entropy", help="minmax, entropy or percentile (default entropy)")
    p.add_argument("--no-per-channel", action="store_true", help="per-tensor weight scales")
    p.add_argument(
        "--quant-ops",
        choices=["weighted", "all"],
        default="weighted",
        help="where the portable INT8 model's quantize/dequantize pairs go: weighted (default: inputs of "
        "convolutions and matrix products, TensorRT's recommended placement; OpenVINO then fuses SiLU and sigmoid "
        "into the convolution) or all (every operator ONNX Runtime can quantize, as before 2026-12-07)",
    )
    p.add_argument("--max-drop", type=float, default=1.0, help="accuracy gate: max INT8 loss in points (default 1.0)")
    p.add_argument(
        "--max-class-drop",
        type=float,
        default=2.0,
        help="per-class gate: max INT8 loss of recall of a critical class, in points (default 2.0)",
    )
    p.add_argument(
        "--critical-classes",
        help="comma-separated classes whose recall is gated (default: the bundle's blast classes and promyelocytes)",
    )
    p.add_argument("--search", action="store_true", help="if the gate fails, search methods and float fallbacks")
    p.add_argument("--target", default="onnx", help="onnx (default) or tensorrt (needs TensorRT here)")
    p.add_argument("--ensemble", nargs="+", type=_member, metavar="PATH:WEIGHT", help="soft-voting ensemble members")
    p.add_argument("--arch", help="architecture for a bare state dict")
    p.add_argument("--classes", help="comma-separated class names (default: from the model or data set)")
    p.add_argument("--mean", type=_floats, help="R,G,B mean for models that do not record it")
    p.add_argument("--std", type=_floats, help="R,G,B std for models that do not record it")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="model input size (default: recorded, else the data's)",
    )
    p.add_argument("--cell-fraction", type=float, help="crop geometry: share of the crop side the cell spans")
    p.add_argument(
        "--crop-scale",
        choices=["session", "cell"],
        help="station crops: one field of view per session (session, the default: training images at a fixed "
        "magnification) or sized to each cell (cell: training crops cut around each cell); a bundle source keeps its "
        "own",
    )
    p.add_argument(
        "--threshold", type=float, help="detector checkpoints: heatmap threshold recorded in the bundle (default 0.4)"
    )
    p.add_argument(
        "--triage",
        metavar="FILE",
        help="slide-level triage rules (JSON, docs/triage.md) to ship in the bundle, checksummed with it",
    )
    p.add_argument(
        "--views",
        type=int,
        choices=(1, 2, 4, 8),
        help="test-time views the station averages per crop: 1, 2 (+ mirrored), 4 (+ flipped, turned 90 degrees), "
        "8 (docs/models.md; default 1, a bundle source's own)",
    )
    p.add_argument("--name", help="bundle name (default: a bundle source's, else the output folder name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")


def run(args: argparse.Namespace) -> int:
    """Export and print a summary."""
    from hemaedge.export.exporter import ExportOptions, run_export
    from rich.console import Console

    if args.model and not args.ensemble:
        from hemaedge.export.detector.export import is_detector_checkpoint

        if is_detector_checkpoint(args.model):
            return _run_detector(args)
    data = args.data
    if data is None and args.model and not args.ensemble:
        data = _data_from_checkpoint(args.model)
    opts = ExportOptions(
        source=args.model,
        out=args.out,
        data=data,
        int8=args.int8,
        calib=args.calib,
        calib_size=args.calib_size,
        calib_method=args.calib_method,
        per_channel=not args.no_per_channel,
        quant_ops=args.quant_ops,
        max_drop=args.max_drop,
        arch=args.arch,
        classes=args.classes.split(",") if args.classes else None,
        mean=args.mean,
        std=args.std,
        cell_fraction=args.cell_fraction,
        crop_scale=args.crop_scale,
        input_size=tuple(args.input_size) if args.input_size else None,
        target=args.target,
        search=args.search,
        max_class_drop=args.max_class_drop,
        critical_classes=[c.strip() for c in args.critical_classes.split(",") if c.strip()]
        if args.critical_classes
        else None,
        ensemble=args.ensemble or [],
        overwrite=args.overwrite,
        name=args.name,
        seed=args.seed,
        triage=args.triage,
        views=args.views,
        command=" ".join(["export-model", *sys.argv[2 if sys.argv[1:2] == ["export"] else 1 :]]),
    )
    con = Console(stderr=True)
    summary = run_export(opts, log=(lambda m: con.print(m, highlight=False)) if not args.json else (lambda m: None))
    if args.target == "tensorrt":
        # the station's own builder (hemaedge build-engine runs the same code); the engine suits this GPU only
        from hemaedge.edge.classify.trt_build import BatchProfile, build_for_bundle

        built = build_for_bundle(summary["bundle"], "int8" if args.int8 else "fp32", profile=BatchProfile.for_max(64))
        summary["engine"] = built.to_dict()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        m = summary["metrics"]
        line = f"bundle {summary['bundle']}: FP32 val accuracy {m['fp32']['accuracy']:.4f}"
        if "int8" in m:
            line += (
                f", INT8 {m['int8']['accuracy']:.4f} (drop {m['drop_points']:.2f} pts, gate {m['max_drop']}: passed)"
            )
        cpu = m.get("int8_cpu")
        if cpu and cpu.get("shipped"):
            line += f"; CPU INT8 variant {cpu['accuracy']:.4f} (drop {cpu['drop_points']:.2f} pts)"
        Console().print(line + f" in {summary['seconds']} s", highlight=False)
        found = summary.get("int8_search")
        if found:
            labels = found.get("float_node_labels") or found["float_nodes"]
            speed = found.get("speed") or {}
            Console().print(
                f"int8 search: {found['method']}, {'per-channel' if found['per_channel'] else 'per-tensor'} weights, "
                f"{len(found['float_nodes'])} nodes kept in float"
                + (f" ({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''})" if labels else "")
                + (
                    f"; {speed['searched_vs_plain']:.2f}x the speed of plain INT8"
                    if speed.get("searched_vs_plain")
                    else ""
                ),
                highlight=False,
            )
    return 0


def _data_from_checkpoint(model: str) -> str | None:
    from pathlib import Path

    if Path(model).suffix.lower() in (".onnx", ".pt2"):
        return None
    try:
        if (Path(model) / "manifest.json").is_file():  # a bundle: the data set its export checked against
            import json

            manifest = json.loads((Path(model) / "manifest.json").read_text(encoding="utf-8"))
            path = ((manifest.get("provenance") or {}).get("data") or {}).get("path")
        else:
            from hemaedge.export import checkpoint

            path = (checkpoint.load(model).get("data") or {}).get("path")
    except Exception:  # validated properly later; here we only look for a default
        return None
    if not path or Path(path).exists():
        return path
    from hemaedge.edge.config import data_root

    here = data_root() / Path(path).name  # same data set, another machine's layout
    if here.exists():
        return str(here)
    raise UsageError(f"the checkpoint was trained on {path}, which is not here (nor {here}): pass --data")


def _run_detector(args: argparse.Namespace) -> int:
    """``export-model`` for a white-cell detector checkpoint (``hemaedge train-detector``)."""
    from hemaedge.edge.config import data_root
    from hemaedge.export.detector.export import DetectorExportOptions, export_detector
    from rich.console import Console

    for flag, given in (
        ("--calib", args.calib),
        ("--search", args.search),
        ("--ensemble", args.ensemble),
        ("--classes", args.classes),
        ("--mean/--std", args.mean or args.std),
        ("--input-size", args.input_size),
        ("--cell-fraction", args.cell_fraction),
    ):
        if given:
            raise UsageError(f"{flag} does not apply to a detector checkpoint")
    if args.target != "onnx":
        raise UsageError("a detector bundle is exported for ONNX (build a TensorRT engine on the station)")
    opts = DetectorExportOptions(
        checkpoint=args.model,
        out=args.out,
        data=args.data or str(data_root()),
        int8=args.int8,
        calib_size=args.calib_size if args.calib_size is not None else 200,
        calib_method=args.calib_method,
        max_drop=args.max_drop,
        threshold=args.threshold,
        name=args.name,
        overwrite=args.overwrite,
        seed=args.seed,
        command=" ".join(["export-model", *sys.argv[2 if sys.argv[1:2] == ["export"] else 1 :]]),
    )
    from pathlib import Path

    if Path(opts.out).exists() and not opts.overwrite:
        raise UsageError(f"output {opts.out} already exists (pass --overwrite to replace it)")
    con = Console(stderr=True)
    summary = export_detector(
        opts, log=(lambda m: con.print(m, highlight=False)) if not args.json else (lambda m: None)
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        m = summary["metrics"]
        line = f"detector bundle {summary['bundle']}: FP32 recall {m['fp32']['all']['recall']:.4f} precision {m['fp32']['all']['precision']:.4f}"
        if "int8" in m:
            line += f", INT8 {m['int8']['all']['recall']:.4f} / {m['int8']['all']['precision']:.4f} (gate {m['max_drop']} points: passed)"
        Console().print(line + f" on {m['gate_frames']} in {summary['seconds']} s", highlight=False)
    return 0
