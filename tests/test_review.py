"""The review without a browser: audit trail, verified differential, signed report, the server's API and access,
crash safety (SIGKILL right after an acknowledged change), and export-cells for adapt and --calib."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import sys

import numpy as np
import pytest
from helpers import BLOODMNIST_CLASSES
from hemaedge.edge.count import REVIEW, DifferentialCounter
from hemaedge.edge.errors import StoreError, UsageError
from hemaedge.edge.review.export_cells import MANIFEST, export_cells, read_manifest, sessions_of
from hemaedge.edge.review.verified import Verified, write_verified_reports
from hemaedge.edge.store import SessionStore
from hemaedge.edge.store.review import ARTEFACT, ReviewConflict, ReviewError, ReviewLog, SessionLocked
from review_helpers import CALLS, UNSURE, ThreadServer, make_session, request, review_process, wait_for


@pytest.fixture()
def session(tmp_path):
    return make_session(tmp_path / "s")


def resolve_unsure(log: ReviewLog, who: str = "Ann") -> None:
    for cid in UNSURE:
        log.change(cid, "lymphocyte", REVIEW, who)


# -- the audit trail -----------------------------------------------------------------------------------------------
def test_a_change_is_a_new_row_and_the_models_call_stays(session):
    with ReviewLog.open(session) as log:
        ch = log.change(1, "monocyte", "neutrophil", "Ann Tech", "browser-1")
        assert (ch.cell_id, ch.old_class, ch.new_class, ch.reviewer) == (1, "neutrophil", "monocyte", "Ann Tech")
        assert log.change(1, "lymphocyte", "monocyte", "Bo") is not None
        assert [(c.old_class, c.new_class, c.reviewer) for c in log.changes()] == [
            ("neutrophil", "monocyte", "Ann Tech"),
            ("monocyte", "lymphocyte", "Bo"),
        ]
        assert log.verified()[1] == "lymphocyte"
        cell = next(c for c in log.cells() if c.id == 1)
        assert (cell.class_name, cell.review) == ("neutrophil", False)  # the model's call is untouched
        conn = log.store._conn
        for sql in (
            "UPDATE cells SET class_name='monocyte' WHERE id=1",
            "UPDATE review_changes SET new_class='basophil'",
            "DELETE FROM review_changes",
        ):
            with pytest.raises(sqlite3.DatabaseError):
                conn.execute(sql)
        assert len(log.changes()) == 2


def test_a_stale_change_is_refused_and_says_who_changed_the_cell(session):
    with ReviewLog.open(session) as a, ReviewLog.open(session) as b:  # two browsers, or two processes
        a.change(3, "neutrophil", "lymphocyte", "Ann")
        with pytest.raises(ReviewConflict, match=r"cell 3 is now neutrophil \(changed by Ann") as info:
            b.change(3, "monocyte", "lymphocyte", "Bo")  # Bo still saw lymphocyte
        assert info.value.current == "neutrophil"
        assert b.change(3, "neutrophil", "lymphocyte", "Bo") is None  # asks for what is there: nothing to record
        b.change(5, "basophil", "monocyte", "Bo")  # another cell: both changes stay
        assert [(c.cell_id, c.reviewer) for c in a.changes()] == [(3, "Ann"), (5, "Bo")]


def test_bad_changes_are_refused_with_one_line(session):
    with ReviewLog.open(session) as log:
        for args, match in (
            ((1, "unicorn", "neutrophil", "Ann"), "not a class"),
            ((999, "monocyte", "neutrophil", "Ann"), "not in this session"),
            ((1, "monocyte", "neutrophil", "   "), "name"),
        ):
            with pytest.raises(ReviewError, match=match):
                log.change(*args)
        assert log.changes() == []


def test_sign_off_waits_for_the_review_bucket_locks_and_takes_a_second_reviewer(session):
    with ReviewLog.open(session) as log:
        with pytest.raises(ReviewConflict, match="2 cell.*still in review"):
            log.sign_off("Ann", 0, "station-1", {})
        resolve_unsure(log)
        with pytest.raises(ReviewConflict, match="changed since you looked"):
            log.sign_off("Ann", 1, "station-1", {})
        so = log.sign_off("Ann", log.last_change(), "station-1", {"total_wbc": 20})
        assert (so.reviewer, so.role, so.station, so.cells) == ("Ann", "verified", "station-1", len(CALLS))
        with pytest.raises(SessionLocked, match="signed off by Ann"):
            log.change(1, "monocyte", "neutrophil", "Ann")
        with pytest.raises(SessionLocked):
            log.sign_off("Bo", log.last_change(), "station-1", {})
        with pytest.raises(ReviewError, match="must be someone else"):
            log.sign_off("ann", log.last_change(), "station-1", {}, second=True)
        log.sign_off("Bo", log.last_change(), "station-1", {}, second=True)
        with pytest.raises(SessionLocked, match="second reviewer"):
            log.sign_off("Cy", log.last_change(), "station-1", {}, second=True)
        assert [s.role for s in log.signoffs()] == ["verified", "second"]
    store = SessionStore.open(session)  # the station cannot add cells to a signed session (count --resume)
    assert store.signed_off() == "Ann"
    from helpers import new_cell

    one = new_cell(0, "", (0, 0, 1, 1), 0, 0, 0, [1.0] + [0.0] * 7, BLOODMNIST_CLASSES, np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(StoreError, match="signed off by Ann"):
        store.add([one])
    with pytest.raises(StoreError, match="locked"):
        store.reset()
    store.close()


# -- the verified differential and the signed report ---------------------------------------------------------------
def test_the_verified_differential_is_the_counters_own_recount(session):
    with ReviewLog.open(session) as log:
        resolve_unsure(log)
        log.change(1, "monocyte", "neutrophil", "Ann")
        log.change(3, ARTEFACT, "lymphocyte", "Ann")  # not a white cell: not counted
        summary = Verified(log).summary()
    expected = [("lymphocyte" if i + 1 in UNSURE else c) for i, c in enumerate(CALLS)]
    expected[0], expected[2] = "monocyte", None
    counter = DifferentialCounter(BLOODMNIST_CLASSES, 20)
    for c in expected:
        if c is not None:
            counter.add(BLOODMNIST_CLASSES.index(c), False)
    snap = counter.snapshot()
    d = summary["differential"]
    assert d["total_wbc"] == snap.total == len(CALLS) - 1 - 2  # artefact out; platelet, erythroblast outside
    got = {r["class"]: r["count"] for r in d["classes"]}
    assert got == {**snap.counts, REVIEW: 0}
    assert summary["model_differential"]["classes"][-1]["count"] == len(UNSURE)  # the model's review bucket
    ver = summary["verification"]
    assert ver["status"] == "in review" and ver["artefacts"] == [3]
    assert {(c["cell"], c["model"], c["verified"]) for c in ver["changed_cells"]} == {
        (1, "neutrophil", "monocyte"),
        (3, "lymphocyte", ARTEFACT),
        *((u, REVIEW, "lymphocyte") for u in UNSURE),
    }


def test_reports_say_unverified_until_signed_then_who_verified_what(session):
    html = (session / "report.html").read_text()  # as hemaedge count wrote it
    assert "UNVERIFIED: pre-classified by the model" in html and "width=device-width" in html
    with ReviewLog.open(session) as log:
        resolve_unsure(log)
        log.change(1, "monocyte", "neutrophil", "Ann Tech")
        write_verified_reports(log)
        assert "UNVERIFIED: review in progress" in (session / "report.html").read_text()
        log.sign_off("Ann Tech", log.last_change(), "scope-3", Verified(log).summary()["differential"])
        paths = write_verified_reports(log)
    html = paths["report"].read_text()
    assert "UNVERIFIED" not in html
    assert "Pre-classified by bundle <b>test-bundle</b> (manifest sha256 <code>abababababababab" in html
    assert "on station <b>scope-3</b>, verified by <b>Ann Tech</b> at 20" in html
    assert "Cells changed in review (3)" in html and "<td class=l><b>monocyte</b></td>" in html
    assert "<script" not in html and "http://" not in html  # still one self-contained file
    summary = json.loads(paths["summary"].read_text())
    assert summary["verification"]["status"] == "signed" and summary["frames"] > 0  # the count's keys are kept
    rows = list(csv.DictReader(paths["cells"].open()))
    assert rows[0]["class"] == "neutrophil" and rows[0]["verified_class"] == "monocyte"


def test_triage_is_recomputed_from_verified_classes(session):
    """The call comes from the verified classes, under the rules the session was counted with."""
    from hemaedge.edge.count.triage import TriageRules

    rules = TriageRules(
        version="test/1", false_call_rate=0.001, min_cells=1, evidence_groups=(), evidence_classes=("basophil",)
    )
    with ReviewLog.open(session) as log:
        log.store.update_settings(triage_rules=rules.to_dict())
        before = Verified(log).summary()["triage"]
        log.change(1, "basophil", "neutrophil", "Ann")
        summary = Verified(log).summary()
        html = write_verified_reports(log)["report"].read_text()
    after = summary["triage"]
    assert (
        after["evidence"]["evidence_cells"] == before["evidence"]["evidence_cells"] + 1 == CALLS.count("basophil") + 1
    )
    assert 1 in after["cells"] and after["rule"].startswith("test/1")
    assert "Slide triage" in html and after["call"].upper() in html


# -- the server ----------------------------------------------------------------------------------------------------
def test_api_changes_conflicts_and_sign_off(session):
    with ThreadServer(session) as srv:
        st, doc, h = request(srv.url + "/api/state")
        assert st == 200 and len(doc["cells"]) == len(CALLS) and not doc["can_sign"]["ok"]
        assert request(srv.url + "/api/state", headers={"If-None-Match": h["ETag"]})[0] == 304
        body = {"cell": 1, "from": "neutrophil", "to": "monocyte", "reviewer": "Ann"}
        st, doc, _ = request(srv.url + "/api/change", body)
        assert st == 200 and doc["change"]["to"] == "monocyte" and doc["state"]["last_change"] == 1
        st, doc, _ = request(srv.url + "/api/change", {**body, "to": "basophil"})  # saw neutrophil: stale
        assert st == 409 and "now monocyte" in doc["error"] and doc["current"] == "monocyte"
        st, doc, _ = request(srv.url + "/api/signoff", {"reviewer": "Ann", "seen": 1})
        assert st == 409 and "still in review" in doc["error"]
        for cid in UNSURE:
            request(srv.url + "/api/change", {"cell": cid, "from": REVIEW, "to": "lymphocyte", "reviewer": "Ann"})
        st, doc, _ = request(srv.url + "/api/signoff", {"reviewer": "Ann", "seen": 3})
        assert st == 200 and doc["state"]["locked"] and doc["signoff"]["reviewer"] == "Ann"
        st, doc, _ = request(srv.url + "/api/change", {**body, "from": "monocyte", "to": "basophil"})
        assert st == 423 and "signed off" in doc["error"]
        st, html, _ = request(srv.url + "/report")
        assert st == 200 and "verified by <b>Ann</b>" in html
    assert "verified by <b>Ann</b>" in (session / "report.html").read_text()  # the signed report is written


def test_requests_from_other_pages_and_hosts_are_refused(session):
    with ThreadServer(session) as srv:
        body = {"cell": 1, "from": "neutrophil", "to": "monocyte", "reviewer": "Ann"}
        assert request(srv.url + "/api/change", body, headers={"X-Hemaedge": "0"})[0] == 403
        assert request(srv.url + "/api/change", body, headers={"Origin": "http://evil.example"})[0] == 403
        assert request(srv.url + "/api/change", body, headers={"Content-Type": "text/plain"})[0] == 415
        assert request(srv.url + "/api/state", headers={"Host": "evil.example"})[0] == 421  # DNS rebinding
        assert request(srv.url + "/crops/..%2fsession.sqlite")[0] == 404
        st, page, h = request(srv.url + "/")
        assert st == 200 and "script-src 'self'" in h["Content-Security-Policy"] and "/static/review.js" in page
        assert "http://" not in page and "https://" not in page  # nothing from the internet
        assert request(srv.url + "/api/frame/1.jpg")[0] == 200  # the synthetic source gives its frames back
        assert srv.log.changes() == []


def test_a_pin_guards_the_review_when_asked(session):
    with ThreadServer(session, pin="424242") as srv:
        st, doc, _ = request(srv.url + "/api/state")
        assert st == 401 and doc["pin"]
        assert request(srv.url + "/api/login", {"pin": "000000"})[0] == 401
        st, _, h = request(srv.url + "/api/login", {"pin": "424242"})
        assert st == 200 and "HttpOnly" in h["Set-Cookie"] and "SameSite=Strict" in h["Set-Cookie"]
        cookie = h["Set-Cookie"].split(";")[0]
        assert request(srv.url + "/api/state", headers={"Cookie": cookie})[0] == 200
        assert request(srv.url + "/api/state", headers={"Cookie": "hemaedge_review=guess"})[0] == 401
        st, _, h = request(srv.url + f"/?t={srv.access.token}")
        assert st == 200  # the token link logs in (urllib followed the redirect)


def test_wrong_pins_are_answered_slower_and_slower():
    from hemaedge.edge.review.server import Access

    a = Access(True, pin="123456")
    waits = [a.check_pin("000000")[1] for _ in range(6)]
    assert waits[:4] == [0.0] * 4 and waits[4] > 0
    assert a.check_pin("123456") == (False, pytest.approx(waits[-1], abs=0.5))  # even the right PIN waits


def test_sigkill_right_after_an_acknowledged_change_loses_nothing(session):
    with review_process(session) as (proc, url):
        st, doc, _ = request(
            url + "/api/change", {"cell": 6, "from": "neutrophil", "to": "eosinophil", "reviewer": "A"}
        )
        os.kill(proc.pid, signal.SIGKILL)  # the moment the page shows it: a power cut, as far as SQLite can tell
        assert st == 200 and doc["change"]["to"] == "eosinophil"
        proc.wait(10)
    with review_process(session) as (_, url):
        st, doc, _ = request(url + "/api/state")
        assert next(c for c in doc["cells"] if c["id"] == 6)["verified"] == "eosinophil"
        assert [(c["cell"], c["to"]) for c in doc["changes"]] == [(6, "eosinophil")]


def test_the_review_command_opens_to_the_lan_only_with_a_pin(session):
    with review_process(session, "--host", "0.0.0.0") as (proc, url):
        port = url.rsplit(":", 1)[1]
        st, doc, _ = request(f"http://127.0.0.1:{port}/api/state")
        assert st == 401 and doc["pin"]
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: proc.poll() is not None, what="the server to stop on SIGTERM")
        assert "PIN " in proc.stderr.read()


def test_review_write_report_on_a_session_counted_by_the_station(tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    """A session made by hemaedge count itself (tiny model, fake segmenter), reviewed and written out."""
    import fake_segment
    import hemaedge.edge.segment as seg

    from hemaedge.cli import main

    monkeypatch.setattr(seg, "make_segmenter", fake_segment.make)
    uri = "synthetic://?seed=11&frames=400&pan=4&wbc=4"
    rc = main(["count", uri, "--bundle", str(tiny_bundle_dir), "--out", str(tmp_path), "--no-tui", "--target", "12"])
    assert rc == 0
    (root,) = [p for p in tmp_path.iterdir() if (p / "session.sqlite").exists()]
    with ReviewLog.open(root) as log:
        cells = log.cells()
        log.change(cells[0].id, ARTEFACT, "review" if cells[0].review else cells[0].class_name, "Ann")
    capsys.readouterr()
    assert main(["review", str(root), "--write-report"]) == 0
    assert capsys.readouterr().out.startswith("in review: ")
    assert "UNVERIFIED: review in progress" in (root / "report.html").read_text()


# -- export-cells --------------------------------------------------------------------------------------------------
def signed(session, changes=((1, "monocyte", "neutrophil"),), who="Ann"):
    with ReviewLog.open(session) as log:
        resolve_unsure(log, who)
        for cid, to, frm in changes:
            log.change(cid, to, frm, who)
        log.sign_off(who, log.last_change(), "scope-1", {})
        return log.uid


def test_export_cells_writes_verified_classes_and_a_manifest(tmp_path):
    a = make_session(tmp_path / "a")
    b = make_session(tmp_path / "b")
    uid_a = signed(a, ((1, "monocyte", "neutrophil"), (3, ARTEFACT, "lymphocyte")))
    out = tmp_path / "cells"
    with pytest.raises(UsageError, match="not signed off"):
        export_cells([a, b], out)
    doc = export_cells([a, b], out, allow_unsigned=True)
    assert (out / MANIFEST).is_file()
    assert {d.name for d in out.iterdir() if d.is_dir()} <= set(BLOODMNIST_CLASSES)
    mono = sorted(p.name for p in (out / "monocyte").glob("*.png"))
    assert f"a-{uid_a[:8]}-c000001.png" in mono  # the review's class, not the model's neutrophil
    assert not any(f"a-{uid_a[:8]}-c000003" in p.name for p in out.rglob("*.png"))  # an artefact is no cell
    unsure_b = [c for c in doc["cells"] if c["session"] != uid_a and c["cell"] in UNSURE]
    assert unsure_b == []  # unsigned b: its cells still in review have no class to go to
    entry = next(c for c in doc["cells"] if c["session"] == uid_a and c["cell"] == 1)
    assert entry == {**entry, "class": "monocyte", "model_class": "neutrophil", "changed": True, "verified_by": "Ann"}
    sa = next(s for s in sessions_of(out) if s["uid"] == uid_a)
    assert sa["signed"] and sa["verified_by"] == ["Ann"] and sa["bundle"]["manifest_sha256"] == "ab" * 32
    assert sum(doc["class_folders"].values()) == len(list(out.rglob("*.png"))) == len(doc["cells"])
    # exporting a session again replaces its cells (b, now signed, with its review cells resolved)
    signed(b, ((3, "basophil", "lymphocyte"),), who="Bo")
    doc2 = export_cells([b], out)
    assert len(doc2["sessions"]) == 2 and len(list(out.rglob("*.png"))) == len(doc2["cells"])
    assert read_manifest(out)["format"].startswith("hemaedge-export-cells")


def test_export_cells_refuses_sessions_with_other_classes(tmp_path):
    a = make_session(tmp_path / "a")
    other = ("a", "b", "neutrophil")
    b = make_session(tmp_path / "b", calls=["neutrophil"] * 4, unsure=(), classes=other)
    with pytest.raises(UsageError, match="different folders"):
        export_cells([a, b], tmp_path / "o", allow_unsigned=True)


def test_export_cells_is_read_by_the_image_folder_reader_with_the_bundles_classes(tmp_path):
    datasets = pytest.importorskip("hemaedge.calibration.datasets", reason="the workstation half is not installed")
    a = make_session(tmp_path / "a")
    signed(a)
    export_cells([a], tmp_path / "cells")
    ds = datasets.load_folder(tmp_path / "cells", classes=BLOODMNIST_CLASSES)  # what adapt reads
    assert len(ds) == len(CALLS) and ds.classes == BLOODMNIST_CLASSES
    assert ds.labels[[p.name for p in ds.paths].index(next(p.name for p in ds.paths if "c000001" in p.name))] == (
        BLOODMNIST_CLASSES.index("monocyte")
    )


def test_export_model_calibrates_on_exported_cells(tmp_path):
    pytest.importorskip("torch", reason="export-model needs the workstation extra")
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.export.exporter import ExportOptions, run_export
    from hemaedge.export.train import Recipe, train
    from test_export import _make_npz

    a = make_session(tmp_path / "a")
    signed(a)
    export_cells([a], tmp_path / "cells")
    data = _make_npz(tmp_path / "toy.npz", n=96)
    ckpt = train(
        Recipe(data=str(data), out=str(tmp_path / "run"), epochs=1, batch=32, arch_kwargs={"width": 0.5, "hidden": 16}),
        progress=False,
    )["best_checkpoint"]
    summary = run_export(
        ExportOptions(
            source=str(ckpt),
            out=str(tmp_path / "b"),
            data=str(data),
            int8=True,
            calib=str(tmp_path / "cells"),
            calib_size=16,
            max_drop=100.0,
        ),
        log=lambda m: None,
    )
    cal = load_bundle(summary["bundle"]).manifest.calibration
    assert "cells" in cal["set"] and 16 <= cal["num_images"] <= len(CALLS)


def test_cli_export_cells_and_refusals(tmp_path, capsys):
    from hemaedge.cli import main

    a = make_session(tmp_path / "a")
    assert main(["export-cells", str(a), "--out", str(tmp_path / "o")]) == UsageError.exit_code
    assert "not signed off" in capsys.readouterr().err
    signed(a)
    assert main(["export-cells", str(a), "--out", str(tmp_path / "o"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sum(doc["class_folders"].values()) == len(CALLS)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_review_runtime_files_are_package_data():
    from pathlib import Path

    import hemaedge.edge.display.report as report
    import hemaedge.edge.review.server as server

    for name in ("review.html", "review.js", "review.css"):
        assert (Path(server.__file__).parent / "static" / name).is_file()
    assert "@media print" in report.stylesheet()
