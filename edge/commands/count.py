"""``hemaedge count``: a live differential count from a camera, a video, images, or ``--demo``.

Examples::

    hemaedge count --demo                          # synthetic smear + shipped model, no camera or GPU
    hemaedge count csi://0 --target 200            # Jetson CSI camera
    hemaedge count 'frames/*.jpg' --no-tui --json  # for scripts: totals + every counted cell
    hemaedge count --resume sessions/20261126-101500   # continue after a crash or power cut

Every cell is written to the session store before it is counted; at the end
``summary.json``, ``cells.csv`` and ``report.html`` are written into the session
directory (``--out``, default ``sessions/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hemaedge.edge.bundle import Bundle, load_bundle
from hemaedge.edge.bundle.io import sha256_file
from hemaedge.edge.commands.segmenter_options import add_segmenter_options, scale_info
from hemaedge.edge.count import DEFAULT_REVIEW_THRESHOLD, DEFAULT_TARGET, REVIEW
from hemaedge.edge.errors import HemaedgeError, StoreError, Terminated, UsageError
from hemaedge.edge.records import SessionState
from hemaedge.edge.station import DEFAULT_THREADS, is_stills
from hemaedge.edge.store import SessionStore, StoredCell
from hemaedge.edge.store.crop_folder import CropFolder

DEMO_SOURCE = "synthetic://?seed=0&frames=8000&pan=6&wbc=4"
DEMO_NOTE = (
    "demo: the cells are drawn by the synthetic smear, not photographed; the differential shows what the "
    "model makes of drawn cells and is not a blood count"
)
DEMO_FPS = 30.0
DEFAULT_OUT = "sessions"
PRECISION_CHOICES = ("auto", "int8", "fp16", "fp32")


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge count``."""
    parser.add_argument(
        "source",
        nargs="?",
        help="camera (0, v4l2:///dev/video0, csi://0, picam://0), rtsp://..., "
        "a video, an image, a folder or a glob, or synthetic://?seed=N",
    )
    parser.add_argument("--bundle", help="model bundle directory or shipped name (default: hemanet64-sn)")
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=None,
        help="model precision to run (default: auto = the fastest this backend has)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        help="auto, tensorrt, ort-tensorrt, ort-cuda, ort-cpu or openvino (default auto: on a CPU, the fastest "
        "measured here that reproduces the bundle's golden outputs)",
    )
    parser.add_argument(
        "--target",
        type=int,
        default=None,
        help=f"white cells to count (default {DEFAULT_TARGET}; a folder of pictures is counted whole unless given)",
    )
    parser.add_argument(
        "--review-threshold",
        type=float,
        default=None,
        help=f"top probability below which a cell goes to review (default {DEFAULT_REVIEW_THRESHOLD})",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"where sessions are created (default {DEFAULT_OUT}/)")
    parser.add_argument("--resume", metavar="SESSION", help="continue a session (its directory, or its name in --out)")
    parser.add_argument("--no-tui", action="store_true", help="plain output: one line per counted cell")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON document at the end (totals + every counted cell); implies --no-tui",
    )
    parser.add_argument(
        "--save-crops",
        metavar="DIR",
        help="also write each counted cell's crop to DIR/unlabelled/ (for export-model --calib DIR)",
    )
    parser.add_argument("--by-class", action="store_true", help="with --save-crops: one folder per predicted class")
    parser.add_argument("--demo", action="store_true", help="synthetic smear + shipped model; no camera, no GPU")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    parser.add_argument(
        "--max-fps",
        type=float,
        default=None,
        help=f"read at most this many frames/s (default: as fast as possible; {DEMO_FPS:g} for --demo)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"ONNX Runtime intra-op threads (default {DEFAULT_THREADS}: all cores but one, which the "
        "capture thread needs; 0 = ONNX Runtime's default)",
    )
    add_segmenter_options(parser)
    parser.add_argument(
        "--platelets",
        action="store_true",
        help="also estimate platelets per 100 white cells (a rough estimate: the station finds about 55-70%% of "
        "labelled platelets on our test frames); without it the report says 'not estimated'",
    )
    parser.add_argument(
        "--count-edge-cells",
        action="store_true",
        help="also count cells cut by the frame border (default: on a moving view, wait until the "
        "cell is fully in view; still images always count them, there is no later view)",
    )


# ---------------------------------------------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory options before any work."""
    if args.demo and args.source:
        raise UsageError("--demo uses the synthetic smear; give either a SOURCE or --demo, not both")
    if args.demo and args.resume:
        raise UsageError("--demo starts a new session; resume it with --resume SESSION alone")
    if not (args.source or args.demo or args.resume):
        raise UsageError(
            "nothing to count: give a SOURCE (0, csi://0, a video, images...) or --demo or --resume SESSION"
        )
    if args.by_class and not args.save_crops:
        raise UsageError("--by-class only applies with --save-crops DIR")
    if args.target is not None and args.target < 1:
        raise UsageError("--target must be at least 1")
    if args.review_threshold is not None and not 0.0 < args.review_threshold < 1.0:
        raise UsageError("--review-threshold must lie strictly between 0 and 1")
    if args.max_fps is not None and args.max_fps <= 0:
        raise UsageError("--max-fps must be positive")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError("--max-frames must be at least 1")


def _default_bundle() -> Path:
    from hemaedge.edge.models import default_bundle_path

    return default_bundle_path()


def _session_dir(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = out / stamp, 1
    while path.exists():
        n += 1
        path = out / f"{stamp}-{n}"
    return path


def _resolve_resume(args: argparse.Namespace) -> Path:
    p = Path(args.resume)
    if not p.exists() and not p.is_absolute() and (Path(args.out) / p).exists():
        p = Path(args.out) / p
    return p


def _manifest_sha(bundle: Bundle) -> str:
    return sha256_file(bundle.path / "manifest.json")


class Plan:
    """Everything decided before the expensive work starts."""

    def __init__(self) -> None:
        self.bundle: Bundle
        self.store: SessionStore | None = None
        self.session_dir: Path
        self.resume = False
        self.source: str = ""
        self.precision: str = "auto"
        self.target = DEFAULT_TARGET
        self.review_threshold = DEFAULT_REVIEW_THRESHOLD


def _check_resume(root: Path, s: dict[str, Any], args: argparse.Namespace) -> Bundle:
    """The session's bundle, after refusing options that would mix two ways of counting in one session."""
    bundle = load_bundle(args.bundle or s["bundle"])
    if _manifest_sha(bundle) != s.get("bundle_sha256"):
        raise UsageError(
            f"session {root} was counted with bundle {s.get('bundle_name')!r} ({s.get('bundle')}); "
            f"{bundle.path} is a different model: counts cannot be mixed (start a new session)"
        )
    if args.precision not in (None, "auto") and args.precision != s["precision"]:
        raise UsageError(f"session {root} ran at {s['precision']}; resuming at {args.precision} would mix models")
    if args.review_threshold is not None and abs(args.review_threshold - s["review_threshold"]) > 1e-9:
        raise UsageError(f"session {root} used review threshold {s['review_threshold']}; it cannot change mid-count")
    return bundle


def plan(args: argparse.Namespace) -> Plan:
    """Validate the options against each other and against a resumed session; no model is loaded yet."""
    _check_args(args)
    p = Plan()
    if args.resume:
        root = _resolve_resume(args)
        store = SessionStore.open(root)
        try:
            if store.signed_off():
                raise UsageError(
                    f"session {root} is signed off: its cells are verified and locked; count more in a new session"
                )
            bundle = _check_resume(root, store.settings, args)
        except BaseException:
            store.close()
            raise
        s = store.settings
        p.store, p.bundle, p.session_dir, p.resume = store, bundle, root, True
        p.source = args.source or s["source"]
        p.precision = s["precision"]
        p.target = args.target if args.target is not None else int(s["target"])
        p.review_threshold = float(s["review_threshold"])
        return p
    p.bundle = load_bundle(args.bundle) if args.bundle else load_bundle(_default_bundle())
    p.session_dir = _session_dir(Path(args.out))
    p.source = DEMO_SOURCE if args.demo else args.source
    p.precision = args.precision or "auto"
    p.target = args.target if args.target is not None else DEFAULT_TARGET
    p.review_threshold = args.review_threshold if args.review_threshold is not None else DEFAULT_REVIEW_THRESHOLD
    return p


# ---------------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Run ``hemaedge count``.

    Exit status: 0 when cells were counted (the target reached or not: the terminal and the report say which),
    2 when no input could be used (nothing was read), 130 after Ctrl-C, 143 after SIGTERM (reports are written in
    every case).
    """
    from hemaedge.edge.station import Station
    from rich.console import Console

    p = plan(args)
    use_json = bool(args.json)
    use_tui = not (args.no_tui or use_json) and sys.stdout.isatty()
    err = Console(stderr=True, highlight=False)
    store = p.store
    try:
        station = Station.from_bundle(
            p.bundle,
            segmenter=args.segmenter,
            backend=args.backend,
            precision=p.precision,
            threads=args.threads,
            scale=args.px_per_um or _resumed_scale(p),
            detector=args.detector,
        )
        if p.resume and _already_complete(store, p, err):
            return 0
        return _count(args, p, station, err, use_json, use_tui)
    finally:
        if p.store is not None:
            p.store.close()


def _already_complete(store: SessionStore, p: Plan, err: Any) -> bool:
    """A resumed session that already holds its target: say so (and how to count more) instead of counting."""
    from hemaedge.edge.count import DifferentialCounter

    s = store.settings
    counter = DifferentialCounter(s["classes"], p.target, p.review_threshold, s.get("class_groups"))
    for c in store.read_cells():
        counter.add(c.class_index, c.review)
    if not counter.done:
        return False
    err.print(
        f"session {store.root} is complete: {counter.total}/{p.target} white cells (source {s.get('source') or '?'}); "
        f"its reports are in {store.root}. To count more: hemaedge count --resume {store.root} --target "
        f"{counter.total + 100}"
    )
    return True


def _count(args: argparse.Namespace, p: Plan, station: Any, err: Any, use_json: bool, use_tui: bool) -> int:
    """Open the source, then the store (so a camera that cannot open leaves no empty session), count, report."""
    from hemaedge.edge.count import DifferentialCounter
    from hemaedge.edge.counting import CountingSession, restore
    from hemaedge.edge.display.report import build_summary, write_reports
    from hemaedge.edge.sources import open_source
    from rich.console import Console

    m = station.manifest
    platelets = bool(args.platelets)
    if platelets and not station.platelet_classes:
        raise UsageError(f"--platelets: bundle {m.name!r} has no platelet class, so it cannot estimate platelets")
    source = open_source(p.source)
    sigterm = _graceful_sigterm()
    interrupted = False
    with station, source, sigterm:
        precision = station.precision or p.precision
        if p.resume and precision != p.precision:  # pragma: no cover - select honours an explicit precision
            raise UsageError(f"this machine runs the model at {precision}, the session at {p.precision}")
        store = p.store or SessionStore.create(
            p.session_dir,
            {
                "bundle": str(station.bundle.path.resolve()),
                "bundle_name": m.name,
                "bundle_notice": m.notice,
                "bundle_sha256": _manifest_sha(station.bundle),
                "precision": precision,
                "backend": station.backend_name,
                "classes": list(m.classes),
                "class_groups": m.class_groups,
                "target": p.target,
                "review_threshold": p.review_threshold,
                "source": p.source,
                "demo": bool(args.demo),
                "segmenter": station.segmenter_name,
                "platelets": platelets,
                "triage_rules": station.triage_rules.to_dict() if station.triage_rules is not None else None,
            },
        )
        p.store = store  # closed by run()
        if p.resume:
            if p.target != int(store.settings["target"]):
                store.update_settings(target=p.target)
            store.log("resumed", f"source {p.source}")
        platelets = bool(store.settings.get("platelets", platelets))
        counter = DifferentialCounter(m.classes, p.target, p.review_threshold, m.class_groups)
        tracker = station.tracker(source, args.count_edge_cells)
        before = restore(store, counter, tracker) if p.resume else []
        crops = CropFolder(args.save_crops, args.by_class, prefix=f"{store.root.name}-") if args.save_crops else None
        max_fps = args.max_fps if args.max_fps is not None else (DEMO_FPS if args.demo and use_tui else None)
        printer = None if (use_tui or use_json) else _CellPrinter()
        session = CountingSession(
            source,
            station,
            store,
            counter,
            finder=station.cell_finder(source, tracker=tracker),
            precision=precision,
            session_name=str(store.root),
            max_frames=args.max_frames,
            max_fps=max_fps,
            crop_folder=crops,
            on_cell=printer,
            on_warning=None if use_tui else _warning_printer(err),
            # A folder of pictures (an analyser's single-cell export, or fields already photographed) is counted whole:
            # every picture is read, as the technician would read every cell of it; --target N stops at N instead.
            stop_at_target=not (is_stills(source) and args.target is None and not p.resume),
            note=DEMO_NOTE if p.source == DEMO_SOURCE else "",
            platelets=platelets,
            not_estimated=() if platelets else station.platelet_classes,
        )
        if args.demo and not use_json:
            err.print(f"[yellow]{DEMO_NOTE}[/]")
        if not use_json:
            err.print(
                f"[dim]session {store.root} | {station.backend_reason} | source {p.source}"
                + (f" | resumed with {len(before)} cells" if p.resume else "")
                + "[/]"
            )
        try:
            if use_tui:
                from hemaedge.edge.display.tui import run_live

                run_live(session, Console(), lambda: _snapshot(store, session))
            else:
                session.run()
        except KeyboardInterrupt:
            interrupted = True
        except HemaedgeError:
            pass  # raised again by session.result() below, once the source is closed
    try:
        result = session.result()  # re-raises a thread's Source/Store/BackendError
    except HemaedgeError as exc:
        # the cells counted so far are safe in the store: leave a report of them when the disk allows it
        if not isinstance(exc, StoreError):
            with contextlib.suppress(OSError, HemaedgeError):
                write_reports(store, info={**_info(session, None, p, station), "error": str(exc)})
        raise
    info = _info(session, result, p, station)
    if info.get("scale"):
        store.update_settings(scale=info["scale"])  # a resumed session keeps it
    summary, cells, _ = build_summary(store, info)
    try:
        paths = write_reports(store, info=info, built=(summary, cells))
    except OSError as exc:
        raise StoreError(f"cannot write the reports into {store.root}: {exc.strerror or exc}") from exc
    store.log("finished", str(info.get("state", "")))
    if use_json:
        doc = {
            **summary,
            "reports": {k: str(v) for k, v in paths.items()},
            "cells": [_cell_json(c) for c in cells],
        }
        print(json.dumps(doc, indent=1))
    else:
        _print_final(err if use_tui else Console(highlight=False), summary, paths)
        if "note" in info:
            err.print(f"[yellow]{info['note']}[/]")
    code = _endings(err, result, summary, p)
    if interrupted:
        return 143 if sigterm.fired else 130
    return code


def _endings(err: Any, result: Any, summary: dict[str, Any], p: Plan) -> int:
    """Say what did not happen (target not reached, inputs not used or not read); the exit status."""
    from rich.markup import escape

    inputs = result.inputs
    d = summary["differential"]
    if inputs.message():
        err.print(f"[yellow]warning:[/] {escape(inputs.message())}")
    check = summary.get("detector_check") or {}
    if check.get("decision") == "both":  # the detector missed this microscope's white cells
        err.print(f"[yellow]warning:[/] {escape(check['describe'])}")
    if not inputs.used and not p.resume:
        if inputs.total:
            what = f"none of the {inputs.total} images could be used"
        elif inputs.read:
            what = f"none of the {inputs.read} frames could be used"
        else:
            what = f"the source gave no frames ({p.source})"
        err.print(f"[bold red]error:[/] {what}: nothing was counted (see {p.store.root}/summary.json)")
        return 2
    if not d["complete"] and result.state != SessionState.STOPPED:
        err.print(
            f"[yellow]target not reached:[/] {d['total_wbc']}/{d['target']} white cells: the source ended "
            f"({escape(str(p.source))}); add more fields with hemaedge count SOURCE --resume {p.store.root}"
        )
    return 0


def _info(session: Any, result: Any, p: Plan, station: Any) -> dict[str, Any]:
    st = session.status()
    info: dict[str, Any] = {
        "backend": st.backend,
        "backend_choice": station.backend_reason,
        "segmenter": station.segmenter_name,
        **scale_info(station.segmenter),
        "source": p.source,
        "state": st.state,
        "frames": st.frames,
        "skipped_frames": st.skipped,
        "edge_cells_deferred": st.at_edge,
        "resumed": p.resume,
        "inputs": session.inputs().to_dict(),
        "not_estimated": list(session.not_estimated),
        "views": station.manifest.views,  # each crop classified in this many views, their probabilities averaged
    }
    spec = station.manifest.input
    finder = getattr(session, "finder", None)
    if spec.stain_ref and finder is not None:  # the session's stain normalisation, as the model saw it
        from hemaedge.edge.bundle.preprocess import stain_angles, stain_gain

        strength = finder.stain.strength
        gain = stain_gain(strength, spec)
        info["stain"] = {
            "strength": None if strength is None else round(strength, 3),
            "reference": spec.stain_ref,
            "gain": round(gain, 3),
            "cells_measured": len(finder.stain),
        }
        angles = stain_angles(finder.stain.vectors, spec)
        if angles is not None:  # how far this slide's two stains lie from the reference's (mapped onto them)
            info["stain"]["stain_angles_deg"] = [round(a, 1) for a in angles]
        if strength and gain in spec.stain_gain_range:  # the bound held it: the model sees a paler/heavier stain
            info["stain"]["warning"] = (
                f"this slide's stain is {'paler' if gain > 1 else 'heavier'} than the model can normalise "
                f"(strength {strength:.2f}, reference {spec.stain_ref:.2f}): check the differential on a few cells "
                "(hemaedge evaluate --station) before trusting it"
            )
    if p.source == DEMO_SOURCE:
        info["note"] = DEMO_NOTE
    if result is not None:
        info["seconds"] = round(result.seconds, 2)
        info["frames_per_s"] = round(result.frames / result.seconds, 1) if result.seconds > 0 else 0.0
        info["cells_this_run"] = result.cells
    return info


def _resumed_scale(p: Plan) -> float | None:
    """A resumed session keeps the scale it measured (same microscope): the stored pixels per micron."""
    if not p.resume or p.store is None:
        return None
    scale = p.store.settings.get("scale") or {}
    return float(scale["px_per_um"]) if scale.get("px_per_um") else None


def _cell_json(c: StoredCell) -> dict[str, Any]:
    d = c.to_dict()
    d.pop("probabilities")
    return d


class _CellPrinter:
    """``--no-tui``: one line per counted cell, flushed as soon as the cell is stored and counted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, cell: StoredCell, bucket: str) -> None:
        where = cell.frame_name or f"frame {cell.frame_index}"
        box = ",".join(f"{v:.0f}" for v in cell.box)
        with self.lock:
            print(f"cell {cell.id:5d}  {bucket:<22s} p={cell.confidence:.2f}  {where}  box={box}", flush=True)


def _warning_printer(err: Any):  # noqa: ANN202
    """``--no-tui``/``--json``: each warning (an unreadable image, a skipped frame) as one line on stderr, at once."""
    from rich.markup import escape

    lock = threading.Lock()

    def warn(text: str) -> None:
        with lock:
            err.print(f"[yellow]warning:[/] {escape(text)}")

    return warn


def _snapshot(store: SessionStore, session: Any) -> str:
    from hemaedge.edge.display.report import write_reports

    out = store.root / "snapshots" / time.strftime("%Y%m%d-%H%M%S")
    try:
        write_reports(store, out, info={"state": "snapshot", "backend": session.backend_name})
    except OSError as exc:
        return f"snapshot failed: {exc.strerror or exc}"
    return f"snapshot saved: {out}"


def _print_final(console: Any, summary: dict[str, Any], paths: dict[str, Path]) -> None:
    """The final table, in the live table's order (white cells, review, then the classes per 100 white cells)."""
    from hemaedge.edge.bundle.vocabulary import display_name
    from hemaedge.edge.display.status import display_order
    from rich.markup import escape
    from rich.table import Table

    d = summary["differential"]
    rows = {r["class"]: r for r in d["classes"]}
    classes = [r["class"] for r in d["classes"] if r["class"] != REVIEW]
    order = display_order(classes, [rows[c]["in_differential"] for c in classes])
    t = Table(title=f"{d['total_wbc']}/{d['target']} white cells", show_edge=False)
    for col, just in (("class", "left"), ("n", "right"), ("%", "right"), ("95% CI", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    for name in order:
        row, label = rows[name], display_name(name) if name != REVIEW else REVIEW
        if not row.get("estimated", True):
            t.add_row(label, "-", "", "not estimated", style="dim")
        elif row["in_differential"]:
            lo, hi = row["ci95"]
            t.add_row(label, str(row["count"]), f"{row['percent']:.1f}", f"{lo:.1f}-{hi:.1f}")
        else:
            t.add_row(label, str(row["count"]), "", f"{row['per_100_wbc']:.1f} /100 WBC", style="dim")
    console.print(t)
    if d["total_wbc"] == 0:
        console.print("[yellow]no white cells were counted: nothing could be flagged[/]")
    for f in d["flags"]:
        console.print(f"[magenta]* {f}[/]")
    t = summary.get("triage")
    if t:
        apl = f", APL probability {t['apl_probability']:.2f}" if t.get("apl_probability") is not None else ""
        style = "bold red" if t["call"] in ("acute", "chronic") else "bold"
        console.print(f"[{style}]slide triage: {t['call'].upper()}[/] ({escape(t['rule'])}{apl})")
    stain = (summary.get("stain") or {}).get("warning")
    if stain:
        console.print(f"[yellow]{escape(stain)}[/]")
    notice = summary.get("bundle", {}).get("notice")
    if notice:
        console.print(f"[dim]model terms: {escape(notice)}[/]")
    console.print(f"report: {paths['report']}")


class _graceful_sigterm:
    """Turn SIGTERM (systemd stop) into a ``Terminated`` interrupt, so the session stops cleanly and writes its
    reports; ``fired`` tells the caller to exit 143 (128 + SIGTERM), the convention, not Ctrl-C's 130."""

    def __enter__(self) -> _graceful_sigterm:
        self.old = None
        self.fired = False
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    def _raise(self, signum: int, frame: Any) -> None:
        self.fired = True
        raise Terminated

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
