"""A session's results as a FHIR R4 (4.0.1) ``transaction`` Bundle, as plain JSON (no FHIR library at run time).

What it holds:

* a **DiagnosticReport** (LOINC 24318-8, the differential panel; category HM):
  status ``final`` when signed off (``preliminary`` with ``--preliminary``), the
  verifier(s) as ``performer``, the triage call and the flags in ``conclusion``,
  the session's UUID as its identifier;
* one **Observation** per class of the differential (percent of white cells, with
  the 95 % Wilson interval and the count in a note, the adult range as
  ``referenceRange``, flags as ``interpretation``), one per non-white class (per 100
  white cells), and, when a white-cell count is given, one absolute count per
  white-cell class (10^9/L, ``derivedFrom`` its percent);
* the **model bundle** as a Device (name, manifest sha256) whose ``parent`` is the
  **station**, another Device; every Observation names the model as its ``device``.

Codes. LOINC's method-less terms of the manual differential panel (24318-8): a
digital-morphology count verified by a technologist is neither an analyser's
automated differential nor a count at the microscope, and these terms fit both.
The percent / absolute pairs used (see ``LOINC`` below and docs/review.md):
neutrophils 26511-6 / 26499-4, lymphocytes 26478-8 / 26474-7, monocytes
26485-3 / 26484-6, eosinophils 26450-7 / 26449-9, basophils 30180-4 / 26444-0,
blasts 26446-5 / 30376-8, immature granulocytes 38518-7 / 51584-1, nucleated red
cells per 100 white cells 19048-8 (no absolute). Platelets per 100 white cells and
the review bucket have no LOINC term: they carry a local code only. A class that
shares its clinical group with another class (band and segmented neutrophils)
gets a local code, and the group gets one LOINC-coded Observation with their sum.

Exactly once. Each entry is a conditional create (``request.ifNoneExist`` on its
identifier, the transaction form of the ``If-None-Exist`` header): posting the same
session again, after a lost answer or a restart, creates nothing new. Identifiers
are derived from the session's UUID (UUID 5), so they are the same every time. A
preliminary report has its own identifier (it is a different report); a final
one posted later is created beside it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hemaedge.edge import __version__
from hemaedge.edge.count import REFERENCE_RANGES, REVIEW, ClassGroups
from hemaedge.edge.errors import UsageError
from hemaedge.edge.review.verified import Verified, iso

LOINC_SYSTEM = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
URI_SYSTEM = "urn:ietf:rfc:3986"
LOCAL_SYSTEM = "urn:hemaedge:cell-class"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
NAMESPACE = uuid.UUID("5b0f3e0c-6d3a-4e0e-9a51-3c1e8f2a7d10")  # hemaedge's UUID-5 namespace

PANEL = ("24318-8", "Manual differential panel - Blood")
# clinical group -> ((percent code, display), (absolute code, display) or None)
LOINC: dict[str, tuple[tuple[str, str], tuple[str, str] | None]] = {
    "neutrophils": (("26511-6", "Neutrophils/100 leukocytes in Blood"), ("26499-4", "Neutrophils [#/volume] in Blood")),
    "lymphocytes": (("26478-8", "Lymphocytes/100 leukocytes in Blood"), ("26474-7", "Lymphocytes [#/volume] in Blood")),
    "monocytes": (("26485-3", "Monocytes/100 leukocytes in Blood"), ("26484-6", "Monocytes [#/volume] in Blood")),
    "eosinophils": (("26450-7", "Eosinophils/100 leukocytes in Blood"), ("26449-9", "Eosinophils [#/volume] in Blood")),
    "basophils": (("30180-4", "Basophils/100 leukocytes in Blood"), ("26444-0", "Basophils [#/volume] in Blood")),
    "blasts": (("26446-5", "Blasts/100 leukocytes in Blood"), ("30376-8", "Blasts [#/volume] in Blood")),
    "immature_granulocytes": (
        ("38518-7", "Immature granulocytes/100 leukocytes in Blood"),
        ("51584-1", "Immature granulocytes [#/volume] in Blood"),
    ),
    "nrbc": (("19048-8", "Nucleated erythrocytes/100 leukocytes [Ratio] in Blood"), None),
}
PERCENT = {"unit": "%", "system": UCUM, "code": "%"}
PER_100_WBC = {"unit": "/100 WBC", "system": UCUM, "code": "/100{WBCs}"}
ABSOLUTE = {"unit": "10^9/L", "system": UCUM, "code": "10*9/L"}


def uid5(*parts: str) -> str:
    """A stable ``urn:uuid:`` from ``parts`` (the same inputs give the same identifier on every run)."""
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, '/'.join(parts))}"


def _coding(code: str, display: str, system: str = LOINC_SYSTEM) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _interpretation(flag: str, code: str) -> list[dict[str, Any]]:
    names = {"H": "High", "L": "Low", "A": "Abnormal"}
    return [{"coding": [{"system": INTERPRETATION, "code": code, "display": names[code]}], "text": flag}]


def _flags_by_group(flags: Sequence[str], groups: ClassGroups) -> dict[str, tuple[str, str]]:
    """Group key -> (interpretation code, flag text), read off the counter's own flag sentences."""
    out: dict[str, tuple[str, str]] = {}
    for f in flags:
        if f.startswith("BLASTS"):
            out["blasts"] = ("A", f)
        elif f.startswith("Immature granulocytes"):
            out["immature_granulocytes"] = ("A", f)
        elif f.startswith("Nucleated RBCs"):
            out["nrbc"] = ("A", f)
        elif f.startswith("Review:"):
            out[REVIEW] = ("A", f)
        else:
            for key in REFERENCE_RANGES:
                label = groups.labels.get(key, key)
                if f.startswith(f"{label} high"):
                    out[key] = ("H", f)
                elif f.startswith(f"{label} low"):
                    out[key] = ("L", f)
    return out


