#!/usr/bin/env python3
"""End-to-end accuracy of the station's path on a labelled folder of single-cell fields.

Each image (``DATA/<split>/<class>/*.jpg``, e.g. ``pbc256``) holds one white cell near its
centre. The station's segmenter finds it (the detection nearest the centre), the crop is cut
with the bundle's crop geometry, preprocessed and classified, and the call is compared with the
folder's label. Unlike ``hemaedge evaluate`` (which feeds the whole image, as in training),
this measures detection + crop geometry + classification together.

    python tools/eval_station_folder.py --bundle effb0-pbc256 --data ../shared/data/pbc256 --split val
    python tools/eval_station_folder.py --bundle bloodcnn5 --data ../shared/data/pbc256 --limit 400 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hemaedge.calibration.datasets import open_dataset, stratified_sample  # noqa: E402
from hemaedge.edge.bundle import cut_crop, load_bundle, preprocess  # noqa: E402
from hemaedge.edge.bundle.io import resolve  # noqa: E402
from hemaedge.edge.classify.select import select_backend  # noqa: E402
from hemaedge.edge.models import default_bundle_path  # noqa: E402
from hemaedge.edge.records import Frame  # noqa: E402
from hemaedge.edge.segment import make_segmenter  # noqa: E402
from hemaedge.edge.segment.crops import central_detection, typical_side  # noqa: E402


def evaluate(
    bundle_path: str | Path,
    data: str | Path,
    split: str = "val",
    limit: int = 0,
    precision: str = "auto",
    seed: int = 0,
) -> dict:
    """Accuracy of detect -> crop -> classify against the folder labels (missed cells count as wrong)."""
    bundle = load_bundle(resolve(bundle_path))
    m = bundle.manifest
    images = open_dataset(data, split)  # folder classes in sorted order; the bundle's classes in model order
    if len(images.classes) != len(m.classes):
        raise SystemExit(f"{data} has {len(images.classes)} classes, the bundle {len(m.classes)}")
    mapping = dict(zip(images.classes, m.classes))  # e.g. pbc256's "ig" is BloodMNIST's "immature granulocyte"
    idx = stratified_sample(images.labels, limit, seed) if limit else np.arange(len(images))
    seg = make_segmenter()
    found, truth, missed = [], [], 0
    for i in idx:
        rgb = images.image(int(i))
        frame = Frame(np.ascontiguousarray(rgb), "RGB", 0.0, "folder", int(i))
        det = central_detection(seg.detect(frame), rgb.shape)
        if det is None:
            missed += 1
            continue
        found.append((rgb, det.box))
        truth.append(int(images.labels[i]))
    typical = typical_side(box for _, box in found)  # the folder is one session: one microscope, one scale
    crops = [cut_crop(rgb, box, m.crop, typical) for rgb, box in found]
    backend, reason = select_backend(bundle, "auto", precision)
    with backend:
        probs = np.concatenate(
            [backend.classify(preprocess(crops[s : s + 64], m.input)) for s in range(0, len(crops), 64)]
        )
    pred = probs.argmax(1)
    correct = int((pred == np.asarray(truth)).sum())
    n = len(idx)
    per_class = {
        c: {"n": int((images.labels[idx] == k).sum()), "correct": int(((pred == k) & (np.asarray(truth) == k)).sum())}
        for k, c in enumerate(m.classes)
    }
    return {
        "bundle": m.name,
        "data": str(data),
        "split": split,
        "backend": reason,
        "images": n,
        "missed": missed,
        "folder_to_class": mapping,
        "accuracy": correct / n if n else 0.0,
        "cell_fraction": m.crop.cell_fraction,
        "scale": m.crop.scale,
        "per_class": per_class,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="bundle directory or shipped name (default: the shipped default)")
    ap.add_argument("--data", required=True, help="class-folder tree with train/val splits, e.g. pbc256")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=0, help="a stratified sample of this many images (0 = all)")
    ap.add_argument("--precision", default="auto", choices=["auto", "int8", "fp32"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = evaluate(a.bundle or default_bundle_path(), a.data, a.split, a.limit, a.precision)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(
            f"{res['bundle']} on {res['data']} [{res['split']}] via the station path ({res['backend']}): "
            f"accuracy {res['accuracy']:.4f} on {res['images']} images ({res['missed']} cells not found)"
        )
        for c, v in res["per_class"].items():
            print(f"  {c:22s} {v['correct']:4d} / {v['n']:4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
