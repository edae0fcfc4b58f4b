"""``hemaedge bench``: throughput measured in one run, so ratios compare like with like.

* crops/s of the bundle on every backend and precision this machine has (ONNX Runtime FP32 and
  INT8, the portable INT8 model on ONNX Runtime too when the CPU runs a CPU variant, OpenVINO FP32
  and INT8 when installed), each checked against the bundle's golden outputs, against the same
  model in PyTorch eager FP32 (the baseline a user would write) when its checkpoint exists, on the
  same preprocessed crops cut from synthetic 640x480 frames;
* whole-pipeline frames/s on 640x480 frames (quality check, registration, segmentation, crops,
  classification on the worker thread, store, count) on the backend ``hemaedge count`` chooses.

The crop rows run in interleaved rounds (each backend in turn for at least a quarter of a second,
``--repeats`` times, after a warm-up): a busy neighbour then slows every row alike instead of one.
Each figure is the median over the rounds with min/max. The machine's load average is recorded with the numbers. Speed targets are
checked here, not in timed unit tests.
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

BIG_BATCH = 256
SMALL_INPUT = 64
LARGE_INPUT_BATCH = 16  # a 256-px model: 16 crops are 12 MB of input, plenty to keep the cores busy
ROUND_S = 0.25  # each row runs at least this long per round


def default_batch(bundle) -> int:  # noqa: ANN001
    """The crops per call when ``--batch`` is not given: many small crops, fewer large ones."""
    spec = bundle.manifest.input
    return BIG_BATCH if max(spec.height, spec.width) <= SMALL_INPUT else LARGE_INPUT_BATCH


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge bench``."""
    p.add_argument("--bundle", help="bundle directory (default: the shipped bundle)")
    p.add_argument(
        "--checkpoint",
        help="PyTorch checkpoint of the same model (default: the shipped one); "
        "its sha256 must match the bundle's provenance",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"crops per inference call (default {BIG_BATCH} for inputs up to {SMALL_INPUT} px a side, "
        f"{LARGE_INPUT_BATCH} for larger ones)",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--threads", type=int, default=0, help="threads for ONNX Runtime, OpenVINO and torch (0 = all cores)"
    )
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


def crop_rows(bundle, threads: int) -> list[tuple[str, str, Any]]:  # noqa: ANN001
    """``(row name, station candidate key or "", factory)`` for every backend x precision here.

    The station candidate key (``openvino/int8``...) marks the rows ``--backend auto`` chooses among
    on a CPU; the portable INT8 model on ONNX Runtime is shown for reference only (the CPU runs
    the bundle's CPU variant instead).
    """
    from hemaedge.edge.classify.onnxruntime import OrtBackend
    from hemaedge.edge.classify.openvino import OpenVinoBackend, openvino_version

    m = bundle.manifest
    rows: list[tuple[str, str, Any]] = []
    for prec in m.precisions():
        rows.append(
            (f"onnxruntime_{prec}", f"onnxruntime/{prec}", lambda p=prec: OrtBackend(bundle, p, threads=threads))
        )
        has_variant = any(a.details.get("target") == "cpu" for a in m.artifacts if a.precision == prec)
        if has_variant:  # the station runs the CPU variant here; show the portable (TensorRT) model too
            rows.append(
                (
                    f"onnxruntime_{prec}_portable",
                    "",
                    lambda p=prec: OrtBackend(bundle, p, threads=threads, variant="portable"),
                )
            )
    if openvino_version():
        for prec in m.precisions():
            rows.append((f"openvino_{prec}", f"openvino/{prec}", lambda p=prec: OpenVinoBackend(bundle, p, threads)))
    return rows


