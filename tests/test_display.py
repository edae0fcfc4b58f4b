"""The live TUI fits 80x24 and large terminals without losing data; keys; reports."""

from __future__ import annotations

import csv
import io
import json
import re
import time

import numpy as np
import pytest
from helpers import BLOODMNIST_CLASSES, new_cell
from hemaedge.edge.bundle.vocabulary import display_name
from hemaedge.edge.count import DifferentialCounter
from hemaedge.edge.display.report import render_html, write_reports
from hemaedge.edge.display.status import RecentCell, RunStatus
from hemaedge.edge.display.tui import KeyReader, render_status, run_live
from hemaedge.edge.store import SessionStore
from rich.console import Console

LEUKAEMIA = (
    "myeloblast",
    "lymphoblast",
    "promyelocyte",
    "myelocyte",
    "metamyelocyte",
    "band neutrophil",
    "segmented neutrophil",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "erythroblast",
)


def status(classes=BLOODMNIST_CLASSES, n=87, warnings=(), extra_flags=0, seed=0) -> RunStatus:
    c = DifferentialCounter(classes, target=100)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        c.add(int(rng.integers(len(classes))), bool(rng.random() < 0.15))
    snap = c.snapshot()
    if extra_flags:
        from dataclasses import replace

        snap = replace(
            snap,
            flags=snap.flags
            + tuple(f"extra flag number {i} with a fairly long explanation of it" for i in range(extra_flags)),
        )
    recent = tuple(RecentCell(i, classes[i % len(classes)], 0.9, f"frame-{i:04d}.png") for i in range(8))
    return RunStatus(
        snap,
        tuple(classes),
        c.groups.differential,
        dict(c.groups.labels),
        "counting",
        "sessions/20261126-101500",
        "synthetic://?seed=0&frames=5000&pan=4&wbc=4",
        "onnxruntime/CPU",
        "int8",
        1234,
        31.2,
        2.4,
        {"quality": 3, "busy": 12},
        40,
        tuple(warnings),
        recent,
        0.6,
    )


def rendered(st: RunStatus, width: int, height: int, **kw) -> list[str]:
    con = Console(width=width, height=height, record=True, file=io.StringIO(), color_system=None)
    con.print(render_status(st, width, height, **kw))
    return con.export_text().rstrip("\n").split("\n")


def assert_complete(lines: list[str], st: RunStatus, width: int, height: int) -> None:
    text = "\n".join(lines)
    assert len(lines) <= height, f"{len(lines)} lines do not fit {height}:\n{text}"
    assert all(len(ln) <= width for ln in lines)
    assert "…" not in text and "..." not in text.replace("reconnecting...", ""), text
    snap = st.snapshot
    rows = {ln.split()[0]: ln for ln in lines if ln.strip()}
    for c, diff in zip(st.classes, st.differential):
        label = display_name(c)  # people read display names ("Immature granulocyte"), never raw ids
        row = next((ln for ln in lines if ln.startswith(label + " ")), None)
        assert row is not None, f"class {label!r} is missing or cut:\n{text}"
        nums = row[len(label) :].split()
        assert nums[0] == str(snap.counts[c])
        if diff:
            lo, hi = snap.intervals[c]
            assert nums[1] == f"{snap.percentages[c]:.1f}"
            assert re.search(rf"{lo:.1f}- ?{hi:.1f}", row), row
    review = next(ln for ln in lines if ln.startswith("review"))
    assert review.split()[2] == str(snap.review)
    assert f"{snap.total}/{snap.target} WBC" in text
    assert "frames/s" in text and "cells/s" in text and "onnxruntime/CPU int8" in text
    assert "q quit" in text or "reset the count?" in text
    del rows


@pytest.mark.parametrize("size", [(80, 24), (100, 30), (200, 60), (132, 43)])
def test_every_class_count_and_interval_survives_the_terminal_size(size):
    w, h = size
    st = status(warnings=("frame skipped: blurred (sharpness 12 < 40)", "camera reconnecting..."))
    lines = rendered(st, w, h)
    assert_complete(lines, st, w, h)
    text = "\n".join(lines)
    assert "camera reconnecting" in text and "blurred" in text
    for f in st.snapshot.flags:
        assert f.split(":")[0] in text


def test_80x24_with_more_flags_than_fit_summarises_instead_of_cutting():
    st = status(warnings=("frame skipped: blurred",), extra_flags=9)
    lines = rendered(st, 80, 24)
    assert_complete(lines, st, 80, 24)
    assert re.search(r"\+\d+ more flags", "\n".join(lines))


def test_80x24_with_a_twelve_class_bundle():
    st = status(LEUKAEMIA, n=150)
    lines = rendered(st, 80, 24)
    assert_complete(lines, st, 80, 24)


def test_large_terminal_shows_bars_and_recent_cells():
    st = status()
    text = "\n".join(rendered(st, 200, 60))
    assert "last cells" in text and "frame-0007.png" in text and "━" in text


