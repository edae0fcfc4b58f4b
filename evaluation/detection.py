"""``hemaedge evaluate --detect DATA [DATA...]``: recall and precision of white-cell detection on labelled folders.

Replaces ``tools/eval_detect.py``. The folders are Pascal VOC or YOLO (``hemaedge.evaluation.frames``);
the table is per source (``sources.csv``) and per folder. ``--segmenter checked`` (the default) scores the detector
bundle checked against the stain segmenter as a session does (each source one session), ``--segmenter learned`` the
detector alone (each image's scale measured on its own red cells: still images may come from several microscopes);
``--phone N`` instead builds N synthetic phone-through-the-eyepiece frames from the folders' frames
(``hemaedge.export.detector.phone``: a stress test, not real phone pictures) and scores those.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hemaedge.edge.errors import UsageError


def configure_detect(p: argparse.ArgumentParser) -> None:
    """The ``--detect`` options of ``hemaedge evaluate`` (``--detect`` itself is in the command's choice of what to
    evaluate; ``--segmenter``, ``--split``, ``--bundle``... are shared)."""
    g = p.add_argument_group("white-cell detection (--detect)")
    g.add_argument(
        "--detector", default=None, help="detector bundle for --segmenter checked or learned (default: the shipped one)"
    )
    g.add_argument(
        "--scale",
        default="frame",
        help="learned detector: 'frame' (measure every image, default), 'session' (one scale for all, from the "
        "first images) or pixels per micron",
    )
    g.add_argument(
        "--threshold", type=float, default=None, help="learned detector: heatmap threshold (default: the bundle's)"
    )
    g.add_argument(
        "--half", choices=["a", "b"], default=None, help="YOLO folders: only this half of the file names (md5)"
    )
    g.add_argument(
        "--source", action="append", default=[], metavar="NAME", help="only images of this source (sources.csv); repeat"
    )
    g.add_argument("--iou", type=float, default=0.5, help="match threshold (default 0.5)")
    g.add_argument("--failures", type=Path, default=None, help="write the images with misses or false detections here")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stain segmenter: a setting to try")
    g.add_argument(
        "--phone", type=int, default=0, metavar="N", help="score N synthetic phone-through-eyepiece frames instead"
    )
    g.add_argument("--phone-seed", type=int, default=0)


def make_detector(args: argparse.Namespace) -> Any:
    """The segmenter the options ask for."""
    from hemaedge.edge.segment import DETECTOR_SEGMENTERS, default_segmenter_name, make_segmenter

    name = args.segmenter or ("checked" if args.detector else default_segmenter_name())
    if name not in DETECTOR_SEGMENTERS:
        if args.detector or args.threshold is not None:
            raise UsageError("--detector and --threshold are for --segmenter checked or learned")
        from hemaedge.evaluation.frames import config_overrides

        return make_segmenter(name, **config_overrides(args.set))
    if args.set:
        raise UsageError("--set changes the stain segmenter's settings; the learned detector has --threshold")
    scale: Any = args.scale
    if scale == "session":
        scale = None
    elif scale != "frame":
        try:
            scale = float(scale)
        except ValueError:
            raise UsageError(f"--scale must be frame, session or pixels per micron, not {args.scale!r}") from None
    return make_segmenter(name, bundle=args.detector, scale=scale, threshold=args.threshold)


def run_detect(args: argparse.Namespace) -> int:
    """Score detection and print a table (or JSON)."""
    import numpy as np
    from hemaedge.edge.segment import DETECTOR_SEGMENTERS
    from hemaedge.evaluation.frames import folder_items, report_table, score_detections

    if not 0 < args.iou <= 1:
        raise UsageError(f"--iou must be within (0, 1], not {args.iou}")
    split = args.split or "all"
    seg = make_detector(args)
    name = getattr(seg, "name", "?")
    results: dict[str, Any] = {}
    failures: list[str] = []

    def note(item, dets, counts) -> None:  # noqa: ANN001
        if counts[1] or counts[2]:
            failures.append(f"{item.source}\t{item.path}\ttp={counts[0]} fp={counts[1]} fn={counts[2]}")

    if args.phone:
        from hemaedge.evaluation.frames import RBC_NAMES
        from hemaedge.export.detector.phone import Tile, phone_set, score_phone

        tiles = []
        for root in args.detect:
            rbc = {str(it.path): it.boxes for it in folder_items(root, split, args.half, RBC_NAMES)}
            tiles += [
                Tile(str(it.path), it.boxes, rbc.get(str(it.path), np.zeros((0, 4))), it.source)
                for it in _only(folder_items(root, split, args.half), args.source)
            ]
        if not tiles:
            raise UsageError("no labelled frames to build phone frames from")
        frames = phone_set(tiles, args.phone, args.phone_seed)

        def detect(img):  # noqa: ANN001, ANN202
            dets = [d for d in seg.detect(img) if d.kind == "wbc"]
            return np.asarray([d.box for d in dets], np.float32).reshape(-1, 4), np.asarray([d.score for d in dets])

        results[f"phone x{args.phone} (synthetic)"] = score_phone(detect, frames, args.iou)
    else:
        for root in args.detect:
            items = _only(folder_items(root, split, args.half), args.source)
            if not items:
                raise UsageError(f"no images of source {', '.join(args.source)} in {root}")
            if name == "checked":  # its check is per session: each source is one
                tallies = _per_source(args, items, note)
            else:
                tallies = score_detections(seg.detect, items, args.iou, note)
            results[f"{Path(root).name} [{split}{'/' + args.half if args.half else ''}]"] = {
                k: v.as_dict() for k, v in tallies.items()
            }
    if args.failures:
        args.failures.write_text("\n".join(failures) + ("\n" if failures else ""))
    out: dict[str, Any] = {"segmenter": name, "iou": args.iou, "split": split, "results": results}
    if name in DETECTOR_SEGMENTERS:
        out["detector"] = str(seg.bundle.path)
        out["scale"] = args.scale
        out["threshold"] = seg.spec.threshold
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console

    title = f"White-cell detection, IoU >= {args.iou}, segmenter {name}"
    Console(width=max(100, Console().width)).print(report_table(title, results))
    return 0


def _per_source(args: argparse.Namespace, items: list, note: Any) -> dict[str, Any]:
    """``score_detections`` with a fresh segmenter (one session) per source, and the sources' sum as ``"all"``."""
    from dataclasses import fields

    from hemaedge.evaluation.frames import score_detections
    from hemaedge.evaluation.groundtruth import Tally

    out: dict[str, Any] = {"all": Tally()}
    for src in dict.fromkeys(it.source for it in items):
        tally = score_detections(make_detector(args).detect, [it for it in items if it.source == src], args.iou, note)
        out[src] = tally[src]
        for f in fields(Tally):
            setattr(out["all"], f.name, getattr(out["all"], f.name) + getattr(tally[src], f.name))
    return out


def _only(items: list, sources: list[str]) -> list:
    """The items of the given sources (all of them when none is given)."""
    return [it for it in items if not sources or it.source in sources]
