#!/usr/bin/env python3
"""Recall and precision of platelet detection on BCCD and TXL-PBC, at IoU >= 0.5 and by centre-in-box.

    python tools/eval_platelets.py                       # BCCD val + TXL-PBC halves a and b
    python tools/eval_platelets.py --bccd-split train --txl-half a --json
    python tools/eval_platelets.py --set plt_level=0.6   # try a config change

The segmenter runs with ``platelets=True``; only its ``kind == "platelet"``
detections are scored. BCCD: Pascal VOC ``Platelets`` objects, split by
``train.txt`` / ``val.txt``. TXL-PBC: YOLO labels class 2, reported per source
(``sources.csv``) and split into two fixed halves by the md5 of the file name
(``hash_half``). The platelet settings were tuned on BCCD train and TXL half
"a"; BCCD val and TXL half "b" are the numbers to quote.

Two match rules: one-to-one at IoU >= ``--iou`` (a platelet box is 10-20
working pixels, so a few pixels of box slack cost a lot of IoU), and the looser
"centre": a detection whose centre lies inside a truth box. Note that BCCD and
TXL-PBC do not label every platelet (clumps are one box or none), so precision
is a lower bound. Blobs cut by the image border are rejected by default
(``plt_edge``): these sets are single stills, where that costs the platelets cut
by the border (``--set plt_edge=true`` scores them); a stream sees them whole
in a later frame.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hemaedge.edge.config import data_root  # the installed package (pip install -e .), not a path hack
from hemaedge.edge.segment import StainSegmenter
from hemaedge.evaluation.frames import config_overrides as _overrides
from hemaedge.evaluation.groundtruth import bccd_items, evaluate, txl_items


def common_args(description: str) -> argparse.ArgumentParser:
    """The options of the scorer (data, which splits, IoU, config overrides, --json)."""
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


TXL_PLATELET = 2
BCCD_PLATELET = ("Platelets",)


def main(argv: list[str] | None = None) -> int:
    ap = common_args(__doc__.splitlines()[0])
    args = ap.parse_args(argv)

    root = args.data or data_root()
    seg = StainSegmenter(**{**_overrides(args.set), "platelets": True})
    runs = []
    if args.bccd_split != "none":
        runs.append(
            (f"BCCD {args.bccd_split}", lambda: bccd_items(root / "bccd", args.bccd_split, names=BCCD_PLATELET))
        )
    halves = {"both": ["a", "b"], "all": [None], "none": []}.get(args.txl_half, [args.txl_half])
    for half in halves:
        label = "TXL all" if half is None else f"TXL {half}"
        runs.append((label, lambda half=half: txl_items(root / "txl-pbc", "all", half, classes=(TXL_PLATELET,))))

    report: dict[str, dict[str, dict]] = {}
    for label, make in runs:
        try:
            tallies = evaluate(seg, make(), args.iou, kind="platelet", rules=("centre",))
        except FileNotFoundError as exc:
            print(f"skipping {label}: {exc}", file=sys.stderr)
            continue
        groups: dict[str, dict] = {}
        for key, t in tallies.items():
            source, _, rule = key.partition("|")
            groups.setdefault(source, {})[rule or "iou"] = t.as_dict()
        report[label] = groups

    if args.json:
        print(json.dumps({"iou": args.iou, "config": seg.config.__dict__, "results": report}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Platelet detection: IoU >= {args.iou} | centre inside the truth box")
    for col in (
        "set",
        "source",
        "images",
        "platelets",
        "detected",
        "TP",
        "recall",
        "precision",
        "TP ctr",
        "recall ctr",
        "prec. ctr",
        "ms/img",
    ):
        table.add_column(col, justify="left" if col in ("set", "source") else "right")
    for label, groups in report.items():
        for name, r in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
            i, c = r["iou"], r["centre"]
            style = "bold" if name == "all" else None
            table.add_row(
                label,
                name,
                str(i["images"]),
                str(i["truth"]),
                str(i["tp"] + i["fp"]),
                str(i["tp"]),
                f"{i['recall']:.3f}",
                f"{i['precision']:.3f}",
                str(c["tp"]),
                f"{c['recall']:.3f}",
                f"{c['precision']:.3f}",
                f"{i['ms_per_image']:.1f}",
                style=style,
            )
    Console(width=max(140, Console().width)).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
