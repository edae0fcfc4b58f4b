"""The session store: durable before counted, one-line StoreErrors, and SIGKILL + --resume loses nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import new_cell
from hemaedge.edge.count import SlideRegistrar
from hemaedge.edge.errors import StoreError
from hemaedge.edge.sources import open_source
from hemaedge.edge.store import NewCell, SessionStore

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"classes": ["a", "b", "c"], "target": 10, "review_threshold": 0.6, "source": "x"}


def cell(i: int, rng: np.random.Generator | None = None) -> NewCell:
    rng = rng or np.random.default_rng(i)
    crop = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    probs = np.array([0.7, 0.2, 0.1], np.float32)
    return new_cell(
        i, f"f{i}.png", (10.0 + i, 20.0, 50.0 + i, 60.0), 1, 100.0 + i, 50.0, probs, SETTINGS["classes"], crop
    )


def test_cells_round_trip_with_their_crops(tmp_path):
    store = SessionStore.create(tmp_path / "s", SETTINGS)
    new = [cell(0), cell(1)]
    stored = store.add(new)
    assert [c.id for c in stored] == [1, 2]
    again = store.read_cells()
    assert again == stored
    for c, n in zip(again, new):
        png = cv2.imread(str(store.root / c.crop))[..., ::-1]
        assert np.array_equal(png, n.crop.pixels), "the crop on disk is not what was classified"
    assert store.settings == SETTINGS
    store.close()
    with SessionStore.open(tmp_path / "s") as s2:
        assert [c.id for c in s2.read_cells()] == [1, 2]
        assert s2._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s2._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reset_starts_a_new_epoch_and_keeps_the_old_rows(tmp_path):
    with SessionStore.create(tmp_path / "s", SETTINGS) as store:
        store.add([cell(0)])
        assert store.reset() == 1
        store.add([cell(1)])
        assert [c.frame_index for c in store.read_cells()] == [1]
        assert [c.frame_index for c in store.read_cells(epoch=0)] == [0]
    with SessionStore.open(tmp_path / "s") as store:
        assert store.epoch == 1


def test_keyframes_round_trip(tmp_path):
    reg = SlideRegistrar()
    with open_source("synthetic://?seed=1&frames=20&pan=4") as src:
        for f in src:
            reg.register(f.pixels)
    kfs = reg.take_pending()
    with SessionStore.create(tmp_path / "s", SETTINGS) as store:
        store.add([], kfs)
        back = store.read_keyframes()
    assert [(k.id, k.field, k.ox, k.oy, k.frame_shape) for k in back] == [
        (k.id, k.field, k.ox, k.oy, k.frame_shape) for k in kfs
    ]
    assert all(np.array_equal(a.thumb, b.thumb) for a, b in zip(back, kfs))


def test_refuses_to_overwrite_or_to_open_what_is_not_a_session(tmp_path):
    SessionStore.create(tmp_path / "s", SETTINGS).close()
    with pytest.raises(StoreError, match="already holds a session"):
        SessionStore.create(tmp_path / "s", SETTINGS)
    with pytest.raises(StoreError, match="not a hemaedge session"):
        SessionStore.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "session.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        SessionStore.open(tmp_path / "bad")


def test_a_full_database_raises_one_line_and_loses_nothing_already_stored(tmp_path):
    store = SessionStore.create(tmp_path / "s", SETTINGS)
    store.add([cell(0)])
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count={pages}")  # the database file may not grow: SQLITE_FULL
    big = [cell(i) for i in range(1, 60)]
    with pytest.raises(StoreError) as info:
        store.add(big)
    msg = str(info.value)
    assert "\n" not in msg and "full" in msg and "--resume" in msg
    store._conn.execute("PRAGMA max_page_count=1073741823")
    assert [c.frame_index for c in store.read_cells()] == [0], "the failed batch must not be half stored"
    store.add([cell(99)])  # space freed: the session goes on
    assert [c.frame_index for c in store.read_cells()] == [0, 99]
    store.close()


def test_an_unwritable_crop_folder_raises_one_line_and_rolls_back(tmp_path):
    store = SessionStore.create(tmp_path / "s", SETTINGS)
    store.add([cell(0)])
    crops = store.root / "crops"
    os.rename(crops, store.root / "crops.moved")
    crops.write_text("a file where the crops folder should be (like a read-only or vanished mount)")
    with pytest.raises(StoreError) as info:
        store.add([cell(1)])
    assert "\n" not in str(info.value)
    assert [c.frame_index for c in store.read_cells()] == [0]
    store.close()


def test_create_in_an_impossible_place_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create"):
        SessionStore.create(tmp_path / "file" / "s", SETTINGS)


# -- SIGKILL mid-count, then --resume -------------------------------------------------------------------------------------
URI = "synthetic://?seed=7&frames=3000&pan=4&wbc=4"
RUNNER = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import fake_segment
fake_segment.install()
from hemaedge.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _truth_id(src, c: dict) -> int:
    f = src.frame(c["frame"])
    ids = src.truth_ids(c["frame"])
    b = np.asarray(c["box"])
    t = np.asarray(f.truth)
    ix = np.clip(np.minimum(t[:, 2], b[2]) - np.maximum(t[:, 0], b[0]), 0, None)
    iy = np.clip(np.minimum(t[:, 3], b[3]) - np.maximum(t[:, 1], b[1]), 0, None)
    inter = ix * iy
    iou = inter / ((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    assert iou.max() > 0.9
    return ids[int(iou.argmax())]


def test_sigkill_mid_count_then_resume_keeps_every_shown_cell_once(tiny_bundle_dir, tmp_path):
    out = tmp_path / "sessions"
    cmd = [
        sys.executable,
        "-c",
        RUNNER,
        "count",
        URI,
        "--bundle",
        str(tiny_bundle_dir),
        "--out",
        str(out),
        "--no-tui",
        "--target",
        "80",
        "--max-fps",
        "60",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    shown: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while len(shown) < 25:
            line = proc.stdout.readline()
            assert line, f"count ended early: {proc.stderr.read()[-2000:]}"
            if line.startswith("cell "):
                shown.append(line)
            assert time.monotonic() < deadline
        os.kill(proc.pid, signal.SIGKILL)  # a power cut, as far as the process can tell
        proc.wait(10)
        shown += [ln for ln in proc.stdout.read().splitlines() if ln.startswith("cell ")]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    shown_ids = [int(ln.split()[1]) for ln in shown]
    assert 25 <= len(shown_ids) < 80, "the kill must land mid-count"
    (session,) = out.iterdir()

    # the store after the crash: every shown cell is there, with its crop
    con = sqlite3.connect(session / "session.sqlite")
    rows = dict(con.execute("SELECT id, crop FROM cells").fetchall())
    con.close()
    assert set(shown_ids) <= set(rows)
    assert all((session / rows[i]).is_file() for i in shown_ids)

    res = subprocess.run(
        [sys.executable, "-c", RUNNER, "count", "--resume", str(session), "--no-tui", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    cells = doc["cells"]
    ids = [c["id"] for c in cells]
    assert doc["differential"]["total_wbc"] == 80 == len(cells)
    assert set(shown_ids) <= set(ids), "a cell shown before the crash is missing after --resume"
    assert len(ids) == len(set(ids))
    src = open_source(URI)
    physical = [_truth_id(src, c) for c in cells]
    assert len(physical) == len(set(physical)), "a physical cell was counted twice across the crash"
    assert (session / "report.html").is_file() and (session / "cells.csv").is_file()
