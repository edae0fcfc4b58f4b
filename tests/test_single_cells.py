"""A folder of single-cell pictures (as an analyser exports them, one folder per class) is a normal count input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from hemaedge.edge.sources import open_source

from hemaedge.cli import main


def _export(folder: Path, n: int = 12) -> int:
    """Write ``n`` 128-px pictures, each centred on one white cell of a synthetic smear, into class folders;
    plus one picture of empty glass. Returns how many hold a cell."""
    written = 0
    with open_source("synthetic://?seed=5&frames=40&wbc=3") as src:
        for f in src:
            for box, kind in zip(f.truth, f.truth_kinds):
                if kind != "wbc" or written >= n:
                    continue
                cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
                if not (64 <= cx < f.pixels.shape[1] - 64 and 64 <= cy < f.pixels.shape[0] - 64):
                    continue
                sub = folder / ("a" if written % 2 else "b")
                sub.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(sub / f"cell{written:03d}.jpg"), f.bgr()[cy - 64 : cy + 64, cx - 64 : cx + 64])
                written += 1
    glass = np.full((128, 128, 3), 225, np.uint8)
    for x, y in ((30, 30), (90, 40), (40, 95), (100, 100)):  # red cells only, no white cell
        cv2.circle(glass, (x, y), 14, (150, 140, 205), -1)
    cv2.imwrite(str(folder / "b" / "glass.png"), glass)
    return written


def test_each_picture_counts_its_central_cell_once_across_class_subfolders(tiny_bundle_dir, tmp_path, capsys):
    n = _export(tmp_path / "patient")
    args = ["count", str(tmp_path / "patient"), "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "s")]
    assert main([*args, "--json", "--target", "1000"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["frames"] == n + 1
    names = [c["frame_name"] for c in doc["cells"]]
    assert len(names) == n and len(set(names)) == n  # one cell per picture, the central one
    assert all(name.split("/")[0] in ("a", "b") for name in names)  # named with their class folder
    assert [u["name"] for u in doc["inputs"]["unusable"]] == ["b/glass.png"]
    assert "no cell found at the centre" in doc["inputs"]["unusable"][0]["detail"]
    # resumed over the same pictures: nothing is counted twice
    session = Path(doc["session"])
    assert main(["count", "--resume", str(session), "--json", "--target", "1000"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (
        again["differential"]["total_wbc"]
        + sum(
            r["count"] for r in again["differential"]["classes"] if not r["in_differential"] and r["class"] != "review"
        )
        == n
    )


def test_a_folder_of_pictures_is_counted_whole_unless_a_target_is_given(tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    from hemaedge.edge.commands import count

    monkeypatch.setattr(count, "DEFAULT_TARGET", 5)  # a default target below the folder's cells
    n = _export(tmp_path / "patient", n=14)
    args = ["count", str(tmp_path / "patient"), "--bundle", str(tiny_bundle_dir), "--json"]
    # --target 5: stops there (the pictures after it are listed as not read)
    assert main([*args, "--out", str(tmp_path / "a"), "--target", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["cells"]) < n and doc["inputs"]["not_read"] >= 1
    # no --target: every picture is read and every cell counted, past the default target
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["cells"]) == n and doc["frames"] == n + 1 and doc["inputs"]["not_read"] == 0
    assert doc["differential"]["target"] == 5 and doc["differential"]["complete"]


def test_class_folders_that_are_links_are_followed_once(tiny_bundle_dir, tmp_path, capsys):
    """An export assembled from links to class folders (as scripts make them) is read; a link back up the tree is
    not gone round."""
    n = _export(tmp_path / "real", n=6)
    linked = tmp_path / "linked"
    linked.mkdir()
    for sub in ("a", "b"):
        (linked / sub).symlink_to(tmp_path / "real" / sub, target_is_directory=True)
    (tmp_path / "real" / "a" / "loop").symlink_to(linked, target_is_directory=True)
    args = ["count", str(linked), "--bundle", str(tiny_bundle_dir), "--json", "--out", str(tmp_path / "s")]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["frames"] == n + 1 and len(doc["cells"]) == n
