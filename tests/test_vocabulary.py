"""One vocabulary of cell classes across bundles, data sets and reports."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hemaedge.calibration.datasets import load_folder
from hemaedge.edge.bundle.vocabulary import CLASSES, canonical, canonical_classes, display_name, same_class

MODELS = Path(__file__).resolve().parents[1] / "edge" / "models"


def test_every_shipped_bundle_speaks_the_one_vocabulary():
    seen = {}
    for manifest in sorted(MODELS.glob("*/manifest.json")):
        doc = json.loads(manifest.read_text())
        if doc.get("task") == "detect":
            continue  # a white-cell detector (edge/models/wbcnet) has one class, "wbc": a box, not a cell type
        classes = doc["classes"]
        assert all(c in CLASSES for c in classes), (manifest.parent.name, classes)
        seen[manifest.parent.name] = classes
    assert seen["bloodcnn5"] == seen["effb0-pbc256"]  # both are the 8 PBC classes, spelled the same


def test_spellings_of_one_class_meet_and_different_classes_do_not():
    assert canonical("ig") == canonical("Immature granulocyte") == "immature_granulocyte"
    assert canonical("Segmented neutrophils") == canonical("SNE") == "neutrophil_segmented"
    assert canonical("Blast, no lineage spec") == "blast"
    assert canonical("myeloblast") != canonical("lymphoblast") != canonical("blast")
    assert not same_class("neutrophil", "neutrophil_band")
    assert canonical("no such cell") is None and display_name("no_such_cell") == "No such cell"
    assert display_name("neutrophil_band") == "Band neutrophil" and display_name("ig") == "Immature granulocyte"


def test_a_class_list_that_names_one_class_twice_is_refused():
    assert canonical_classes(["ig", "neutrophil", "weird_new_cell"]) == [
        "immature_granulocyte",
        "neutrophil",
        "weird_new_cell",
    ]
    with pytest.raises(ValueError, match="same class twice"):
        canonical_classes(["ig", "immature granulocyte"])


def test_class_folders_match_a_bundles_classes_under_any_spelling(tmp_path):
    for folder in ("ig", "Segmented neutrophils"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "a.png"), np.full((8, 8, 3), 200, np.uint8))
    images = load_folder(tmp_path, None, classes=["neutrophil_segmented", "immature_granulocyte"])
    assert sorted(images.labels.tolist()) == [0, 1]
    labels = {p.parent.name: int(k) for p, k in zip(images.paths, images.labels)}
    assert labels == {"Segmented neutrophils": 0, "ig": 1}
