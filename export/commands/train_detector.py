"""``hemaedge train-detector``: train the white-cell detector on TXL-PBC and BCCD (workstation, plain PyTorch).

The recipe is saved in the checkpoint and, through ``export-model``, in the detector bundle's manifest.
``--hold-out SOURCE`` leaves a microscope out of training (leave-one-source-out) and scores it at the end.
BCCD val is never trained on (nor TXL-PBC's copies of its frames); it is scored at the end as well.
"""

from __future__ import annotations

import argparse
import json
import sys

from hemaedge.edge.config import data_root
from hemaedge.edge.errors import UsageError


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge train-detector``."""
    from hemaedge.export.detector.data import SOURCES

    p.add_argument("--data", default=None, help="shared data root holding txl-pbc/ and bccd/ (default $HEMAEDGE_DATA)")
    p.add_argument("--out", default="runs/detector", help="run directory (last.pt, train.log.jsonl)")
    p.add_argument("--hold-out", nargs="*", default=[], choices=list(SOURCES), help="sources left out of training")
    p.add_argument("--px-per-um", type=float, default=1.75, help="working scale (pixels per micron) of the detector")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps", type=int, default=100, help="batches per epoch")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--canvas", type=int, default=128, help="training canvas side in working pixels")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, one-cycle)")
    p.add_argument("--widths", default="12,24,48,64", help="channels of the /2, /4, /8, /16 stages")
    p.add_argument("--head", type=int, default=24, help="channels of the stride-4 head")
    p.add_argument("--phone-p", type=float, default=0.3, help="share of canvases with phone-through-eyepiece damage")
    p.add_argument(
        "--stain-p", type=float, default=0.7, help="share of tiles recoloured as another lab's stain (optical density)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this many minutes (0 = no limit)")
    p.add_argument("--no-score", action="store_true", help="do not score held-out frames at the end")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")


def run(args: argparse.Namespace) -> int:
    """Train, score held-out frames, print a summary."""
    from pathlib import Path

    from hemaedge.export.detector.train import DetectorRecipe, TorchRunner, held_out_items, load_model, score, train

    try:
        widths = tuple(int(x) for x in args.widths.split(","))
    except ValueError:
        raise UsageError(f"--widths takes four comma-separated channel counts, not {args.widths!r}") from None
    if len(widths) != 4:
        raise UsageError("--widths takes four channel counts (/2, /4, /8, /16 stages)")
    if args.canvas % 16:
        raise UsageError("--canvas must be a multiple of 16")
    root = Path(args.data) if args.data else data_root()
    if not (root / "txl-pbc").is_dir() or not (root / "bccd").is_dir():
        raise UsageError(f"{root} must hold txl-pbc/ and bccd/ (set --data or HEMAEDGE_DATA)")
    recipe = DetectorRecipe(
        data=str(root),
        out=args.out,
        hold_out=tuple(args.hold_out),
        px_per_um=args.px_per_um,
        canvas=args.canvas,
        batch=args.batch,
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        lr=args.lr,
        widths=widths,
        head=args.head,
        phone_p=args.phone_p,
        stain_p=args.stain_p,
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
    )
    recipe.extra["command"] = " ".join(["hemaedge", "train-detector", *sys.argv[2:]])
    log = (lambda m: None) if args.json else (lambda m: print(m, flush=True))
    summary = train(recipe, log)
    if not args.no_score:
        from hemaedge.edge.segment.learned import DetectorSpec

        model, ck = load_model(summary["checkpoint"])
        spec = DetectorSpec(px_per_um=args.px_per_um, threshold=0.4)
        run_ = TorchRunner(model, spec)
        sets = {"BCCD val (VOC)": held_out_items(root, (), "val")}
        if args.hold_out:
            sets["held out: " + ", ".join(args.hold_out)] = held_out_items(
                root, tuple(args.hold_out), "all" if "BCCD" in args.hold_out else ""
            )
        summary["scores"] = {k: score(lambda im, key: run_(im, key), v) for k, v in sets.items()}
        for k, v in summary["scores"].items():
            log(
                f"{k}: "
                + ", ".join(f"{s} recall {r['recall']:.4f} precision {r['precision']:.4f}" for s, r in v.items())
            )
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0
