"""``hemaedge adapt --bundle B --cells DIR --out NEW``: fit a bundle to this microscope from verified cells.

    hemaedge export-cells sessions/2026* --out my_cells/        # cells a technician verified in the review page
    hemaedge adapt --bundle bloodcnn5 --cells my_cells/ --out bundles/bloodcnn5-scope3
    hemaedge count 0 --bundle bundles/bloodcnn5-scope3

See ``hemaedge.export.adapt`` for what is adapted and the two guards (too few cells per class; no more than
``--max-parent-drop`` points lost on the parent's own validation data).
"""

from __future__ import annotations

import argparse
import json


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge adapt``."""
    from hemaedge.export.adapt import STRATEGIES, AdaptOptions

    d = AdaptOptions(bundle="", cells="", out="")
    p.add_argument("--bundle", required=True, help="the bundle to adapt (folder or shipped name)")
    p.add_argument("--cells", required=True, help="verified cells of this microscope: DIR/<class>/*.png")
    p.add_argument("--out", required=True, help="where to write the adapted bundle")
    p.add_argument("--checkpoint", help="the checkpoint the bundle was exported from (default: the shipped one)")
    p.add_argument("--data", help="the parent's training data (default: what its manifest names)")
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy, help=f"what to adapt (default {d.strategy})")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--new-share", type=float, default=d.new_share, help="share of each batch from the new cells")
    p.add_argument("--replay", type=int, default=d.replay, help="parent training images mixed in")
    p.add_argument("--min-per-class", type=int, default=d.min_per_class, help="refuse fewer verified cells of a class")
    p.add_argument(
        "--max-parent-drop", type=float, default=d.max_parent_drop, help="points allowed lost on the parent's val"
    )
    p.add_argument("--max-drop", type=float, default=d.max_drop, help="INT8 accuracy gate of the re-export (points)")
    p.add_argument(
        "--ema", type=float, default=d.ema, help=f"EMA decay of the adapted weights, 0 off (default {d.ema})"
    )
    p.add_argument(
        "--no-interpolate",
        dest="interpolate",
        action="store_false",
        help="refuse a model over --max-parent-drop instead of moving its weights back toward the parent's",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=d.holdout,
        help="share of each class's cells kept out of adapting and scored before and after (default 0: none)",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="bundle name (default: PARENT-adapted)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Adapt and print what was done."""
    from hemaedge.export.adapt import AdaptOptions, adapt
    from rich.console import Console

    opts = AdaptOptions(**{k: v for k, v in vars(args).items() if k in AdaptOptions.__dataclass_fields__})
    con = Console(stderr=True, highlight=False)
    summary = adapt(opts, log=(lambda m: None) if args.json else (lambda m: con.print(m)))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0
