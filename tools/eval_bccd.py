"""End-to-end accuracy on BCCD frames: detect -> crop (bundle geometry) -> classify vs the labelled WBC type.

BCCD is a different microscope and stain from the PBC cells the shipped model
was trained on, so this measures how well the station transfers. Each BCCD
frame has one labelled WBC type (``wbc_types.csv``); frames whose type is one
of the four common ones (neutrophil, eosinophil, lymphocyte, monocyte) are
scored. The WBC is the detection that best overlaps the annotated WBC box
(``--boxes detected``, the station's path) or the annotated box itself
(``--boxes truth``, isolating classification from detection).

    python tools/eval_bccd.py --bundle edge/models/bloodcnn5 --split val [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hemaedge.calibration.datasets import read_rgb  # noqa: E402
from hemaedge.edge.bundle import cut_crop, load_bundle, preprocess  # noqa: E402
from hemaedge.edge.classify.onnxruntime import OrtBackend  # noqa: E402
from hemaedge.edge.config import data_root  # noqa: E402
from hemaedge.edge.models import default_bundle_path  # noqa: E402
from hemaedge.edge.records import Frame  # noqa: E402
from hemaedge.edge.segment import make_segmenter  # noqa: E402
from hemaedge.edge.segment.crops import typical_side  # noqa: E402
from hemaedge.edge.segment.groundtruth import iou_matrix, read_voc  # noqa: E402

COMMON = {"NEUTROPHIL": "neutrophil", "EOSINOPHIL": "eosinophil", "LYMPHOCYTE": "lymphocyte", "MONOCYTE": "monocyte"}


def bccd_cells(root: Path, split: str, types_map: dict[str, str]):
    """Yield ``(name, RGB image, annotated WBC box, type)`` for BCCD frames whose WBC type is in ``types_map``."""
    names = [ln.strip() for ln in (root / f"{split}.txt").read_text().split() if ln.strip()]
    types = {}
    with open(root / "wbc_types.csv", newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[1].strip().upper() in types_map:
                types[row[0].strip()] = types_map[row[1].strip().upper()]
    for name in names:
        if name not in types:
            continue
        gt = read_voc(root / "Annotations" / f"{name}.xml")
        if len(gt) == 0:
            continue
        gt_box = gt[np.argmax((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))]
        yield name, read_rgb(root / "JPEGImages" / f"{name}.jpg"), gt_box, types[name]


def matched_detection(seg, img: np.ndarray, name: str, gt_box: np.ndarray):
    """The segmenter's box that overlaps the annotated WBC box with IoU >= 0.5 (best one), else None."""
    dets = seg.detect(Frame(img, "RGB", 0.0, "bccd", 0, name))
    if not dets:
        return None
    ious = iou_matrix(np.array([d.box for d in dets], np.float32), gt_box[None])[:, 0]
    return dets[int(np.argmax(ious))].box if ious.max() >= 0.5 else None


def evaluate(
    bundle_dir: Path,
    split: str,
    boxes: str,
    precision: str,
    root: Path,
    cell_fraction: float | None = None,
    pad: str | None = None,
    scale: str | None = None,
) -> dict:
    """Score the four common types; returns accuracy, confusion and counts."""
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    geom = replace(
        m.crop, **{k: v for k, v in (("cell_fraction", cell_fraction), ("pad", pad), ("scale", scale)) if v is not None}
    )
    seg = make_segmenter()
    found, truth, missed = [], [], 0
    for name, img, gt_box, kind in bccd_cells(root, split, COMMON):
        box = gt_box
        if boxes == "detected":
            box = matched_detection(seg, img, name, gt_box)
            if box is None:
                missed += 1
                continue
        found.append((img, box))
        truth.append(kind)
    typical = typical_side(box for _, box in found)  # the split is one session: one microscope, one scale
    crops = [cut_crop(img, box, geom, typical) for img, box in found]
    with OrtBackend(bundle, precision) as be:
        probs = be.classify(preprocess(crops, m.input)) if crops else np.zeros((0, len(m.classes)))
    pred = [m.classes[i] for i in probs.argmax(1)]
    correct = sum(p == t for p, t in zip(pred, truth))
    scored = len(truth) + missed
    return {
        "bundle": str(bundle_dir),
        "split": split,
        "cell_fraction": geom.cell_fraction,
        "pad": geom.pad,
        "scale": geom.scale,
        "boxes": boxes,
        "precision": precision,
        "frames_scored": scored,
        "cells_classified": len(truth),
        "wbc_not_detected": missed,
        "accuracy": correct / scored if scored else 0.0,
        "accuracy_of_classified": correct / len(truth) if truth else 0.0,
        "per_type": {
            t: {
                "n": sum(1 for x in truth if x == t),
                "correct": sum(1 for p, x in zip(pred, truth) if x == t and p == t),
            }
            for t in COMMON.values()
        },
        "confusion": {t: dict(Counter(p for p, x in zip(pred, truth) if x == t)) for t in COMMON.values()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("--boxes", default="detected", choices=["detected", "truth"])
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--data", default=None, help="BCCD folder (default $HEMAEDGE_DATA/bccd)")
    ap.add_argument(
        "--cell-fraction", type=float, default=None, help="override the bundle's crop geometry (exploration)"
    )
    ap.add_argument("--pad", default=None, choices=["reflect", "constant"], help="override the crop padding")
    ap.add_argument("--scale", default=None, choices=["cell", "session"], help="override the crop scale")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = evaluate(
        Path(a.bundle or default_bundle_path()),
        a.split,
        a.boxes,
        a.precision,
        Path(a.data) if a.data else data_root() / "bccd",
        a.cell_fraction,
        a.pad,
        a.scale,
    )
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(
            f"BCCD {a.split} ({a.boxes} boxes, {a.precision}): accuracy {res['accuracy']:.3f} on "
            f"{res['frames_scored']} frames ({res['wbc_not_detected']} WBC not detected)"
        )
        for t, c in res["confusion"].items():
            print(f"  {t:11s} n={res['per_type'][t]['n']:3d} predicted as {c}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