def bench_crops(
    bundle,
    checkpoint: Path | None,
    batch: int,
    repeats: int,
    threads: int,
    skip_torch: bool = False,
) -> dict[str, Any]:
    """crops/s and golden agreement of every backend x precision, and PyTorch eager FP32, on the same crops."""
    from contextlib import ExitStack

    from hemaedge.edge.bundle import cut_crop, preprocess
    from hemaedge.edge.bundle.golden import load_golden
    from hemaedge.edge.classify.measure import golden_check, warm_up
    from hemaedge.edge.classify.select import _openvino_gate
    from hemaedge.edge.errors import BundleError, HemaedgeError
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
    try:
        golden = load_golden(bundle)
    except BundleError:
        golden = None
    out: dict[str, Any] = {
        "batch": batch,
        "threads": threads or "default",
        "crop_source": "cells cut from synthetic 640x480 frames",
        "golden": f"{len(golden.inputs)} golden inputs of the bundle" if golden is not None else "none in the bundle",
    }
    live = []
    with ExitStack() as stack:
        for name, key, factory in crop_rows(bundle, threads):
            try:
                be = stack.enter_context(factory())
            except HemaedgeError as exc:
                out[name] = {"error": str(exc), "station_candidate": key}
                continue
            row: dict[str, Any] = {
                "backend": be.name,
                "precision": be.precision,
                "model_file": Path(str(be.model_path)).name,
                "station_candidate": key,
            }
            if golden is not None:
                row["golden"] = golden_check(be, golden, bundle.manifest.output_kind)
            excluded = _openvino_gate(bundle) if key == "openvino/int8" else ""
            if excluded:  # measured, but --backend auto never picks it
                row["excluded"] = excluded
            warm_up(be, x)
            out[name] = row
            live.append((name, be, []))
        for _ in range(max(1, repeats)):  # interleaved rounds: a neighbour's load falls on every row alike
            for _name, be, rates in live:
                n, t = 0, time.perf_counter()
                while True:  # at least ROUND_S per row and round: one call of a fast model is too short a sample
                    be.classify(x)
                    n += 1
                    elapsed = time.perf_counter() - t
                    if elapsed >= ROUND_S:
                        break
                rates.append(n * batch / elapsed)
        for name, _be, rates in live:
            out[name].update(_stats(rates))
    rows = {k: v for k, v in out.items() if isinstance(v, dict) and "median" in v}
    base = (rows.get("onnxruntime_fp32") or {}).get("median")
    if base:
        out["vs_onnxruntime_fp32"] = {k: round(v["median"] / base, 2) for k, v in rows.items()}
    passing = [
        (k, v)
        for k, v in rows.items()
        if v["station_candidate"] and not v.get("excluded") and (v.get("golden") is None or v["golden"]["passed"])
    ]
    if passing:
        k, v = max(passing, key=lambda kv: kv[1]["median"])
        out["chosen"] = {
            "row": k,
            "backend": v["backend"],
            "precision": v["precision"],
            "crops_per_s": v["median"],
            "why": "the fastest row here that passes the golden check and is not excluded (what --backend auto "
            "picks at this batch and thread count)",
            "vs_onnxruntime_fp32": out.get("vs_onnxruntime_fp32", {}).get(k),
            "golden_top1_vs_fp32": (v.get("golden") or {}).get("top1_vs_fp32"),
        }
    if not skip_torch:
        missing = _missing_checkpoint(bundle, checkpoint)
        if missing:
            out["pytorch_eager_fp32"] = {"skipped": missing}
        else:
            out["pytorch_eager_fp32"] = eager_baseline(bundle, checkpoint, x, repeats, threads)
            eager = out["pytorch_eager_fp32"]["median"]
            out["speedup_vs_pytorch_eager"] = {k: round(v["median"] / eager, 2) for k, v in rows.items()}
    return out


def _missing_checkpoint(bundle, checkpoint: Path | None) -> str:  # noqa: ANN001
    """Why there is no eager baseline (no checkpoint given and none shipped for this bundle), else ``""``.

    The shipped checkpoints live in the workstation package (``hemaedge/export/checkpoints/NAME.pt``); it is
    located without importing it (the station runtime never imports workstation code).
    """
    import importlib.util

    if checkpoint is not None:
        return ""
    try:
        spec = importlib.util.find_spec("hemaedge.export")
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    name = f"{bundle.manifest.name}.pt"
    if any((Path(r) / "checkpoints" / name).is_file() for r in roots):
        return ""
    return f"no PyTorch checkpoint for bundle '{bundle.manifest.name}' (pass --checkpoint to compare with eager)"


