"""``hemaedge detect IMAGES... [--json]``: every white cell in each image as ``[x0, y0, x1, y1, score]`` (pixels).

Folders and globs are expanded. A file that cannot be read gets one red line
and the rest are still processed; the exit status is non-zero if any failed.

``--json`` prints one object::

    {"segmenter": "stain",
     "images": [{"file": "a.jpg", "width": 640, "height": 480,
                 "quality": {"ok": true, "reason": "", "sharpness": 0.21, "brightness": 203.0},
                 "cells": [[x0, y0, x1, y1, score], ...]}, ...],
     "failed": [{"file": "b.jpg", "error": "..."}],
     "total_cells": 3}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hemaedge.edge.errors import InputError, SourceError, UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the command's options."""
    parser.add_argument("images", nargs="+", help="image files, folders or globs")
    parser.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")
    from hemaedge.edge.commands.segmenter_options import add_segmenter_options

    add_segmenter_options(parser)
    parser.add_argument("--min-score", type=float, default=0.0, help="drop cells scoring below this (default 0)")
    parser.add_argument("--no-quality", action="store_true", help="skip the focus / exposure check")


def _paths(specs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    from hemaedge.edge.sources.files import expand_images, is_glob

    paths: list[Path] = []
    failed: list[tuple[str, str]] = []
    for spec in specs:
        if is_glob(spec) or Path(spec).is_dir():
            try:
                paths.extend(expand_images(spec))
            except SourceError as exc:
                failed.append((spec, str(exc)))
        else:
            paths.append(Path(spec))
    return paths, failed


def run(args: argparse.Namespace) -> int:
    """Detect white cells in every image; returns 0, or 1 if any image failed."""
    from hemaedge.edge.segment import assess_quality, make_segmenter
    from hemaedge.edge.sources.files import read_image

    if args.min_score < 0 or args.min_score > 1:
        raise UsageError(f"--min-score must be within 0..1, not {args.min_score}")
    # still images may come from several microscopes: each is measured on its own unless a scale is stated
    options = {"scale": args.px_per_um or "frame"}
    if args.detector is not None:
        if args.segmenter not in (None, "learned"):
            raise UsageError("--detector is for --segmenter learned")
        options["bundle"] = args.detector
    segmenter = make_segmenter(args.segmenter or ("learned" if args.detector else None), **options)
    paths, failed = _paths(args.images)
    console = _console(args.json)
    for _spec, why in failed:  # a folder or glob that holds no images: say so, with the reason
        _error(console, why)
    results = []
    started = time.perf_counter()
    for path in paths:
        try:
            img = read_image(path)
        except InputError as exc:
            failed.append((str(path), str(exc)))
            _error(console, str(exc))
            continue
        quality = None if args.no_quality else assess_quality(img)
        if quality is not None and not quality.ok:
            _warn(
                console,
                f"{path}: {quality.reason} (sharpness {quality.sharpness:.3f}, "
                f"brightness {quality.brightness:.0f}); cells may be missed",
            )
        dets = [d for d in segmenter.detect(img) if d.score >= args.min_score]
        cells = [[round(float(v), 1) for v in d.box] + [round(float(d.score), 4)] for d in dets]
        entry = {"file": str(path), "width": int(img.shape[1]), "height": int(img.shape[0]), "cells": cells}
        used = getattr(segmenter, "last_scale", None)
        if used is not None:
            entry["px_per_um"] = round(used.px_per_um, 3)
        if quality is not None:
            entry["quality"] = {
                "ok": quality.ok,
                "reason": quality.reason,
                "sharpness": round(quality.sharpness, 4),
                "brightness": round(quality.brightness, 1),
            }
        results.append(entry)
    elapsed = time.perf_counter() - started
    total = sum(len(r["cells"]) for r in results)
    if args.json:
        json.dump(
            {
                "segmenter": getattr(segmenter, "name", args.segmenter),
                "images": results,
                "failed": [{"file": f, "error": e} for f, e in failed],
                "total_cells": total,
            },
            sys.stdout,
        )
        sys.stdout.write("\n")
    else:
        _table(results, failed, total, elapsed)
    return 1 if failed else 0


def _console(quiet_stdout: bool):  # noqa: ANN202 - rich is imported lazily
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _error(console, message: str) -> None:  # noqa: ANN001
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message.splitlines()[0])}")


def _warn(console, message: str) -> None:  # noqa: ANN001
    from rich.markup import escape

    console.print(f"[yellow]warning:[/] {escape(message)}")


def _table(results: list[dict], failed: list[tuple[str, str]], total: int, elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    table = Table(title="White cells", show_lines=False)
    table.add_column("image", overflow="fold")
    table.add_column("size", justify="right")
    table.add_column("cells", justify="right")
    table.add_column("boxes [x0, y0, x1, y1, score]", overflow="fold")
    for r in results:
        boxes = "\n".join(f"[{c[0]:.0f}, {c[1]:.0f}, {c[2]:.0f}, {c[3]:.0f}, {c[4]:.2f}]" for c in r["cells"]) or "-"
        flag = "" if r.get("quality", {}).get("ok", True) else f" [yellow]({r['quality']['reason']})[/]"
        table.add_row(Path(r["file"]).name + flag, f"{r['width']}x{r['height']}", str(len(r["cells"])), boxes)
    out.print(table)
    n = len(results)
    rate = f", {elapsed / n * 1000:.1f} ms/image" if n else ""
    out.print(f"{total} white cells in {n} images{rate}" + (f"; [red]{len(failed)} failed[/]" if failed else ""))