def test_reset_asks_for_confirmation_in_the_view():
    st = status()
    lines = rendered(st, 80, 24, confirm_reset=True)
    assert any("reset the count? press y" in ln for ln in lines)


def test_key_reader_is_a_no_op_without_a_terminal():
    with KeyReader(io.StringIO("q")) as keys:
        assert keys.read() is None


class FakeKeys:
    def __init__(self, keys):
        self.keys = list(keys)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def read(self):
        return self.keys.pop(0) if self.keys else None


class FakeSession:
    """Records the controls the TUI calls (the real one is tested in test_pipeline)."""

    def __init__(self):
        self.calls = []
        self.alive = True
        self.st = status()

    def start(self):
        self.calls.append("start")

    def stop(self):
        self.calls.append("stop")
        self.alive = False

    def toggle_pause(self):
        self.calls.append("pause")
        return True

    def reset(self):
        self.calls.append("reset")

    def running(self):
        return self.alive

    def wait(self, timeout=None):
        time.sleep(0.001)
        return not self.alive

    def status(self, message=""):
        from dataclasses import replace

        return replace(self.st, message=message)


def test_keys_pause_reset_with_confirmation_snapshot_and_quit():
    session = FakeSession()
    snaps = []
    con = Console(width=80, height=24, file=io.StringIO(), force_terminal=True)
    run_live(
        session,
        con,
        lambda: snaps.append(1) or "snapshot saved",
        refresh_s=0.001,
        keys=FakeKeys(["p", "r", "n", "r", "y", "s", None, "q"]),
    )
    assert session.calls == ["start", "pause", "reset", "stop"]  # the first 'r' was cancelled by 'n'
    assert snaps == [1]


# -- reports -------------------------------------------------------------------------------------------------------------
def _store(tmp_path, n=30):
    settings = {
        "classes": list(BLOODMNIST_CLASSES),
        "class_groups": {},
        "target": 25,
        "review_threshold": 0.6,
        "source": "synthetic://?seed=0",
        "bundle": "/b",
        "bundle_name": "tiny",
        "bundle_sha256": "0",
        "precision": "int8",
    }
    store = SessionStore.create(tmp_path / "s", settings)
    rng = np.random.default_rng(0)
    cells = []
    for i in range(n):
        p = rng.dirichlet(np.ones(8) * 0.3).astype(np.float32)
        cells.append(
            new_cell(
                i,
                f"frame-{i}.png",
                (1.0, 2.0, 40.0, 41.0),
                1,
                i * 50.0,
                0.0,
                p,
                BLOODMNIST_CLASSES,
                rng.integers(0, 255, (30, 30, 3), dtype=np.uint8),
            )
        )
    stored = store.add(cells)
    return store, stored


def test_reports_are_written_from_the_store(tmp_path):
    store, stored = _store(tmp_path)
    paths = write_reports(store, info={"backend": "onnxruntime/CPU", "frames": 99})
    summary = json.loads(paths["summary"].read_text())
    d = summary["differential"]
    assert sum(r["count"] for r in d["classes"]) == len(stored)
    assert d["total_wbc"] == sum(r["count"] for r in d["classes"] if r["in_differential"])
    assert summary["frames"] == 99 and summary["backend"] == "onnxruntime/CPU"
    rows = list(csv.DictReader(paths["cells"].open()))
    assert [int(r["id"]) for r in rows] == [c.id for c in stored]
    assert {f"p_{c}" for c in BLOODMNIST_CLASSES} <= set(rows[0])
    html = paths["report"].read_text()
    assert html.count("data:image/png;base64,") == len(stored)
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    assert "<style>" in html and "95% CI" in html and "Flags" in html
    store.close()


def test_report_says_when_the_target_was_not_reached(tmp_path):
    store, _ = _store(tmp_path, n=5)
    from hemaedge.edge.display.report import build_summary

    summary, cells, _ = build_summary(store)
    assert not summary["differential"]["complete"]
    assert "Target not reached" in render_html(summary, cells, store.root)
    store.close()


def test_a_standing_note_is_shown_when_it_fits_and_never_pushes_a_class_out():
    from dataclasses import replace

    note = "demo: the cells are drawn by the synthetic smear, not photographed; not a blood count"
    st = replace(status(warnings=("camera reconnecting...",)), note=note)
    for w, h in ((80, 24), (160, 50)):
        lines = rendered(st, w, h)
        assert_complete(lines, st, w, h)
    assert "not photographed" in "\n".join(rendered(st, 160, 50))


def test_only_the_tui_module_imports_rich_live():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    users = []
    for path in [*(root / "edge").rglob("*.py"), *(root / "hemaedge").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            if any(n == "rich.live" or n.startswith("rich.live.") for n in names):
                users.append(path.relative_to(root).as_posix())
    assert users == ["edge/display/tui.py"]
