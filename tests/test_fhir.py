"""FHIR R4 results: the Bundle validates with fhir.resources (R4 4.0.1), codes and statuses are right, and the
store-and-forward queue delivers exactly once to a server that is down, then up, across restarts and lost answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import BLOODMNIST_CLASSES
from hemaedge.edge.errors import UsageError
from hemaedge.edge.review.fhir import LOINC, build_bundle
from hemaedge.edge.review.outbox import SENT, Attempt, Outbox
from hemaedge.edge.review.verified import Verified
from hemaedge.edge.store.review import REVIEW, ReviewLog
from review_helpers import ROOT, RUNNER, UNSURE, FhirServer, env_without_proxy, free_port, make_session, wait_for

# R4 value sets the model library does not check (it validates structure and types, not bindings)
OBS_STATUS = {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
DEVICE_NAME_TYPE = {"udi-label-name", "user-friendly-name", "patient-reported-name", "manufacturer-name", "model-name"}


def sign(root, changes=((1, "monocyte", "neutrophil"),), who=("Ann Tech",)):
    with ReviewLog.open(root) as log:
        for cid in [c for c, v in log.verified().items() if v == REVIEW]:
            log.change(cid, "lymphocyte", REVIEW, who[0])
        for cid, to, frm in changes:
            log.change(cid, to, frm, who[0])
        log.sign_off(who[0], log.last_change(), "scope-7", {})
        for w in who[1:]:
            log.sign_off(w, log.last_change(), "scope-7", {}, second=True)
        return log.uid


def bundle_of(root, **kw):
    with ReviewLog.open(root) as log:
        return build_bundle(Verified(log), **kw)


def r4():
    fr = pytest.importorskip("fhir.resources", reason="fhir.resources (the dev extra) validates the Bundles")
    if getattr(fr, "__fhir_version__", "") != "4.0.1":
        pytest.skip(f"fhir.resources {fr.__version__} models FHIR {getattr(fr, '__fhir_version__', '?')}, not R4 4.0.1")
    from fhir.resources.bundle import Bundle

    return Bundle


def resources(bundle, kind):
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


@pytest.fixture()
def session(tmp_path):
    return make_session(tmp_path / "s")


def test_a_signed_session_is_a_valid_r4_transaction_bundle(session):
    Bundle = r4()
    uid = sign(session, who=("Ann Tech", "Bo Second"))
    b = bundle_of(session, wbc=7.2, subject="Patient/123")
    parsed = Bundle.parse_obj(b)  # raises on anything R4 does not allow
    kinds = [type(e.resource).__name__ for e in parsed.entry]
    assert kinds.count("DiagnosticReport") == 1 and kinds.count("Device") == 2
    (report,) = resources(b, "DiagnosticReport")
    assert report["status"] == "final" and report["identifier"][0]["value"] == f"urn:uuid:{uid}"
    assert report["code"]["coding"][0]["code"] == "24318-8"
    assert [p["display"] for p in report["performer"]] == ["Ann Tech", "Bo Second"]
    assert report["subject"] == {"reference": "Patient/123"}
    assert "verified by Ann Tech, Bo Second; 3 of 24 cells reclassified" in report["conclusion"]
    obs = resources(b, "Observation")
    assert {o["status"] for o in obs} == {"final"} and all(o["status"] in OBS_STATUS for o in obs)
    assert len(report["result"]) == len(obs)
    by_code = {c["code"]: o for o in obs for c in o["code"]["coding"] if c["system"] == "http://loinc.org"}
    n = next(o for o in obs if o["code"]["text"] == "neutrophil / 100 white cells")
    assert n["code"]["coding"][0]["code"] == LOINC["neutrophils"][0][0] == "26511-6"
    assert n["valueQuantity"]["code"] == "%" and n["referenceRange"][0]["low"]["value"] == 40.0
    assert "95% CI" in n["note"][0]["text"]
    # verified classes, not the model's: cell 1 moved neutrophil -> monocyte, the two unsure ones are lymphocytes
    mono = by_code["26485-3"]
    assert mono["note"][0]["text"].startswith("3 of 22 white cells")
    absolute = by_code["26499-4"]
    assert absolute["valueQuantity"]["code"] == "10*9/L"
    assert absolute["derivedFrom"][0]["reference"] == n["identifier"][0]["value"]
    assert absolute["valueQuantity"]["value"] == pytest.approx(n["valueQuantity"]["value"] / 100 * 7.2, abs=0.01)
    nrbc = by_code["19048-8"]
    assert nrbc["valueQuantity"]["code"] == "/100{WBCs}" and nrbc["interpretation"][0]["coding"][0]["code"] == "A"
    devices = resources(b, "Device")
    model = next(d for d in devices if d["deviceName"][0]["type"] == "model-name")
    station = next(d for d in devices if d is not model)
    assert model["deviceName"][0]["name"] == "test-bundle" and model["version"][0]["value"] == "ab" * 32
    assert model["parent"]["reference"] == station["identifier"][0]["value"]
    assert station["deviceName"][0]["name"] == "scope-7"
    assert all(d["deviceName"][0]["type"] in DEVICE_NAME_TYPE for d in devices)
    assert all(o["device"]["reference"] == model["identifier"][0]["value"] for o in obs)
    for e in b["entry"]:  # every entry is a conditional create on its own identifier
        assert e["request"]["method"] == "POST" and e["request"]["url"] == e["resource"]["resourceType"]
        assert e["request"]["ifNoneExist"] == f"identifier=urn:ietf:rfc:3986|{e['fullUrl']}"
    assert bundle_of(session, wbc=7.2, subject="Patient/123") == b  # the same every time: same identifiers


def test_flags_become_interpretations_and_triage_the_conclusion(tmp_path):
    Bundle = r4()
    calls = ["neutrophil"] * 18 + ["basophil"] * 6  # 25 % basophils: far above the adult 0-2 %
    root = make_session(tmp_path / "s", calls=calls, unsure=())
    from hemaedge.edge.count.triage import ChronicRule, TriageRules
    from hemaedge.edge.store import SessionStore

    rules = TriageRules("test/1", 0.01, min_cells=10, chronic=(ChronicRule("basophilia", {"basophils": 20.0}),))
    with SessionStore.open(root) as store:  # the session was counted under triage rules (as a blast-aware bundle does)
        store.update_settings(triage_rules=rules.to_dict())
    sign(root, changes=())
    b = bundle_of(root)
    Bundle.parse_obj(b)
    baso = next(o for o in resources(b, "Observation") if o["code"]["text"].startswith("basophil"))
    assert (
        baso["interpretation"][0]["coding"][0]["code"] == "H" and "Basophils high" in baso["interpretation"][0]["text"]
    )
    (report,) = resources(b, "DiagnosticReport")
    assert report["conclusion"].startswith("Triage: chronic") and "Basophils high" in report["conclusion"]


def test_a_group_of_several_classes_gets_one_loinc_observation(tmp_path):
    Bundle = r4()
    classes = ("band neutrophil", "segmented neutrophil", "lymphocyte", "myeloblast")
    calls = ["band neutrophil"] * 3 + ["segmented neutrophil"] * 12 + ["lymphocyte"] * 5 + ["myeloblast"]
    root = make_session(tmp_path / "s", calls=calls, unsure=(), classes=classes)
    sign(root, changes=())
    b = bundle_of(root, wbc=5.0)
    Bundle.parse_obj(b)
    obs = resources(b, "Observation")
    loinc = [c["code"] for o in obs for c in o["code"]["coding"] if c["system"] == "http://loinc.org"]
    assert loinc.count("26511-6") == 1 and loinc.count("26499-4") == 1  # the neutrophil group: one each
    group = next(o for o in obs if any(c["code"] == "26511-6" for c in o["code"]["coding"]))
    assert group["valueQuantity"]["value"] == pytest.approx(100 * 15 / 21, abs=0.01)
    blasts = next(o for o in obs if any(c["code"] == "26446-5" for c in o["code"]["coding"]))
    assert blasts["interpretation"][0]["coding"][0]["code"] == "A" and "BLASTS" in blasts["interpretation"][0]["text"]


def test_unsigned_sessions_are_refused_unless_preliminary(session):
    Bundle = r4()
    with pytest.raises(UsageError, match="not signed off"):
        bundle_of(session)
    b = bundle_of(session, preliminary=True)
    Bundle.parse_obj(b)
    (report,) = resources(b, "DiagnosticReport")
    assert report["status"] == "preliminary" and "performer" not in report and "NOT VERIFIED" in report["conclusion"]
    unsure = [o for o in resources(b, "Observation") if o["code"]["coding"][0]["code"] == REVIEW]
    assert unsure and unsure[0]["note"][0]["text"].startswith(f"{len(UNSURE)} of")
    with ReviewLog.open(session) as log:
        assert report["identifier"][0]["value"] != f"urn:uuid:{log.uid}"  # the final report is another one


def test_fhir_command_writes_the_bundle_and_refuses_unsigned(session, capsys):
    from hemaedge.cli import main

    assert main(["fhir", str(session)]) == UsageError.exit_code
    assert "--preliminary" in capsys.readouterr().err
    sign(session)
    assert main(["fhir", str(session), "--wbc", "6.5"]) == 0
    doc = json.loads((session / "fhir-bundle.json").read_text())
    assert doc["resourceType"] == "Bundle" and doc["type"] == "transaction"
    assert main(["fhir", str(session), "--wbc", "0"]) == UsageError.exit_code


# -- store and forward ----------------------------------------------------------------------------------------------
def fhir_cli(*args, wait=True):
    cmd = [sys.executable, "-c", RUNNER, "fhir", *map(str, args)]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env_without_proxy(), timeout=300)
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env_without_proxy()
    )


def pending_attempts(queue):
    return sum(e["attempts"] for e in Outbox(queue).entries())


def test_post_to_a_server_that_is_down_then_up_delivers_exactly_once(session, tmp_path):
    sign(session)
    queue, port = tmp_path / "queue", free_port()
    url = f"http://127.0.0.1:{port}/fhir"
    proc = fhir_cli(session, "--post", url, "--queue", queue, "--retry-base", "0.3", "--wait", "240", wait=False)
    try:
        wait_for(lambda: pending_attempts(queue) >= 2, timeout=120, what="two failed tries while the server is down")
        with FhirServer(port) as server:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
            assert server.count("DiagnosticReport") == 1 and server.count("Device") == 2
            n_obs = server.count("Observation")
            assert "delivered" in out and Outbox(queue).entries() == [] and len(Outbox(queue).entries(SENT)) == 1
            # sending it again: the queue knows it was delivered; forcing a resend creates nothing new either
            again = fhir_cli(session, "--post", url, "--queue", queue)
            assert again.returncode == 0 and "already delivered" in again.stdout
            (queue / "sent").joinpath(Outbox(queue).entries(SENT)[0]["key"] + ".json").unlink()
            again = fhir_cli(session, "--post", url, "--queue", queue)
            assert again.returncode == 0, again.stderr
            assert server.count("DiagnosticReport") == 1 and server.count("Observation") == n_obs
            assert server.requests == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_queue_survives_a_power_cut_and_is_flushed_after_restart(session, tmp_path):
    sign(session)
    queue, port = tmp_path / "queue", free_port()
    url = f"http://127.0.0.1:{port}/fhir"
    proc = fhir_cli(session, "--post", url, "--queue", queue, "--retry-base", "0.3", "--wait", "240", wait=False)
    try:
        wait_for(lambda: pending_attempts(queue) >= 1, timeout=120, what="a failed try")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # power cut while it waits to retry
        proc.communicate()
    (entry,) = Outbox(queue).entries()
    assert entry["attempts"] >= 1 and "cannot reach" in entry["last_error"]
    short = fhir_cli("--flush", "--queue", queue, "--wait", "0")
    assert short.returncode == 75 and "stay queued" in short.stdout  # still down: exit 75, still queued
    with FhirServer(port) as server:
        res = fhir_cli("--flush", "--queue", queue, "--retry-base", "0.2", "--wait", "120")
        assert res.returncode == 0, res.stderr
        assert server.count("DiagnosticReport") == 1 and Outbox(queue).entries() == []


def test_a_lost_answer_is_retried_and_still_creates_one_report(session, tmp_path):
    sign(session)
    with FhirServer(drop_answers=1) as server:
        box = Outbox(tmp_path / "q", base=0.05)
        with ReviewLog.open(session) as log:
            box.enqueue(build_bundle(Verified(log)), server.url, log.uid, "final")
        done = box.flush(wait=60)
        assert len(done[SENT]) == 1 and server.requests == 2  # processed, answer lost, sent again
        assert server.count("DiagnosticReport") == 1


def test_a_server_that_refuses_the_bundle_for_good_is_not_retried(session, tmp_path):
    sign(session)
    with FhirServer(status=400) as server:
        res = fhir_cli(session, "--post", server.url, "--queue", tmp_path / "q", "--retry-base", "0.1", "--wait", "30")
        assert res.returncode != 0 and "refused" in res.stderr and server.requests == 1
        assert len(Outbox(tmp_path / "q").entries("failed")) == 1


def test_back_off_doubles_and_is_kept_in_the_entry(tmp_path):
    t = [1000.0]
    box = Outbox(
        tmp_path / "q", base=2.0, cap=20.0, poster=lambda *a: Attempt(False, True, 503, "HTTP 503"), clock=lambda: t[0]
    )
    box.enqueue({"resourceType": "Bundle"}, "http://127.0.0.1:9/fhir", "uid", "final")
    gaps = []
    for _ in range(6):
        (e,) = box.entries()
        t[0] = e["next_at"]
        box.flush(wait=0)
        (e2,) = Outbox(tmp_path / "q").entries()  # as a restarted process reads it
        gaps.append(e2["next_at"] - t[0])
    assert [round(g / (2.0 * 2**i)) for i, g in enumerate(gaps[:3])] == [1, 1, 1]  # 2, 4, 8 s (+-20 %)
    assert max(gaps) <= 20.0 * 1.2 and e2["attempts"] == 6
    with pytest.raises(UsageError):
        box.enqueue({}, "ftp://x", "uid", "final")


def test_enqueueing_again_replaces_the_pending_entry(tmp_path):
    box = Outbox(tmp_path / "q", poster=lambda *a: Attempt(False, True, None, "down"))
    box.enqueue({"resourceType": "Bundle", "n": 1}, "http://127.0.0.1:9/fhir", "uid", "final")
    box.enqueue({"resourceType": "Bundle", "n": 2}, "http://127.0.0.1:9/fhir", "uid", "final")
    (e,) = box.entries()
    assert e["bundle"]["n"] == 2
    assert sorted(p.name for p in (tmp_path / "q" / "pending").iterdir()) == [f"{e['key']}.json"]  # no stray temp


def test_classes_without_loinc_keep_a_local_code(session):
    r4()
    sign(session)
    b = bundle_of(session)
    plt = next(o for o in resources(b, "Observation") if o["code"]["text"].startswith("platelet"))
    assert [c["system"] for c in plt["code"]["coding"]] == ["urn:hemaedge:cell-class"]
    assert set(BLOODMNIST_CLASSES) - {"platelet"} <= {
        o["code"]["text"].split(" / ")[0] for o in resources(b, "Observation") if "http://loinc.org" in str(o["code"])
    }