def bench_pipeline(
    bundle,
    frames: int,
    repeats: int,
    threads: int,
    precision: str = "auto",
    segmenter: str | None = None,
    detector: str | None = None,
) -> dict[str, Any]:
    """Whole-pipeline frames/s on pre-rendered 640x480 frames through ``CountingSession``.

    The station is assembled exactly as ``hemaedge count`` assembles it (``Station.from_bundle``,
    ``--backend auto``, the same default threads and precision), so this is the backend a count would run on.
    Two runs: a panning slide (what a camera gives) and a new field every frame (worst case).
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
        "backend_choice": station.backend_reason,
        "threads": threads,
        "frames_per_run": frames,
        "views": bundle.manifest.views,  # each crop classified in this many views (the bundle's test-time views)
    }
    m = bundle.manifest
    with station:
        out["backend"] = station.backend_name  # known once loaded (ONNX Runtime names its provider then)
        out["precision"] = station.precision
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
                            "precision": station.precision,
                        },
                    )
                    counter = DifferentialCounter(m.classes, 10**9, 0.6, m.class_groups)
                    session = CountingSession(iter(pool), station, store, counter, stop_at_target=False)
                    res = session.run(interval=0.05)
                    store.close()
                    if r:  # the first run warms up
                        rates.append(res.frames / res.seconds)
                        counted.append(res.cells)
                    elif hasattr(station.backend, "settle"):  # OpenVINO: static shapes for the sizes the warm-up saw
                        station.backend.settle()
            out[name] = {"frames_per_s": _stats(rates), "cells_counted_per_run": counted}
    return out


def run(args: argparse.Namespace) -> int:
    """Benchmark and print."""
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.classify.measure import cpu_name
    from hemaedge.edge.models import default_bundle_path

    bundle = load_bundle(args.bundle or default_bundle_path())
    batch = args.batch or default_batch(bundle)
    if batch < 1:
        raise UsageError("--batch must be at least 1")
    res: dict[str, Any] = {
        "bundle": str(bundle.path),
        "threads": args.threads or "default",
        "machine": {"cpu": cpu_name(), "cores": _cores(), "load_average_at_start": load_average()},
    }
    res["crops"] = bench_crops(
        bundle,
        Path(args.checkpoint) if args.checkpoint else None,
        batch,
        args.repeats,
        args.threads,
        args.skip_torch,
    )
    if not args.skip_pipeline:
        res["pipeline"] = bench_pipeline(
            bundle,
            args.frames,
            max(3, args.repeats // 2),
            args.threads,
            segmenter=args.segmenter,
            detector=args.detector,
        )
    res["machine"]["load_average_at_end"] = load_average()
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print_report(res)
    return 0


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def print_report(res: dict[str, Any]) -> None:
    """One table of every backend x precision, then the pipeline lines."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    c = res["crops"]
    chosen = (c.get("chosen") or {}).get("row")
    speed = c.get("speedup_vs_pytorch_eager", {})
    vs_ort = c.get("vs_onnxruntime_fp32", {})
    t = Table(
        "backend",
        "precision",
        "model file",
        "crops/s",
        "min",
        "max",
        "golden top-1 (vs)",
        "x ORT FP32",
        "x eager",
        title=f"{Path(res['bundle']).name}: batch {c['batch']}, threads {c['threads']}",
    )
    for k, v in c.items():
        if not isinstance(v, dict) or "station_candidate" not in v:
            continue
        if "error" in v:
            t.add_row(k, "", "", "[red]not usable[/]", "", "", v["error"][:60], "", "")
            continue
        g = v.get("golden")
        gtext = "n/a" if g is None else f"{g['top1_agreement']:.2f} ({g['reference']})"
        if g is not None and not g["passed"]:
            gtext = f"[red]{gtext} FAIL[/]"
        name = f"[bold]{v['backend']}[/] ◀" if k == chosen else v["backend"]
        if not v["station_candidate"]:
            name = f"[dim]{v['backend']} (portable model)[/]"
        elif v.get("excluded"):
            name = f"[dim]{v['backend']} (excluded)[/]"
        t.add_row(
            name,
            v["precision"],
            v["model_file"],
            f"{v['median']:.0f}",
            f"{v['min']:.0f}",
            f"{v['max']:.0f}",
            gtext,
            f"{vs_ort[k]:.2f}" if k in vs_ort else "",
            f"{speed[k]:.2f}" if k in speed else "",
        )
    eager = c.get("pytorch_eager_fp32")
    if eager and "median" in eager:
        t.add_row("pytorch eager", "fp32", "", f"{eager['median']:.0f}", f"{eager['min']:.0f}", f"{eager['max']:.0f}")
    con.print(t)
    if chosen:
        con.print(f"◀ {c['chosen']['why']}", style="dim", highlight=False)
    for v in c.values():
        if isinstance(v, dict) and v.get("excluded"):
            con.print(f"{v['backend']} {v['precision']} excluded: {v['excluded']}", style="dim", highlight=False)
    if eager and "skipped" in eager:
        con.print(f"PyTorch eager baseline skipped: {eager['skipped']}", style="dim", highlight=False)
    if "pipeline" in res:
        p = res["pipeline"]
        con.print(f"pipeline backend: {p['backend_choice']}", style="dim", highlight=False)
        for name in ("panning_slide", "new_field_every_frame"):
            f = p[name]["frames_per_s"]
            con.print(
                f"pipeline {name} ({p['segmenter']} segmenter, {p['backend']} {p['precision']}, {p['threads']} "
                f"thread(s), 640x480): {f['median']:.1f} frames/s (min {f['min']:.1f}, max {f['max']:.1f}, "
                f"{f['runs']} runs, {statistics.median(p[name]['cells_counted_per_run']):.0f} cells counted per run)",
                highlight=False,
            )
    m = res["machine"]
    con.print(
        f"{m['cpu']}, {m['cores']} cores; load average at start {m['load_average_at_start']}, "
        f"at end {m['load_average_at_end']}",
        style="dim",
        highlight=False,
    )
