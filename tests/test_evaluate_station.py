"""``hemaedge evaluate --station``: the station path on labelled cells, with a station whose answers are known.

A fake segmenter finds the one coloured disc of an image (none in a blank one); a fake backend calls a crop by its
dominant colour. So every right, wrong and missed call is known in advance and the scoring can be checked exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hemaedge.edge.bundle import load_bundle
from hemaedge.edge.errors import UsageError
from hemaedge.edge.records import Detection
from hemaedge.edge.station import Station
from hemaedge.evaluation.labelled import read_labelled
from hemaedge.evaluation.station import MISSED, evaluate_station, match_labels, parse_map

CLASSES = ("neutrophil_segmented", "neutrophil_band", "lymphocyte")
COLOURS = {"red": (0, 0, 200), "green": (0, 200, 0), "blue": (200, 0, 0)}  # BGR; called as classes 0, 1, 2


class DiscFinder:
    name = "disc"

    def detect(self, frame):
        grey = frame.pixels.min(axis=2)
        ys, xs = np.nonzero(grey < 100)
        if not len(xs):
            return []
        return [Detection((float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())), 1.0)]


class ColourCaller:
    name, precision = "colour", "fp32"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def classify(self, batch):
        # the preprocessed batch is RGB: red disc -> channel 0 high, green -> 1, blue -> 2 (background equal)
        spread = batch.mean(axis=(2, 3)) - batch.mean(axis=(1, 2, 3))[:, None]
        p = np.full((len(batch), 3), 0.05, np.float32)
        p[np.arange(len(batch)), spread.argmax(1)] = 0.9
        return p


def _image(path: Path, colour: str | None) -> None:
    img = np.full((96, 96, 3), 230, np.uint8)
    if colour:
        cv2.circle(img, (48, 48), 14, COLOURS[colour], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


@pytest.fixture()
def station(tmp_path):
    from helpers import tiny_bundle

    bundle = load_bundle(tiny_bundle(tmp_path / "b", classes=CLASSES, int8=False))
    return Station(bundle, DiscFinder(), ColourCaller(), "colour caller")


def _folders(root: Path) -> None:
    # "neutrophil": 3 called segmented (right by group), 1 called band (right), 1 blank (missed)
    for i, c in enumerate(["red", "red", "red", "green", None]):
        _image(root / "neutrophil" / f"n{i}.png", c)
    # "round": 2 blue (right, via --map), 1 red (wrong: a neutrophil)
    for i, c in enumerate(["blue", "blue", "red"]):
        _image(root / "round" / f"l{i}.png", c)


def test_labels_match_by_name_spelling_group_and_map(station):
    groups = {"neutrophils": ["neutrophil_segmented", "neutrophil_band"], "lymphocytes": ["lymphocyte"]}
    m = match_labels(["Band neutrophils", "neutrophil", "round"], CLASSES, groups, parse_map(["round=lymphocyte"]))
    assert m["Band neutrophils"].accepts == ("neutrophil_band",) and m["Band neutrophils"].how == "name"
    assert m["neutrophil"].accepts == ("neutrophil_segmented", "neutrophil_band") and m["neutrophil"].how.startswith(
        "group"
    )
    assert m["round"].accepts == ("lymphocyte",) and m["round"].how == "map"
    with pytest.raises(UsageError, match="match none of the bundle's classes"):
        match_labels(["platelet"], CLASSES, groups)
    with pytest.raises(UsageError, match="--map"):
        parse_map(["round"])


def test_station_path_scores_right_wrong_and_missed_cells_exactly(station, tmp_path):
    _folders(tmp_path / "cells")
    cells, kind = read_labelled(tmp_path / "cells")
    assert kind == "folders" and len(cells) == 8
    groups = {"neutrophils": ["neutrophil_segmented", "neutrophil_band"], "lymphocytes": ["lymphocyte"]}
    matches = match_labels([c.label for c in cells], CLASSES, groups, parse_map(["round=lymphocyte"]))
    with station:
        res = evaluate_station(station, cells, matches).to_dict()
    assert res["cells"] == 8 and res["missed"] == 1 and res["detected"] == 7
    assert res["accuracy"] == pytest.approx(6 / 8)  # the miss counts as wrong
    assert res["accuracy_of_detected"] == pytest.approx(6 / 7)
    per = res["per_class"]
    assert per["neutrophil"]["n"] == 5 and per["neutrophil"]["correct"] == 4 and per["neutrophil"]["recall"] == 0.8
    assert per["round"]["correct"] == 2 and per["round"]["precision"] == 1.0
    assert per["neutrophil"]["precision"] == pytest.approx(4 / 5)  # the red "round" cell was called a neutrophil
    cm = res["confusion"]
    row = dict(zip(cm["columns"], cm["matrix"][cm["rows"].index("neutrophil")]))
    assert row[MISSED] == 1 and row["neutrophil"] == 4
    # what each label's cells were called, in the bundle's own classes (the confusion matrix folds them into labels)
    by = res["predicted_by_label"]
    assert by["round"] == {"lymphocyte": 2, "neutrophil_segmented": 1}
    assert by["neutrophil"] == {"neutrophil_segmented": 3, MISSED: 1, "neutrophil_band": 1}  # most called first
    assert sum(n for lab in by for n in by[lab].values()) == res["cells"]


def test_evaluate_station_command_with_map_classes_and_json(station, tmp_path, capsys, monkeypatch):
    from hemaedge.cli import main

    _folders(tmp_path / "cells")
    monkeypatch.setattr(Station, "from_bundle", classmethod(lambda cls, *a, **k: station))
    args = ["evaluate", "--station", str(tmp_path / "cells"), "--map", "round=lymphocyte", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == pytest.approx(6 / 8)
    assert main([*args, "--classes", "round"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["cells"] == 3 and list(res["per_class"]) == ["round"]
    assert main(["evaluate", "--station", str(tmp_path / "cells")]) == 2  # "round" matches nothing without --map
    assert "--map LABEL=CLASS" in " ".join(capsys.readouterr().err.split())


def test_frames_with_a_labels_csv_pick_the_labelled_box(station, tmp_path):
    root = tmp_path / "frames"
    img = np.full((120, 200, 3), 230, np.uint8)
    cv2.circle(img, (40, 60), 14, COLOURS["blue"], -1)
    root.mkdir()
    cv2.imwrite(str(root / "f.png"), img)
    (root / "labels.csv").write_text(
        "image,class,x0,y0,x1,y1\nf.png,lymphocyte,26,46,54,74\nf.png,lymphocyte,150,50,170,70\n"
    )
    cells, kind = read_labelled(root)
    assert kind == "labels_csv" and cells[0].box == (26.0, 46.0, 54.0, 74.0)
    matches = match_labels(["lymphocyte"], CLASSES, {})
    with station:
        res = evaluate_station(station, cells, matches).to_dict()
    assert res["per_class"]["lymphocyte"]["correct"] == 1 and res["missed"] == 1  # nothing at the second box


@pytest.mark.data
def test_bccd_layout_is_read_with_one_type_per_frame(data_root):
    bccd = data_root / "bccd"
    if not (bccd / "wbc_types.csv").is_file():
        pytest.skip(f"data not found: {bccd}")
    cells, kind = read_labelled(bccd, "val")
    assert kind == "bccd" and 80 <= len(cells) <= 87
    assert {c.label for c in cells} <= {"neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil"}
    assert all(c.box is not None for c in cells)


def test_collect_labelled_cuts_training_crops_the_stations_way(station, tmp_path, capsys, monkeypatch):
    from hemaedge.cli import main

    _folders(tmp_path / "cells")
    (tmp_path / "cells" / "ig").mkdir()
    _image(tmp_path / "cells" / "ig" / "i0.png", "green")
    monkeypatch.setattr(Station, "from_bundle", classmethod(lambda cls, *a, **k: station))
    out = tmp_path / "crops"
    assert main(["collect", "--labelled", str(tmp_path / "cells"), "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["crops"] == 8 and len(doc["not_found"]) == 1 and doc["not_found"][0].endswith("n4.png")
    assert sorted(p.name for p in out.iterdir()) == ["immature_granulocyte", "neutrophil", "round"]  # canonical names
    assert len(list((out / "neutrophil").glob("*.png"))) == 4
    side = doc["typical_cell_side_px"] / station.geometry.cell_fraction  # one field of view for the whole set
    assert {cv2.imread(str(p)).shape[0] for p in out.rglob("*.png")} == {round(side)}


def test_the_detector_check_is_reported_and_finds_the_cells_a_blind_detector_misses(tmp_path):
    from helpers import tiny_bundle
    from hemaedge.edge.segment.checked import CHECK_CELLS, CheckedSegmenter

    class Blind:
        def detect(self, frame):
            return []

    for i in range(CHECK_CELLS + 4):
        _image(tmp_path / "cells" / "neutrophil" / f"n{i:02d}.png", "red")
    bundle = load_bundle(tiny_bundle(tmp_path / "b", classes=CLASSES, int8=False))
    station = Station(bundle, CheckedSegmenter(learned=Blind(), stain=DiscFinder()), ColourCaller(), "colour caller")
    cells, _ = read_labelled(tmp_path / "cells")
    groups = {"neutrophils": ["neutrophil_segmented", "neutrophil_band"]}
    with station:
        res = evaluate_station(station, cells, match_labels([c.label for c in cells], CLASSES, groups)).to_dict()
    check = res["detector_check"]
    assert check["decision"] == "both" and check["detector_found"] == 0.0 and check["stain_cells"] == CHECK_CELLS
    # the detector alone while checking: the first CHECK_CELLS - 1 cells are missed, the rest are found
    assert res["missed"] == CHECK_CELLS - 1 and res["detected"] == 5
