"""``hemaedge collect``: save the crops the station cuts, as an image folder for INT8 calibration.

    hemaedge collect csi://0 --out calib/ --max 500
    export-model ... --int8 --calib calib/

The crops are cut exactly as ``hemaedge count`` cuts them (same segmenter,
same ``cut_crop`` with the bundle's crop geometry, each physical cell once),
so INT8 is calibrated on this microscope, camera and stain. Layout:
``DIR/unlabelled/*.png``, or with ``--by-class`` one folder per predicted class
(low-confidence cells stay in ``unlabelled/``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from hemaedge.edge.count import DEFAULT_REVIEW_THRESHOLD
from hemaedge.edge.errors import UsageError
from hemaedge.edge.store.crop_folder import UNLABELLED, CropFolder


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge collect``."""
    parser.add_argument("source", nargs="?", help="camera, video, image folder/glob or synthetic://")
    parser.add_argument(
        "--labelled",
        metavar="DATA",
        help="instead of a source: cut the station's crops of labelled cells (DATA/<class>/*, BCCD-style frames or "
        "DATA/labels.csv) into OUT/<class>/ (training data cut exactly as the station cuts)",
    )
    parser.add_argument("--split", default=None, help="with --labelled: the split to read (train, val, test)")
    parser.add_argument("--out", required=True, help="output image folder (crops go to OUT/unlabelled/)")
    parser.add_argument(
        "--bundle",
        help="bundle whose crop geometry (and, with --by-class, model) to use (default: the shipped default, hemanet64-sn)",
    )
    parser.add_argument("--max", type=int, default=None, help="stop after this many crops")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    parser.add_argument("--by-class", action="store_true", help="one folder per predicted class (runs the model)")
    parser.add_argument("--precision", default="auto", help="with --by-class: model precision (default auto)")
    parser.add_argument("--backend", default="auto", help="with --by-class: backend (default auto)")
    parser.add_argument(
        "--review-threshold",
        type=float,
        default=DEFAULT_REVIEW_THRESHOLD,
        help="with --by-class: below this top probability a crop stays unlabelled",
    )
    from hemaedge.edge.commands.segmenter_options import add_segmenter_options

    add_segmenter_options(parser)
    parser.add_argument(
        "--count-edge-cells",
        action="store_true",
        help="also keep cells cut by the frame border (always on for still images)",
    )
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``hemaedge collect``."""
    from hemaedge.edge.commands.segmenter_options import scale_info
    from hemaedge.edge.sources import open_source
    from hemaedge.edge.station import Station
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if bool(args.source) == bool(args.labelled):
        raise UsageError("give a SOURCE to collect from, or --labelled DATA (not both)")
    if args.labelled:
        return _collect_labelled(args)
    if args.max is not None and args.max < 1:
        raise UsageError("--max must be at least 1")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError("--max-frames must be at least 1")
    if not args.by_class and (args.precision != "auto" or args.backend != "auto"):
        raise UsageError("--precision/--backend only matter with --by-class (plain collection runs no model)")
    station = Station.from_bundle(
        args.bundle,
        segmenter=args.segmenter,
        backend=args.backend if args.by_class else None,
        precision=args.precision,
        scale=args.px_per_um,
        detector=args.detector,
    )
    m = station.manifest
    folder = CropFolder(args.out, by_class=args.by_class)
    source = open_source(args.source)
    finder = station.cell_finder(source, count_edge_cells=args.count_edge_cells)
    why = station.backend_reason
    err = Console(stderr=True)
    per_class: dict[str, int] = {}
    frames = skipped = 0
    done = False
    progress = Progress(
        TextColumn("collecting"),
        BarColumn(),
        TextColumn("{task.completed} crops, {task.fields[f]} frames"),
        TimeElapsedColumn(),
        console=err,
        disable=args.json or not err.is_terminal,
    )
    with station, source, progress:
        task = progress.add_task("crops", total=args.max, f=0)
        for frame in source:
            frames += 1
            found = finder.find(frame)
            skipped += bool(found.skipped)
            crops = list(found.crops)
            if args.max is not None:
                crops = crops[: args.max - folder.written]
            names: list[str | None] = [None] * len(crops)
            if crops and args.by_class:
                for i, pred in enumerate(station.predict(crops)):
                    names[i] = None if pred.confidence < args.review_threshold else pred.class_name
            for i, (crop, name) in enumerate(zip(crops, names)):
                folder.write(crop.pixels, frame.index, frame.name, i, name)
                key = name or UNLABELLED
                per_class[key] = per_class.get(key, 0) + 1
            progress.update(task, completed=folder.written, f=frames)
            if args.max is not None and folder.written >= args.max:
                done = True
                break
            if args.max_frames is not None and frames >= args.max_frames:
                break
    doc = {
        "out": str(Path(args.out)),
        "crops": folder.written,
        "frames": frames,
        "frames_skipped": skipped,
        "folders": per_class,
        "bundle": m.name,
        "crop_geometry": asdict(m.crop),
        "complete": done or args.max is None,
        "segmenter": station.segmenter_name,
        **scale_info(station.segmenter),
    }
    if why:
        doc["backend_choice"] = why
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        err.print(
            f"wrote {folder.written} crops from {frames} frames to {args.out} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(per_class.items())) or 'none'})"
        )
        if folder.written:
            err.print(f"calibrate INT8 on them: export-model ... --int8 --calib {args.out}")
    if folder.written == 0:
        print("warning: no white cells found; nothing written", file=sys.stderr)
        return 1
    return 0


def _collect_labelled(args: argparse.Namespace) -> int:
    """``--labelled DATA``: each labelled cell cut as the station cuts it, into ``OUT/<class>/<image>.png``.

    Class folders carry the vocabulary's canonical names (``ig`` -> ``immature_granulocyte``), so the crops train
    and calibrate any bundle. The data set is one session: crops at session scale share its median cell size.
    Labelled cells the segmenter misses are listed, not silently dropped.
    """
    import cv2
    from hemaedge.edge.bundle.vocabulary import canonical_or_same
    from hemaedge.edge.station import Station

    if args.by_class or args.max is not None or args.max_frames is not None:
        raise UsageError("--labelled takes its classes from the labels: --by-class/--max/--max-frames do not apply")
    from hemaedge.evaluation.labelled import read_labelled
    from hemaedge.evaluation.station import station_crops

    station = Station.from_bundle(args.bundle, segmenter=args.segmenter, backend=None)
    cells, kind = read_labelled(args.labelled, args.split)
    crops, typical = station_crops(station, cells)
    out = Path(args.out)
    per_class: dict[str, int] = {}
    for i, crop in crops:
        cls = canonical_or_same(cells[i].label)
        (out / cls).mkdir(parents=True, exist_ok=True)
        name = f"{cells[i].image.stem}.png"
        if not cv2.imwrite(str(out / cls / name), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)):
            raise UsageError(f"cannot write {out / cls / name}")
        per_class[cls] = per_class.get(cls, 0) + 1
    missed = sorted({str(cells[i].image) for i in set(range(len(cells))) - {i for i, _ in crops}})
    doc = {
        "out": str(out),
        "data": str(args.labelled),
        "layout": kind,
        "crops": len(crops),
        "labelled": len(cells),
        "not_found": missed,
        "folders": per_class,
        "typical_cell_side_px": typical,
        "bundle": station.manifest.name,
        "crop_geometry": asdict(station.geometry),
    }
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(
            f"wrote {len(crops)} crops of {len(cells)} labelled cells to {out} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(per_class.items()))})",
            file=sys.stderr,
        )
        if missed:
            print(
                f"warning: the segmenter did not find {len(missed)} labelled cells (listed with --json)",
                file=sys.stderr,
            )
    return 0 if crops else 1
