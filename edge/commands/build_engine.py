"""``hemaedge build-engine BUNDLE``: build this station's TensorRT engine into the bundle.

Engines run only on the TensorRT version and GPU model that built them, so a
station builds its own from the bundle's ONNX. The engine (and, for implicit
INT8, the calibration cache) is added to the bundle's manifest with its sha256.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

from hemaedge.edge.classify.engines import ENGINE_PRECISIONS


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge build-engine``."""
    p.add_argument("bundle", help="model bundle directory (must be writable)")
    p.add_argument(
        "--precision",
        default="int8",
        choices=ENGINE_PRECISIONS,
        help="int8 (default: the bundle's QDQ INT8 model), fp16 or fp32",
    )
    p.add_argument(
        "--implicit-int8",
        action="store_true",
        help="calibrate the fp32 model here with TensorRT's entropy calibrator instead of using the QDQ model",
    )
    p.add_argument(
        "--calib",
        metavar="DIR",
        help="calibration crops (images or .npy) for --implicit-int8, e.g. the output of 'hemaedge collect'",
    )
    p.add_argument("--calib-samples", type=int, default=512, help="most calibration images used (default 512)")
    p.add_argument("--calib-batch", type=int, default=16, help="calibration batch size (default 16)")
    p.add_argument("--recalibrate", action="store_true", help="ignore a matching calibration cache")
    p.add_argument(
        "--max-batch", type=int, default=64, help="largest batch (crops per call) the engine takes (default 64)"
    )
    p.add_argument("--opt-batch", type=int, default=8, help="batch size TensorRT tunes for (default 8)")
    p.add_argument(
        "--allow-fp16-fallback",
        action="store_true",
        help="on a GPU without fast INT8 (Jetson Nano, TX2) build FP16 instead of refusing",
    )
    p.add_argument("--workspace-mb", type=int, help="builder workspace limit in MiB (default: TensorRT's)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")


def run(args: argparse.Namespace) -> int:
    """Build and report."""
    from hemaedge.edge.classify.trt_build import BatchProfile, build_for_bundle
    from rich.console import Console

    con = Console(stderr=True)
    log = (lambda _m: None) if args.json else (lambda m: con.print(m, highlight=False, markup=False))
    profile = BatchProfile(1, min(args.opt_batch, args.max_batch), args.max_batch)
    busy = con.status("building the TensorRT engine (minutes on a Jetson)...") if not args.json else nullcontext()
    with busy:
        result = build_for_bundle(
            args.bundle,
            args.precision,
            implicit_int8=args.implicit_int8,
            calib_dir=args.calib,
            calib_samples=args.calib_samples,
            calib_batch=args.calib_batch,
            recalibrate=args.recalibrate,
            profile=profile,
            allow_fp16_fallback=args.allow_fp16_fallback,
            workspace_mb=args.workspace_mb,
            log=log,
        )
    summary = result.to_dict()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    con.print(
        f"[green]built[/] {result.path} ({result.precision_built}, {result.mode}) for {result.gpu.name} "
        f"with TensorRT {result.trt_version} in {result.seconds:.0f} s; batch {profile.min}..{result.profile.max}"
    )
    con.print(f"check it against the workstation with: hemaedge verify {args.bundle} --backend tensorrt")
    return 0
