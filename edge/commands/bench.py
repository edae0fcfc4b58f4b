"""``hemaedge bench``: throughput measured in one run, so ratios compare like with like.

* crops/s of the bundle through ONNX Runtime FP32 and INT8 against the same
  model in PyTorch eager FP32 (the baseline a user would write), on the same
  preprocessed crops cut from synthetic 640x480 frames;
* whole-pipeline frames/s on 640x480 frames (quality check, registration,
  segmentation, crops, classification on the worker thread, store, count).

Each figure is the median of ``--repeats`` timed runs after a warm-up, with
min/max. Speed targets are checked here, not in timed unit tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hemaedge.edge.errors import UsageError


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge bench``."""
    p.add_argument("--bundle", help="bundle directory (default: the shipped bundle)")
    p.add_argument(
        "--checkpoint",
        help="PyTorch checkpoint of the same model (default: the shipped one); "
        "its sha256 must match the bundle's provenance",
    )
    p.add_argument("--batch", type=int, default=256, help="crops per inference call (default 256)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="threads for ORT and torch (0 = all cores)")
    p.add_argument("--frames", type=int, default=300, help="640x480 frames for the pipeline run")
    p.add_argument(
        "--segmenter",
        default=None,
        help="white-cell segmenter of the pipeline run: stain or learned (default: count's)",
    )
    p.add_argument("--detector", default=None, metavar="BUNDLE", help="detector bundle for --segmenter learned")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", action="store_true")


def _stats(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "runs": len(samples)}


def _time(fn, n_items: int, repeats: int) -> dict[str, float]:
    fn()  # warm-up (allocations, kernel choice)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rates.append(n_items / (time.perf_counter() - t))
    return _stats(rates)


def synthetic_frames(n: int, seed: int = 7, pan: float = 0.0) -> list:
    """Pre-rendered 640x480 synthetic smear frames (rendering is not part of what is timed).

    ``pan=0`` gives a new, unrelated field every frame (worst case: every cell is
    new); ``pan>0`` moves the slide a few pixels per frame, as under a camera.
    """
    from hemaedge.edge.sources import open_source

    uri = f"synthetic://?seed={seed}&frames={n}&width=640&height=480" + (f"&pan={pan}" if pan else "")
    with open_source(uri) as src:
        return list(src)


def eager_baseline(bundle, checkpoint: Path | None, x, repeats: int, threads: int) -> dict[str, Any]:
    """crops/s of the same model in PyTorch eager FP32 on the same preprocessed crops ``x``.

    PyTorch is workstation code (the ``export`` extra): it runs in a child process
    (``python -m hemaedge.export.eager``), so the station runtime never imports it.
    """
    import importlib.util
    import subprocess
    import sys

    import numpy as np

    if importlib.util.find_spec("torch") is None:
        raise UsageError(
            "the PyTorch eager baseline needs the workstation extra (pip install 'hemaedge[export]'); "
            "or pass --skip-torch"
        )
    with tempfile.TemporaryDirectory() as tmp:
        crops = Path(tmp) / "crops.npy"
        np.save(crops, x)
        cmd = [
            sys.executable,
            "-m",
            "hemaedge.export.eager",
            "--bundle",
            str(bundle.path),
            "--crops",
            str(crops),
            "--repeats",
            str(repeats),
            "--threads",
            str(threads),
        ]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise UsageError(f"PyTorch eager baseline failed: {lines[-1] if lines else 'exit ' + str(res.returncode)}")
    return json.loads(res.stdout)


def bench_crops(
    bundle, checkpoint: Path | None, batch: int, repeats: int, threads: int, skip_torch: bool = False
) -> dict[str, Any]:
    """crops/s for ORT FP32, ORT INT8 and PyTorch eager FP32 on the same crops."""
    from hemaedge.edge.bundle import cut_crop, preprocess
    from hemaedge.edge.classify.onnxruntime import OrtBackend
    from hemaedge.edge.segment import make_segmenter

    seg = make_segmenter()
    crops = []
    for f in synthetic_frames(40):
        for d in seg.detect(f):
            crops.append(cut_crop(f.rgb(), d.box, bundle.manifest.crop))
    if not crops:
        raise UsageError("the segmenter found no cells in the synthetic frames; cannot benchmark")
    crops = (crops * (batch // len(crops) + 1))[:batch]
    x = preprocess(crops, bundle.manifest.input)
    out: dict[str, Any] = {"batch": batch, "crop_source": "cells cut from synthetic 640x480 frames"}
    for prec in bundle.manifest.precisions():
        with OrtBackend(bundle, prec, threads=threads) as be:
            out[f"onnxruntime_{prec}"] = {
                **_time(lambda be=be: be.classify(x), batch, repeats),
                "model_file": be.model_path.name,
            }
            runs_variant = bool(be.variant)
        if runs_variant:  # the station runs the CPU variant here; show the portable (TensorRT) model too
            with OrtBackend(bundle, prec, threads=threads, variant="portable") as be:
                out[f"onnxruntime_{prec}_portable"] = {
                    **_time(lambda be=be: be.classify(x), batch, repeats),
                    "model_file": be.model_path.name,
                }
    if not skip_torch:
        out["pytorch_eager_fp32"] = eager_baseline(bundle, checkpoint, x, repeats, threads)
        base = out["pytorch_eager_fp32"]["median"]
        out["speedup_vs_pytorch_eager"] = {
            k: round(v["median"] / base, 2) for k, v in out.items() if k.startswith("onnxruntime_")
        }
    return out


def bench_pipeline(
    bundle,
    frames: int,
    repeats: int,
    threads: int,
    precision: str,
    segmenter: str | None = None,
    detector: str | None = None,
) -> dict[str, Any]:
    """Whole-pipeline frames/s on pre-rendered 640x480 frames through ``CountingSession``.

    The station is assembled exactly as ``hemaedge count`` assembles it (``Station.from_bundle``, same
    default threads). Two runs: a panning slide (what a camera gives) and a new field every frame (worst case).
    """
    from hemaedge.edge.count import DifferentialCounter
    from hemaedge.edge.counting import CountingSession
    from hemaedge.edge.station import DEFAULT_THREADS, Station
    from hemaedge.edge.store import SessionStore

    threads = threads or DEFAULT_THREADS
    station = Station.from_bundle(bundle, segmenter=segmenter, precision=precision, threads=threads, detector=detector)
    segmenter = station.segmenter_name
    out: dict[str, Any] = {
        "segmenter": segmenter,
        "detector": str(getattr(getattr(station.segmenter, "bundle", None), "path", "")) or None,
        "frame_size": "640x480",
        "precision": precision,
        "backend": station.backend_reason,
        "threads": threads,
        "frames_per_run": frames,
    }
    m = bundle.manifest
    with station:
        for name, pan in (("panning_slide", 4.0), ("new_field_every_frame", 0.0)):
            pool = synthetic_frames(frames, seed=11, pan=pan)
            rates, counted = [], []
            for r in range(repeats + 1):
                with tempfile.TemporaryDirectory() as tmp:
                    store = SessionStore.create(
                        Path(tmp) / "s",
                        {
                            "bundle": str(bundle.path),
                            "classes": list(m.classes),
                            "target": 10**9,
                            "precision": precision,
                        },
                    )
                    counter = DifferentialCounter(m.classes, 10**9, 0.6, m.class_groups)
                    session = CountingSession(iter(pool), station, store, counter, stop_at_target=False)
                    res = session.run(interval=0.05)
                    store.close()
                    if r:  # the first run warms up
                        rates.append(res.frames / res.seconds)
                        counted.append(res.cells)
            out[name] = {"frames_per_s": _stats(rates), "cells_counted_per_run": counted}
    return out


def run(args: argparse.Namespace) -> int:
    """Benchmark and print."""
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.models import default_bundle_path
    from rich.console import Console
    from rich.table import Table

    bundle = load_bundle(args.bundle or default_bundle_path())
    res: dict[str, Any] = {"bundle": str(bundle.path), "threads": args.threads or "default"}
    res["crops"] = bench_crops(
        bundle,
        Path(args.checkpoint) if args.checkpoint else None,
        args.batch,
        args.repeats,
        args.threads,
        args.skip_torch,
    )
    if not args.skip_pipeline:
        prec = "int8" if "int8" in bundle.manifest.precisions() else "fp32"
        res["pipeline"] = bench_pipeline(
            bundle, args.frames, max(3, args.repeats // 2), args.threads, prec, args.segmenter, args.detector
        )
        res["load_average"] = _load()
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    con = Console()
    t = Table("path", "crops/s (median)", "min", "max", "x PyTorch eager", title=f"batch {args.batch}")
    speed = res["crops"].get("speedup_vs_pytorch_eager", {})
    for k, v in res["crops"].items():
        if isinstance(v, dict) and "median" in v:
            t.add_row(
                k,
                f"{v['median']:.0f}",
                f"{v['min']:.0f}",
                f"{v['max']:.0f}",
                str(speed.get(k, "1.0" if "pytorch" in k else "")),
            )
    con.print(t)
    if "pipeline" in res:
        p = res["pipeline"]
        for name in ("panning_slide", "new_field_every_frame"):
            f = p[name]["frames_per_s"]
            con.print(
                f"pipeline {name} ({p['segmenter']} segmenter, {p['precision']}, 640x480, {p['backend']}): "
                f"{f['median']:.1f} frames/s (min {f['min']:.1f}, max {f['max']:.1f}, {f['runs']} runs, "
                f"{statistics.median(p[name]['cells_counted_per_run']):.0f} cells counted per run)",
                highlight=False,
            )
        if res.get("load_average"):
            con.print(f"load average (1/5/15 min) {res['load_average']}", highlight=False)
    return 0


def _load() -> list[float] | None:
    """The machine's load average: busy neighbours slow every figure here."""
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None
