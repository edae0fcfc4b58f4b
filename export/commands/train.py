"""``hemaedge train``: train a registered architecture on an .npz or image-folder data set."""

from __future__ import annotations

import argparse
import json

from hemaedge.edge.config import data_root


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge train``."""
    p.add_argument("--arch", default="bloodcnn5", help="registered architecture (default bloodcnn5)")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="a training source: a MedMNIST-style .npz or a class-folder tree (train/ and val/ splits or none), e.g. "
        "crops from 'hemaedge collect --labelled'. Repeat for several sources; the first one's classes are the "
        "model's, the others' class folders are matched to them by the class vocabulary. WEIGHT: the source's share "
        "of every epoch (give one to all sources or to none: then shares follow sizes). Each source's val split is "
        "scored every epoch (default $HEMAEDGE_DATA/bloodmnist28.npz)",
    )
    p.add_argument("--out", default=None, help="run directory (default runs/ARCH); an existing last.pt resumes")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--samples", type=int, default=0, help="samples per epoch (default: as many as the sources hold)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1 sgd, 5e-4 adam/adamw)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["onecycle", "cosine", "plateau", "none"], default="onecycle")
    p.add_argument(
        "--aug",
        default="flip,rot90",
        help="comma list ('' for none), applied to raw pixels before the white balance and mean/std. Geometry: flip, "
        "rot90, rotate (any angle), zoom (0.8-1.25 and shift). Colour, in this order: stainrot (each source's two "
        "stains, measured, turned up to 10 degrees each: other dyes), od (stain jitter in optical "
        "density: per-stain scale/bias and stain strength), stain (saturation/gamma/gain, the older jitter), gain "
        "(lamp colour per channel), color (channel gain/offset), gamma (gamma and contrast), hue (saturation and hue), "
        "gray (grayscale, 10%%), blur (defocus), noise (sensor), jpeg (8x8 DCT artefacts). The research recipe: "
        "flip,rotate,zoom,od,gain,gamma,blur,noise,jpeg",
    )
    p.add_argument(
        "--aug-strength", type=float, default=1.0, help="scales every colour augmentation's range (0: none; default 1)"
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="keep an exponential moving average of the weights (e.g. 0.998); the validated and saved weights are "
        "the average's. Export final.pt (no epoch picking)",
    )
    p.add_argument("--balanced", action="store_true", help="class-balanced sampling for rare classes")
    p.add_argument("--early-stop", type=int, default=0, help="stop after N epochs without val improvement")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--width", type=float, default=None, help="channel multiplier (bloodcnn5)")
    p.add_argument("--arch-arg", action="append", default=[], metavar="K=V", help="extra architecture keyword")
    p.add_argument(
        "--white-balance",
        action="store_true",
        help="neutralise each image's background colour (training and station alike; helps other microscopes)",
    )
    p.add_argument(
        "--stain-norm",
        type=float,
        default=0.0,
        metavar="REF",
        help="normalise each session's stain strength to REF (summed optical density of the nuclei; PBC's is about "
        "1.6): every --data source is one session here, every slide on the station (docs/training.md)",
    )
    p.add_argument(
        "--stain-gain-range",
        type=float,
        nargs=2,
        default=(0.5, 2.0),
        metavar=("LOW", "HIGH"),
        help="bounds on a session's stain gain (default 0.5 2.0)",
    )
    p.add_argument(
        "--stain-hue",
        action="store_true",
        help="with --stain-norm: also measure each session's two stains (nuclear, eosin) and map them onto the "
        "first --data source's, which the bundle carries (a bluer or redder stain looks like the training one)",
    )
    p.add_argument(
        "--stain-hue-tolerance",
        type=float,
        default=0.0,
        metavar="DEG",
        help="a session stain within DEG degrees of the reference is left as it is; beyond, turned to DEG (default 0)",
    )
    p.add_argument(
        "--extra-data",
        action="append",
        default=[],
        metavar="DIR",
        help="extra labelled crops (class folders named like the data set's classes), e.g. sorted "
        "'hemaedge collect' output from the station's own microscope; may repeat",
    )
    p.add_argument("--extra-repeat", type=int, default=1, help="times each extra image is seen per epoch")
    p.add_argument("--init", default="", metavar="CHECKPOINT", help="start from these weights (fine-tuning)")
    p.add_argument("--img-size", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes (image folders)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this many minutes (0 = no limit)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")


def run(args: argparse.Namespace) -> int:
    """Train and print a summary."""
    from hemaedge.export.train import Recipe, train

    kwargs: dict = {}
    if args.width is not None:
        kwargs["width"] = args.width
    for kv in args.arch_arg:
        k, _, v = kv.partition("=")
        try:
            kwargs[k] = json.loads(v)
        except json.JSONDecodeError:
            kwargs[k] = v
    lr = args.lr if args.lr is not None else (0.1 if args.optimizer == "sgd" else 5e-4)
    sources = args.data or [str(data_root() / "bloodmnist28.npz")]
    recipe = Recipe(
        arch=args.arch,
        data=sources[0],
        more_data=tuple(sources[1:]),
        samples=args.samples,
        aug_strength=args.aug_strength,
        ema=args.ema,
        out=args.out or f"runs/{args.arch}",
        epochs=args.epochs,
        batch=args.batch,
        optimizer=args.optimizer,
        lr=lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        aug=tuple(a for a in args.aug.split(",") if a),
        balanced=args.balanced,
        early_stop=args.early_stop,
        label_smoothing=args.label_smoothing,
        img_size=args.img_size,
        arch_kwargs=kwargs,
        white_balance=args.white_balance,
        stain_ref=args.stain_norm,
        stain_gain_range=tuple(args.stain_gain_range),
        stain_hue=args.stain_hue,
        stain_hue_tolerance=args.stain_hue_tolerance,
        extra_data=tuple(args.extra_data),
        extra_repeat=args.extra_repeat,
        init=args.init,
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
        max_minutes=args.max_minutes,
    )
    summary = train(recipe, progress=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif summary["best_checkpoint"]:
        print(
            f"best val accuracy {summary['val_accuracy']:.4f} at epoch {summary['best_epoch']} "
            f"({summary['minutes']} min); checkpoint {summary['best_checkpoint']}, last epoch {summary['final_checkpoint']}"
        )
    else:
        print(f"trained {summary['minutes']} min (no val split); checkpoint {summary['final_checkpoint']}")
    return 0