def build_bundle(
    v: Verified,
    wbc: float | None = None,
    preliminary: bool = False,
    subject: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The FHIR R4 transaction Bundle of a reviewed session (see the module docstring).

    Args:
        v: The session's review state.
        wbc: White-cell count in 10^9/L (from the analyser) for absolute counts; None: percentages only.
        preliminary: Allow an unsigned session (status ``preliminary``).
        subject: ``Patient/123`` or another reference to put as the subject.
        now: Time of issue for a preliminary report (default: now).

    Raises:
        UsageError: unsigned without ``preliminary``, or a bad ``wbc``.
    """
    import time

    if v.signed is None and not preliminary:
        raise UsageError(
            f"session {v.log.root} is not signed off: review and sign it (hemaedge review), or send it as --preliminary"
        )
    if wbc is not None and not 0.0 < wbc < 1000.0:
        raise UsageError("--wbc is the white-cell count in 10^9/L (e.g. 7.2); it must lie between 0 and 1000")
    summary = v.summary()
    d = summary["differential"]
    s = v.settings
    final = v.signed is not None and not preliminary
    status = "final" if final else "preliminary"
    session_id = f"urn:uuid:{v.log.uid}" if final else uid5(v.log.uid, "preliminary")
    issued = iso(v.signoffs[-1].t if final else (now if now is not None else time.time()))
    effective = iso(float(v.log.meta().get("created", 0.0)) or None)
    groups = ClassGroups.build(v.classes, s.get("class_groups"))
    flagged = _flags_by_group(d["flags"], groups)
    pre = summary["verification"]["pre_classified_by"]

    station_url = uid5("station", str(pre["station"]))
    model_url = uid5("bundle", str(s.get("bundle_sha256")))
    performers = [{"display": so.reviewer} for so in v.signoffs] if final else []
    subject_ref = {"reference": subject} if subject else None

    entries: list[dict[str, Any]] = []

    def add(resource: dict[str, Any], full_url: str) -> None:
        rtype = resource["resourceType"]
        entries.append(
            {
                "fullUrl": full_url,
                "resource": resource,
                "request": {"method": "POST", "url": rtype, "ifNoneExist": f"identifier={URI_SYSTEM}|{full_url}"},
            }
        )

    add(
        {
            "resourceType": "Device",
            "identifier": [{"system": URI_SYSTEM, "value": station_url}],
            "deviceName": [{"name": str(pre["station"]), "type": "user-friendly-name"}],
            "type": {"text": "hemaedge microscope station (white-cell differential)"},
            "version": [{"value": __version__}],
        },
        station_url,
    )
    add(
        {
            "resourceType": "Device",
            "identifier": [
                {"system": URI_SYSTEM, "value": model_url},
                {"system": "urn:hemaedge:bundle-manifest-sha256", "value": str(s.get("bundle_sha256"))},
            ],
            "deviceName": [{"name": str(s.get("bundle_name")), "type": "model-name"}],
            "type": {"text": "CNN white-cell classifier (hemaedge model bundle)"},
            "version": [
                {"type": {"text": "manifest sha256"}, "value": str(s.get("bundle_sha256"))},
                {"type": {"text": "precision"}, "value": str(s.get("precision"))},
            ],
            "parent": {"reference": station_url},
        },
        model_url,
    )

    method = {
        "text": "Digital morphology: cells found and pre-classified by a CNN (hemaedge), "
        + ("verified and reclassified by a technologist" if final else "not yet verified by a technologist")
    }
    total = int(d["total_wbc"])
    results: list[str] = []

    def observation(key: str, code: dict[str, Any], value: float, unit: dict[str, str], **extra: Any) -> str:
        url = uid5(v.log.uid, status, key)
        res: dict[str, Any] = {
            "resourceType": "Observation",
            "identifier": [{"system": URI_SYSTEM, "value": url}],
            "status": status,
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                            "display": "Laboratory",
                        }
                    ]
                }
            ],
            "code": code,
            "effectiveDateTime": effective,
            "issued": issued,
            "valueQuantity": {"value": round(float(value), 2), **unit},
            "method": method,
            "device": {"reference": model_url},
        }
        if subject_ref:
            res["subject"] = subject_ref
        if performers:
            res["performer"] = performers
        res.update({k: v_ for k, v_ in extra.items() if v_})
        add(res, url)
        results.append(url)
        return url

    def code_of(names: Sequence[str], group: str | None, percent: bool, text: str) -> dict[str, Any]:
        coding = []
        if group in LOINC and (len(names) != 1 or len(groups.groups.get(group, ())) == 1):
            term = LOINC[group][0] if percent else LOINC[group][1]
            if term is not None:
                coding.append(_coding(*term))
        if len(names) == 1:
            coding.append(_coding(names[0], names[0], LOCAL_SYSTEM))
        return {"coding": coding, "text": text}

    percent_url: dict[str, str] = {}
    rows = {r["class"]: r for r in d["classes"]}
    for r in d["classes"]:
        name = r["class"]
        group = None if name == REVIEW else groups.group_of(name)
        if name == REVIEW:
            if not r["count"]:
                continue  # signed sessions have none; a preliminary one says how many are unsure
            code = {"coding": [_coding(REVIEW, "unidentified (review)", LOCAL_SYSTEM)], "text": "Unidentified cells"}
        else:
            code = code_of([name], group, True, f"{name} / 100 white cells")
        interp = flagged.get(group or name)
        if r["in_differential"]:
            lo, hi = r["ci95"]
            rr = REFERENCE_RANGES.get(group or "") if len(groups.groups.get(group or "", ())) == 1 else None
            percent_url[name] = observation(
                f"pct/{name}",
                code,
                r["percent"],
                PERCENT,
                note=[{"text": f"{r['count']} of {total} white cells; 95% CI {lo:.1f}-{hi:.1f} % (Wilson)"}],
                referenceRange=[_range(rr)] if rr else None,
                interpretation=_interpretation(interp[1], interp[0]) if interp else None,
            )
        elif r.get("estimated", True):  # a class the session did not estimate (platelets) is not reported
            observation(
                f"per100/{name}",
                code,
                r["per_100_wbc"],
                PER_100_WBC,
                note=[{"text": f"{r['count']} seen while counting {total} white cells"}],
                interpretation=_interpretation(interp[1], interp[0]) if interp else None,
            )
    # groups with several classes: one LOINC-coded Observation for their sum
    for key, members in groups.groups.items():
        if len(members) < 2 or key not in LOINC:
            continue
        k = sum(rows[m]["count"] for m in members if m in rows)
        in_diff = all(rows[m]["in_differential"] for m in members if m in rows)
        value = 100.0 * k / total if total else 0.0
        interp = flagged.get(key)
        percent_url[key] = observation(
            f"group/{key}",
            code_of(members, key, True, f"{groups.labels.get(key, key)} / 100 white cells"),
            value,
            PERCENT if in_diff else PER_100_WBC,
            note=[{"text": f"{k} of {total} white cells ({', '.join(members)})"}],
            interpretation=_interpretation(interp[1], interp[0]) if interp else None,
        )
    if wbc is not None:
        for name, url in list(percent_url.items()):
            group = name if name in groups.groups else groups.group_of(name)
            members = groups.groups.get(group or "", ())
            if group not in LOINC or LOINC[group][1] is None or (name != group and len(members) != 1):
                continue
            pct = rows[name]["percent"] if name in rows else 100.0 * sum(rows[m]["count"] for m in members) / total
            observation(
                f"abs/{name}",
                code_of([name] if name in rows else members, group, False, f"{name} absolute count"),
                pct / 100.0 * wbc,
                ABSOLUTE,
                note=[{"text": f"{pct:.2f} % of the white-cell count {wbc:g} x 10^9/L given with --wbc"}],
                derivedFrom=[{"reference": url}],
            )

    conclusion = _conclusion(summary, d["flags"], final)
    report_url = session_id
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": URI_SYSTEM, "value": session_id}],
        "status": status,
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "HM", "display": "Hematology"}
                ]
            }
        ],
        "code": {"coding": [_coding(*PANEL)], "text": "White-cell differential (digital morphology)"},
        "effectiveDateTime": effective,
        "issued": issued,
        "result": [{"reference": u} for u in results],
        "conclusion": conclusion,
    }
    if subject_ref:
        report["subject"] = subject_ref
    if performers:
        report["performer"] = performers
    add(report, report_url)
    return {
        "resourceType": "Bundle",
        "identifier": {"system": URI_SYSTEM, "value": uid5(v.log.uid, status, "bundle")},
        "type": "transaction",
        "timestamp": issued,
        "entry": entries,
    }


def _range(rr: tuple[float, float]) -> dict[str, Any]:
    return {
        "low": {"value": rr[0], **PERCENT},
        "high": {"value": rr[1], **PERCENT},
        "text": "adult reference range",
    }


def _conclusion(summary: Mapping[str, Any], flags: Sequence[str], final: bool) -> str:
    from hemaedge.edge.display.report import _triage_text

    parts = []
    if summary.get("triage"):
        parts.append(f"Triage: {_triage_text(summary['triage'])}.")
    parts.append(("Flags: " + "; ".join(flags) + ".") if flags else "No flags.")
    ver = summary["verification"]
    pre = ver["pre_classified_by"]
    who = ", ".join(s["reviewer"] for s in ver["signoffs"]) if final else ""
    parts.append(
        f"Pre-classified by bundle {pre['bundle']} (manifest sha256 {pre['manifest_sha256']}) on station "
        f"{pre['station']}; "
        + (
            f"verified by {who}; {len(ver['changed_cells'])} of {ver['cells']} cells reclassified."
            if final
            else "NOT VERIFIED by a technologist (preliminary)."
        )
    )
    return " ".join(parts)


def write_bundle(bundle: Mapping[str, Any], path: str | Path) -> Path:
    """Write the Bundle as JSON (``application/fhir+json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(bundle, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
