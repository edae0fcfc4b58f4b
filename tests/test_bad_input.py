"""Never silent on bad input: every unusable or unread input is named with its reason, nothing counted from nothing.

Each test is a case a user met: a text file named .jpg, a truncated JPEG, a 1x1 PNG, a greyscale PNG, a folder of
good and bad files, a camera that does not open, SIGTERM, a resumed session that is already complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hemaedge.edge.sources import open_source

from hemaedge.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _good_images(folder: Path, n: int = 3, seed: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with open_source(f"synthetic://?seed={seed}&frames={n}&wbc=5") as src:
        for f in src:
            path = folder / f"good{f.index}.png"
            cv2.imwrite(str(path), f.bgr())
            out.append(path)
    return out


def _bad_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = _good_images(folder / "_src", 1, seed=9)[0]
    jpg = cv2.imencode(".jpg", cv2.imread(str(good)))[1].tobytes()
    files = {
        "text.jpg": b"hello, not an image",
        "trunc.jpg": jpg[: len(jpg) // 3],
        "one.png": cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes(),
        "grey.png": cv2.imencode(".png", cv2.cvtColor(cv2.imread(str(good)), cv2.COLOR_BGR2GRAY))[1].tobytes(),
    }
    out = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    return out


def _count(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["count", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize(
    "name, reason",
    [
        ("text.jpg", "not a readable image"),
        ("trunc.jpg", "truncated JPEG"),
        ("one.png", "too small (1x1 px"),
        ("grey.png", "greyscale image"),
    ],
)
def test_an_unusable_image_is_named_with_its_reason_and_the_run_fails(name, reason, tiny_bundle_dir, tmp_path, capsys):
    bad = _bad_images(tmp_path / "in")
    code, out, err = _count([str(bad[name]), "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "s")], capsys)
    assert code == 2
    flat = " ".join(err.split())
    assert name in flat and reason in flat
    assert "1 of 1 images could not be used" in flat
    assert "none of the 1 images could be used: nothing was counted" in flat
    assert "No flags" not in out + err
    session = next((tmp_path / "s").iterdir())
    summary = json.loads((session / "summary.json").read_text())
    assert summary["inputs"]["unusable"][0]["name"] == name and reason in summary["inputs"]["unusable"][0]["detail"]
    report = (session / "report.html").read_text()
    assert "No flags" not in report and "nothing could be flagged" in report and name in report


def test_a_mixed_folder_counts_the_good_images_and_names_every_bad_one(tiny_bundle_dir, tmp_path, capsys):
    folder = tmp_path / "mixed"
    _good_images(folder, 4)
    _bad_images(folder)
    code, out, err = _count(
        [str(folder), "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "s"), "--json"], capsys
    )
    doc = json.loads(out)
    assert code == 0 and doc["differential"]["total_wbc"] > 0
    inputs = doc["inputs"]
    assert inputs["total"] == 8 and inputs["used"] == 4
    assert sorted(u["name"] for u in inputs["unusable"]) == ["grey.png", "one.png", "text.jpg", "trunc.jpg"]
    assert inputs["message"].startswith("4 of 8 images could not be used (")
    flat = " ".join(err.split())
    for name in ("grey.png", "one.png", "text.jpg", "trunc.jpg"):
        assert name in flat  # each named on the terminal as it happens
    assert "4 of 8 images could not be used" in flat
    report = Path(doc["reports"]["report"]).read_text()
    assert "Inputs not used (4)" in report and "truncated JPEG" in report


def test_the_terminal_says_when_the_target_was_not_reached_and_what_was_never_read(tiny_bundle_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    _good_images(folder, 6)
    code, out, err = _count(
        [str(folder), "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "s"), "--target", "1000", "--no-tui"],
        capsys,
    )
    flat = " ".join(err.split())
    assert code == 0 and "target not reached:" in flat and "/1000 white cells" in flat
    code, out, err = _count(
        [str(folder), "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "s"), "--target", "2", "--json"],
        capsys,
    )
    doc = json.loads(out)
    assert code == 0 and doc["differential"]["complete"]
    assert doc["inputs"]["not_read"] >= 1
    assert f"{doc['inputs']['not_read']} images not read: the target was reached first" in " ".join(err.split())


def test_platelets_are_not_estimated_unless_asked(tiny_bundle_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    _good_images(folder, 2)
    code, out, _ = _count(
        [str(folder), "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "a"), "--json"], capsys
    )
    rows = {r["class"]: r for r in json.loads(out)["differential"]["classes"]}
    assert rows["platelet"]["estimated"] is False and rows["platelet"]["per_100_wbc"] is None
    code, out, _ = _count(
        [str(folder), "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "b"), "--json", "--platelets"], capsys
    )
    rows = {r["class"]: r for r in json.loads(out)["differential"]["classes"]}
    assert rows["platelet"].get("estimated", True) and rows["platelet"]["per_100_wbc"] is not None


def test_a_camera_that_cannot_open_leaves_no_empty_session(tiny_bundle_dir, tmp_path, capsys):
    out_dir = tmp_path / "sessions"
    code, _, err = _count(
        ["v4l2:///dev/video97", "--bundle", str(tiny_bundle_dir), "--out", str(out_dir), "--no-tui"], capsys
    )
    assert code == 2 and "cannot open" in err
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert "[ WARN" not in err


def test_a_complete_session_resumed_says_so_and_how_to_count_more(tiny_bundle_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    _good_images(folder, 3)
    code, _, _ = _count(
        [str(folder), "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "s"), "--target", "2", "--no-tui"],
        capsys,
    )
    session = next((tmp_path / "s").iterdir())
    code, out, err = _count(["--resume", str(session), "--no-tui"], capsys)
    flat = " ".join(err.split())
    assert code == 0 and "is complete: 2/2 white cells" in flat and str(folder) in flat and "--target" in flat


def test_sigterm_stops_cleanly_writes_the_reports_and_exits_143(tiny_bundle_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "hemaedge",
        "count",
        "synthetic://?seed=3&frames=100000&pan=4",
        "--bundle",
        str(tiny_bundle_dir),
        "--out",
        str(tmp_path / "s"),
        "--target",
        "100000",
        "--max-fps",
        "20",
        "--no-tui",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "s").exists():
        time.sleep(0.2)
    time.sleep(3)  # a few cells counted
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    session = next((tmp_path / "s").iterdir())
    assert json.loads((session / "summary.json").read_text())["state"] == "stopped"


def test_detect_on_an_empty_folder_says_why(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["detect", str(tmp_path / "empty")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "no images" in err and "empty" in err
