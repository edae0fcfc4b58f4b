"""``hemaedge export-cells SESSION... --out DIR``: verified cells by class, for ``hemaedge adapt`` and ``--calib``.

Examples::

    hemaedge export-cells sessions/20261126-101500 sessions/20261127-093000 --out clinic-cells/
    export-model runs/cnn/best.pt --int8 --calib clinic-cells/ --out bundles/clinic   # calibrate on them

Each crop goes to ``DIR/<verified class>/``: the review's class, not the model's.
``DIR/export-cells.json`` says which session, cell and reviewer each came from.
Only signed-off sessions unless ``--unsigned``.
"""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge export-cells``."""
    parser.add_argument("sessions", nargs="+", metavar="SESSION", help="session folders (or names under sessions/)")
    parser.add_argument("--out", required=True, help="output folder (DIR/<class>/*.png + export-cells.json)")
    parser.add_argument(
        "--unsigned", action="store_true", help="also export sessions nobody has signed off (the manifest says so)"
    )
    parser.add_argument("--json", action="store_true", help="print the manifest's summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``hemaedge export-cells``."""
    from hemaedge.edge.review.export_cells import MANIFEST, export_cells

    doc = export_cells(args.sessions, args.out, allow_unsigned=args.unsigned, log=None if args.json else print)
    if args.json:
        print(json.dumps({k: doc[k] for k in ("classes", "class_folders", "sessions", "written")}, indent=1))
    else:
        folders = ", ".join(f"{k} {v}" for k, v in doc["class_folders"].items() if v)
        print(f"{sum(doc['class_folders'].values())} cells in {args.out} ({folders}); manifest {MANIFEST}")
    return 0
