#!/usr/bin/env python3
"""Recall and precision of white-cell detection at IoU >= 0.5 on BCCD and TXL-PBC.

    python tools/eval_detect.py                       # BCCD val + TXL-PBC halves a and b
    python tools/eval_detect.py --bccd-split train --txl-half a --json
    python tools/eval_detect.py --set min_excess=6 --set extent=expand   # try a config change

BCCD: Pascal VOC ``WBC`` objects, split by ``train.txt`` / ``val.txt``. TXL-PBC:
YOLO labels class 0, reported per source (``sources.csv``) and split into two
fixed halves by the md5 of the file name (``hash_half``); its own train/val
folders are pooled. The defaults were tuned on BCCD train and TXL half "a"; BCCD
val and TXL half "b" are the numbers to quote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hemaedge.edge.config import data_root  # noqa: E402
from hemaedge.edge.segment import SegmenterConfig, StainSegmenter  # noqa: E402
from hemaedge.edge.segment.groundtruth import bccd_items, evaluate, txl_items  # noqa: E402


def _overrides(pairs: list[str]) -> dict:
    fields = SegmenterConfig.__dataclass_fields__
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown setting {key!r}; one of: {', '.join(fields)}")
        kind = type(getattr(SegmenterConfig(), key))
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def common_args(description: str) -> argparse.ArgumentParser:
    """The options every detection scorer takes (data, which splits, IoU, config overrides, --json)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument(
        "--data", type=Path, default=None, help="shared data root (default $HEMAEDGE_DATA or ../shared/data)"
    )
    ap.add_argument("--bccd-split", default="val", choices=["train", "val", "all", "none"])
    ap.add_argument("--txl-half", default="both", choices=["a", "b", "both", "all", "none"])
    ap.add_argument("--iou", type=float, default=0.5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a SegmenterConfig field")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = common_args(__doc__.splitlines()[0])
    ap.add_argument("--failures", type=Path, default=None, help="write the names of images with errors here")
    args = ap.parse_args(argv)

    root = args.data or data_root()
    seg = StainSegmenter(**_overrides(args.set))
    runs = []
    if args.bccd_split != "none":
        runs.append((f"BCCD {args.bccd_split}", lambda: bccd_items(root / "bccd", args.bccd_split)))
    halves = {"both": ["a", "b"], "all": [None], "none": []}.get(args.txl_half, [args.txl_half])
    for half in halves:
        label = "TXL all" if half is None else f"TXL {half}"
        runs.append((label, lambda half=half: txl_items(root / "txl-pbc", "all", half)))

    failures: list[str] = []

    def note(item, dets, counts):  # noqa: ANN001
        if counts[1] or counts[2]:
            failures.append(f"{item.source}\t{item.path}\ttp={counts[0]} fp={counts[1]} fn={counts[2]}")

    report = {}
    for label, make in runs:
        try:
            tallies = evaluate(seg, make(), args.iou, note)
        except FileNotFoundError as exc:
            print(f"skipping {label}: {exc}", file=sys.stderr)
            continue
        report[label] = {k: v.as_dict() for k, v in tallies.items()}

    if args.failures:
        args.failures.write_text("\n".join(failures) + "\n")
    if args.json:
        print(json.dumps({"iou": args.iou, "config": seg.config.__dict__, "results": report}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"White-cell detection, IoU >= {args.iou}")
    for col in ("set", "source", "images", "cells", "TP", "FP", "FN", "recall", "precision", "ms/img"):
        table.add_column(col, justify="left" if col in ("set", "source") else "right")
    for label, groups in report.items():
        for name, r in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
            style = "bold" if name == "all" else None
            table.add_row(
                label,
                name,
                str(r["images"]),
                str(r["truth"]),
                str(r["tp"]),
                str(r["fp"]),
                str(r["fn"]),
                f"{r['recall']:.4f}",
                f"{r['precision']:.4f}",
                f"{r['ms_per_image']:.1f}",
                style=style,
            )
    Console(width=max(100, Console().width)).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
