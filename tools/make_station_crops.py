"""Cut labelled training crops from BCCD frames the way a station does (segmenter + bundle crop geometry).

A station collects crops with ``hemaedge collect``; a person then sorts them by
cell type. This tool does the same for BCCD's *train* split, whose frames carry
one labelled WBC type each (``wbc_types.csv``): the detection that best
overlaps the annotated WBC box is cut with the given crop geometry and saved
as ``OUT/<class>/<frame>.png`` (class names as in BloodMNIST). The BCCD
``val`` split is never read, so it stays a held-out test of transfer.

    python tools/make_station_crops.py --out runs/bccd_train_crops --cell-fraction 0.42
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tools"))

from eval_bccd import bccd_cells, matched_detection  # noqa: E402
from hemaedge.edge.bundle import CropGeometry, cut_crop  # noqa: E402
from hemaedge.edge.config import data_root  # noqa: E402
from hemaedge.edge.segment import make_segmenter  # noqa: E402
from hemaedge.edge.segment.crops import typical_side  # noqa: E402

TYPES = {
    "NEUTROPHIL": "neutrophil",
    "EOSINOPHIL": "eosinophil",
    "LYMPHOCYTE": "lymphocyte",
    "MONOCYTE": "monocyte",
    "BASOPHIL": "basophil",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cell-fraction", type=float, default=0.42)
    ap.add_argument(
        "--scale",
        choices=["cell", "session"],
        default="cell",
        help="crop side from each cell's box, or from the median box of all the frames (one field of view)",
    )
    ap.add_argument("--data", default=None, help="BCCD folder (default $HEMAEDGE_DATA/bccd)")
    a = ap.parse_args()
    root = Path(a.data) if a.data else data_root() / "bccd"
    import cv2

    seg, out, n = make_segmenter(), Path(a.out), 0
    geom = CropGeometry(cell_fraction=a.cell_fraction, scale=a.scale)
    cells = [
        (name, img, gt_box, kind, matched_detection(seg, img, name, gt_box))
        for name, img, gt_box, kind in bccd_cells(root, "train", TYPES)
    ]
    typical = typical_side([gt if box is None else box for _, _, gt, _, box in cells])
    for name, img, gt_box, kind, box in cells:
        crop = cut_crop(img, gt_box if box is None else box, geom, typical)
        (out / kind).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / kind / f"{name}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
        n += 1
    print(f"wrote {n} crops to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
