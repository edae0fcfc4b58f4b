"""End-of-session reports: ``summary.json`` (machines), ``cells.csv`` (spreadsheets), ``report.html`` (people).

Everything is computed from the cells committed to the session store, so a
report written after a crash and ``--resume`` says exactly what the store holds.
``report.html`` is one self-contained file (inline CSS, crops embedded as
base64 PNG, no script) that can be mailed or archived: the differential table with 95 %
intervals and adult reference ranges, the flags, and a gallery of every cell
per class (review first) for a person to check. It fits a phone (viewport, no
sideways scrolling; a tap enlarges a cell and shows its probabilities and source
frame, with CSS alone) and prints on A4 (``static/hemaedge.css``, shared with the
review page).

Until a person has reviewed the session the report says it is *unverified*.
After ``hemaedge review`` the summary carries a ``verification`` section and the
report says who pre-classified it with which bundle on which station, who verified
it when, the cells they changed, and the differential, flags and triage recounted
from the verified classes (``hemaedge.edge.review.verified``).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hemaedge.edge.bundle.vocabulary import display_name
from hemaedge.edge.count import REFERENCE_RANGES, REVIEW, DifferentialCounter
from hemaedge.edge.count.triage import session_triage
from hemaedge.edge.records import CountSnapshot
from hemaedge.edge.store import SessionStore, StoredCell

SUMMARY = "summary.json"
CELLS_CSV = "cells.csv"
REPORT = "report.html"
GALLERY_LIMIT = 400  # crops embedded per class; the rest are listed in cells.csv
GALLERY_PX = 160  # embedded crops are at most this many pixels on a side


def recount(
    cells: Sequence[StoredCell],
    classes: Sequence[str],
    target: int,
    review_threshold: float,
    class_groups: Mapping[str, Sequence[str]] | None = None,
) -> DifferentialCounter:
    """A counter holding exactly the stored cells (the review decision is the one stored with each cell)."""
    counter = DifferentialCounter(classes, target, review_threshold, class_groups)
    for c in cells:
        counter.add(c.class_index, c.review)
    return counter


def snapshot_dict(
    snap: CountSnapshot, counter: DifferentialCounter, not_estimated: Sequence[str] = ()
) -> dict[str, Any]:
    """JSON-ready differential: per class count, percent, interval, group and reference range.

    Classes in ``not_estimated`` (platelets, unless the session estimated them) carry ``"estimated": false`` and no
    per-100-WBC figure: a number there would mislead.
    """
    rows = []
    for c, diff in zip(counter.classes, counter.groups.differential):
        group = counter.groups.group_of(c)
        row: dict[str, Any] = {
            "class": c,
            "label": display_name(c),
            "count": snap.counts.get(c, 0),
            "group": group,
            "in_differential": diff,
        }
        if c in not_estimated:
            row.update(estimated=False, per_100_wbc=None)
        elif diff:
            lo, hi = snap.intervals[c]
            row.update(percent=round(snap.percentages[c], 2), ci95=[round(lo, 2), round(hi, 2)])
        else:
            row["per_100_wbc"] = round(100.0 * snap.counts.get(c, 0) / snap.total, 2) if snap.total else 0.0
        rows.append(row)
    lo, hi = snap.intervals[REVIEW]
    rows.append(
        {
            "class": REVIEW,
            "label": REVIEW,
            "count": snap.review,
            "group": None,
            "in_differential": True,
            "percent": round(snap.percentages[REVIEW], 2),
            "ci95": [round(lo, 2), round(hi, 2)],
        }
    )
    return {
        "total_wbc": snap.total,
        "target": snap.target,
        "complete": snap.total >= snap.target,
        "review_threshold": counter.review_threshold,
        "classes": rows,
        "groups": {
            k: {
                "label": counter.groups.labels.get(k, k),
                "count": v,
                "reference_range_percent": list(REFERENCE_RANGES[k]) if k in REFERENCE_RANGES else None,
            }
            for k, v in snap.group_counts.items()
        },
        "flags": list(snap.flags),
        "notes": "Percentages are of the white cells counted (review bucket included); 95% Wilson score intervals. "
        "Reference-range flags are raised only when the whole interval lies outside the adult range.",
    }


def build_summary(
    store: SessionStore, info: Mapping[str, Any] | None = None, cells: Sequence[StoredCell] | None = None
) -> tuple[dict[str, Any], list[StoredCell], DifferentialCounter]:
    """The summary of a session from its store: ``(summary dict, cells, counter)``."""
    s = store.settings
    cells = list(store.read_cells() if cells is None else cells)
    counter = recount(cells, s["classes"], int(s["target"]), float(s["review_threshold"]), s.get("class_groups"))
    snap = counter.snapshot()
    not_estimated = (info or {}).get("not_estimated")
    if not_estimated is None:  # sessions before --platelets estimated platelets whenever the bundle had the class
        not_estimated = [] if s.get("platelets", True) else counter.groups.groups.get("platelets", [])
    summary = {
        "session": str(store.root),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "epoch": store.epoch,
        "bundle": {
            "name": s.get("bundle_name"),
            "path": s.get("bundle"),
            "manifest_sha256": s.get("bundle_sha256"),
            "notice": s.get("bundle_notice") or "",
        },
        "precision": s.get("precision"),
        "backend": (info or {}).get("backend", s.get("backend")),
        "source": (info or {}).get("source", s.get("source")),
        **{k: v for k, v in (info or {}).items() if k not in ("backend", "source")},
        "differential": snapshot_dict(snap, counter, not_estimated),
    }
    t = session_triage(cells, s)
    summary["triage"] = t.to_dict() if t is not None else None
    if t is None:
        summary["triage_note"] = (
            f"bundle {s.get('bundle_name')!r} has no triage rules (it has no blast class): no slide-level call"
        )
    return summary, cells, counter


def write_cells_csv(
    path: Path, cells: Sequence[StoredCell], classes: Sequence[str], verified: Mapping[int, str] | None = None
) -> Path:
    """One row per counted cell, with every class probability (and its reviewed class when ``verified`` is given)."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "id",
                "time",
                "source",
                "frame",
                "frame_name",
                "x0",
                "y0",
                "x1",
                "y1",
                "field",
                "slide_x",
                "slide_y",
                "class",
                "top_class",
                "confidence",
                "review",
                *[f"p_{c}" for c in classes],
                "crop",
                *(["verified_class"] if verified is not None else []),
            ]
        )
        for c in cells:
            w.writerow(
                [
                    c.id,
                    f"{c.t:.3f}",
                    c.source,
                    c.frame_index,
                    c.frame_name,
                    *(f"{v:.1f}" for v in c.box),
                    c.field,
                    f"{c.sx:.1f}",
                    f"{c.sy:.1f}",
                    REVIEW if c.review else c.class_name,
                    c.class_name,
                    f"{c.confidence:.4f}",
                    int(c.review),
                    *(f"{p:.4f}" for p in c.probabilities),
                    c.crop,
                    *([verified.get(c.id, "")] if verified is not None else []),
                ]
            )
    os.replace(tmp, path)
    return path


STATIC = Path(__file__).parent / "static"


def stylesheet() -> str:
    """The stylesheet shared by the report (inlined) and the review page (served)."""
    return (STATIC / "hemaedge.css").read_text(encoding="utf-8")


def _img(path: Path, max_side: int = GALLERY_PX) -> str:
    """The crop as a data URI; crops larger than ``max_side`` are downscaled (keeps the report mailable)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is not None and max(img.shape[:2]) > max_side:
        f = max_side / max(img.shape[:2])
        img = cv2.resize(
            img, (max(1, round(img.shape[1] * f)), max(1, round(img.shape[0] * f))), interpolation=cv2.INTER_AREA
        )
        ok, buf = cv2.imencode(".png", img)
        if ok:
            data = buf.tobytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def render_html(summary: Mapping[str, Any], cells: Sequence[StoredCell], root: Path) -> str:
    """The self-contained HTML report (signed, in review or unverified, as ``summary["verification"]`` says)."""
    e = html.escape
    d = summary["differential"]
    ver = summary.get("verification") or {}
    status = ver.get("status", "unverified")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>hemaedge differential{' (unverified)' if status != 'signed' else ''}</title>"
        f"<style>{stylesheet()}</style></head><body>"
    ]
    parts.append("<h1>White-cell differential</h1>")
    meta = [
        f"session {e(str(summary.get('session', '')))}",
        f"model {e(str(summary['bundle'].get('name')))}"
        + (f" ({int(summary['views'])} views per cell)" if (summary.get("views") or 1) > 1 else ""),
        f"{e(str(summary.get('backend', '')))} {e(str(summary.get('precision', '')))}",
        f"source {e(str(summary.get('source', '')))}",
        f"written {e(str(summary.get('written', '')))}",
    ]
    if (summary.get("scale") or {}).get("describe"):
        meta.insert(3, f"scale {e(str(summary['scale']['describe']))}")
    check = summary.get("detector_check") or {}
    if check.get("decision") == "both":
        meta.insert(3, f"white cells: {e(str(check['describe']))}")
    stain = summary.get("stain") or {}
    if stain.get("strength") is not None:
        meta.insert(
            3,
            f"stain strength {stain['strength']:.2f} (x{stain['gain']:.2f} to the model's "
            f"{stain['reference']:.2f}, from {stain['cells_measured']} cells"
            + (
                f"; its two stains {stain['stain_angles_deg'][0]:.0f}&deg; and {stain['stain_angles_deg'][1]:.0f}&deg;"
                " from the model's, mapped onto them)"
                if stain.get("stain_angles_deg")
                else ")"
            ),
        )
    parts.append(f"<div class=meta>{' &middot; '.join(meta)}</div>")
    if (summary.get("stain") or {}).get("warning"):
        parts.append(f"<p class=warn>{e(str(summary['stain']['warning']))}</p>")
    if summary["bundle"].get("notice"):
        parts.append(f"<p class=notice>Model terms: {e(summary['bundle']['notice'])}</p>")
    parts.append(_verification_banner(summary, ver, status))
    if summary.get("note"):
        parts.append(f"<p class=warn>{e(str(summary['note']))}</p>")
    if not d["complete"]:
        parts.append(
            f"<p class=warn>Target not reached: {d['total_wbc']} of {d['target']} white cells counted. "
            "Intervals are wide; interpret with care.</p>"
        )
    parts += _inputs_html(summary.get("inputs") or {})
    model_pct = _model_percent(summary) if status != "unverified" else {}
    what = "Verified differential" if status == "signed" else "Differential"
    parts.append(f"<h2>{what} ({d['total_wbc']} white cells, target {d['target']})</h2>")
    parts.append(
        "<table><tr><th>class</th><th>n</th><th>%</th><th>95% CI</th><th>adult range</th>"
        + ("<th class=wide>model %</th>" if model_pct else "")
        + "<th class=wide></th></tr>"
    )
    groups = summary["differential"]["groups"]
    for row in d["classes"]:
        cls = "review" if row["class"] == REVIEW else ("" if row["in_differential"] else "other")
        rr = groups.get(row["group"] or "", {}).get("reference_range_percent") if row["group"] else None
        model = f"<td class=wide>{model_pct[row['class']]}</td>" if model_pct else ""
        if row["in_differential"]:
            lo, hi = row["ci95"]
            out = rr is not None and (lo > rr[1] or hi < rr[0]) and len(_members(d, row["group"])) == 1
            pct = f"<span class={'out' if out else ''}>{row['percent']:.1f}</span>"
            bar = f"<span class=bar style='width:{row['percent'] * 2:.0f}px'></span>"
            parts.append(
                f"<tr class='{cls}'><td>{e(_label(row['class']))}</td><td>{row['count']}</td><td>{pct}</td>"
                f"<td>{lo:.1f}&ndash;{hi:.1f}</td><td>{f'{rr[0]:g}&ndash;{rr[1]:g} %' if rr else ''}</td>"
                f"{model}<td class=wide>{bar}</td></tr>"
            )
        elif row.get("estimated", True):
            parts.append(
                f"<tr class=other><td>{e(_label(row['class']))}</td><td>{row['count']}</td>"
                f"<td colspan=3>{row['per_100_wbc']:.1f} per 100 WBC (not in the differential)</td>"
                f"{model}<td class=wide></td></tr>"
            )
        else:
            parts.append(
                f"<tr class=other><td>{e(_label(row['class']))}</td><td>-</td>"
                "<td colspan=3>not estimated (hemaedge count --platelets estimates it roughly)</td>"
                f"{model}<td class=wide></td></tr>"
            )
    parts.append("</table>")
    parts.append(
        f"<p class=meta>{e(d['notes'])} Cells whose top probability is below "
        f"{d['review_threshold']:.2f} are in <b>review</b> rather than forced into a class.</p>"
    )
    parts.append("<h2>Flags</h2>")
    if d["total_wbc"] == 0:
        parts.append("<p class=warn>No white cells were counted, so nothing could be flagged.</p>")
    elif d["flags"]:
        parts.append(
            "<ul class=flags>"
            + "".join(f"<li class='{'flag-blast' if f.startswith('BLAST') else ''}'>{e(f)}</li>" for f in d["flags"])
            + "</ul>"
        )
    else:
        parts.append("<p class=none>No flags.</p>")
    parts += _triage_html(summary.get("triage"), cells, root)
    changed = {int(c["cell"]): c for c in ver.get("changed_cells", [])}
    if status != "unverified":
        parts.append(_changes_table(ver, changed))
    parts.append(
        "<h2>Cells</h2><p class=meta>Every counted cell as the classifier saw it, grouped by the class it "
        + ("was verified as" if changed else "was counted as")
        + " (review first). Tap or click a cell to enlarge it and see its probabilities and source frame.</p>"
    )
    classes = [r["class"] for r in d["classes"] if r["class"] != REVIEW]
    by: dict[str, list[StoredCell]] = {}
    for c in cells:
        bucket = changed[c.id]["verified"] if c.id in changed else (REVIEW if c.review else c.class_name)
        by.setdefault(bucket, []).append(c)
    order = [REVIEW, *classes, *sorted(k for k in by if k != REVIEW and k not in classes)]
    for name in order:
        group = by.get(name, [])
        if not group:
            continue
        title = f"{name} (not white cells, not counted)" if name == "artefact" else _label(name)
        parts.append(f"<h3>{e(title)} ({len(group)})</h3><div class=gallery>")
        for c in group[:GALLERY_LIMIT]:
            parts.append(_figure(c, changed.get(c.id), classes, root))
        if len(group) > GALLERY_LIMIT:
            parts.append(f"<p class=meta>+{len(group) - GALLERY_LIMIT} more in cells.csv</p>")
        parts.append("</div>")
    parts.append(
        "<p class=meta>Generated by hemaedge. A screening aid: abnormal results must be confirmed by "
        "a qualified person on the smear.</p></body></html>"
    )
    return "\n".join(parts)


def _triage_html(t: Mapping[str, Any] | None, cells: Sequence[StoredCell], root: Path) -> list[str]:
    """The slide-level call, what it rests on, and the cells behind it."""
    if not t:
        return []
    e = html.escape
    ev = t["evidence"]
    css = "flag-blast" if t["call"] in ("acute", "chronic") else ""
    out = [
        "<h2>Slide triage</h2>",
        f"<p class='{css}'>Call: <b>{e(t['call'].upper())}</b></p>",
        f"<p class=meta>{e(t['rule'])}. {ev['evidence_cells']} blast-like cells ({', '.join(map(e, ev['evidence_classes']))}) "
        f"in {ev['white_cells']} white cells; a normal smear shows about {ev['expected_on_a_normal_smear']} "
        f"(p = {ev['p_value']}). Blasts {ev['blast_percent']} %."
        + (f" Chronic patterns: {', '.join(map(e, ev['chronic_patterns']))}." if ev["chronic_patterns"] else "")
        + (f" APL probability {t['apl_probability']:.2f}." if t.get("apl_probability") is not None else "")
        + " A screening aid for who needs an expert, not a diagnosis.</p>",
    ]
    behind = [c for c in cells if c.id in set(t.get("cells") or [])]
    if behind:
        out.append("<div class=gallery>")
        for c in behind[:GALLERY_LIMIT]:
            out.append(
                f"<figure><img alt='cell {c.id}' src='{_img(root / c.crop)}'>"
                f"<figcaption>#{c.id} {e(display_name(c.class_name))} {c.confidence:.2f}</figcaption></figure>"
            )
        out.append("</div>")
    return out


def _label(name: str) -> str:
    """A class's display name (the review bucket keeps its own)."""
    return name if name == REVIEW else display_name(name)


def _inputs_html(inputs: Mapping[str, Any]) -> list[str]:
    """Every input the session could not use, named with its reason, and the images never read."""
    e = html.escape
    out = []
    if inputs.get("message"):
        out.append(f"<p class=warn>{e(inputs['message'])}.</p>")
    unusable = inputs.get("unusable") or []
    if unusable:
        rows = "".join(f"<tr><td>{e(u['name'])}</td><td>{e(u['detail'])}</td></tr>" for u in unusable[:500])
        more = f"<p class=meta>+{len(unusable) - 500} more in summary.json</p>" if len(unusable) > 500 else ""
        out.append(
            f"<h2>Inputs not used ({len(unusable)})</h2><table><tr><th>image</th><th>why</th></tr>{rows}</table>{more}"
        )
    return out


def _verification_banner(summary: Mapping[str, Any], ver: Mapping[str, Any], status: str) -> str:
    """Who pre-classified it with what, and who verified it when; or that nobody has."""
    e = html.escape
    pre = ver.get("pre_classified_by") or {}
    bundle = pre.get("bundle") or summary.get("bundle", {}).get("name")
    sha = pre.get("manifest_sha256") or summary.get("bundle", {}).get("manifest_sha256") or ""
    station = pre.get("station")
    by = f"Pre-classified by bundle <b>{e(str(bundle))}</b> (manifest sha256 <code>{e(str(sha)[:16])}&hellip;</code>)"
    by += f" on station <b>{e(str(station))}</b>" if station else ""
    signs = ver.get("signoffs") or []
    if status == "signed" and signs:
        first = signs[0]
        text = f"{by}, verified by <b>{e(first['reviewer'])}</b> at {e(first.get('iso') or '')}"
        for extra in signs[1:]:
            text += f"; second review by <b>{e(extra['reviewer'])}</b> at {e(extra.get('iso') or '')}"
        n = len(ver.get("changed_cells", []))
        text += f". {n} of {ver.get('cells', 0)} cell{'s' * (ver.get('cells', 0) != 1)} reclassified."
        return f"<p class=verified>{text}</p>"
    if status == "in review":
        n = len(ver.get("changed_cells", []))
        return (
            f"<p class=unverified><b>UNVERIFIED: review in progress, not signed off.</b> {by}; "
            f"{n} cell{'s' * (n != 1)} reclassified so far. Do not release these results.</p>"
        )
    return (
        f"<p class=unverified><b>UNVERIFIED: pre-classified by the model, not yet reviewed by a person.</b> "
        f"{by}. Review and sign off with <code>hemaedge review</code> before releasing results.</p>"
    )


def _model_percent(summary: Mapping[str, Any]) -> dict[str, str]:
    model = summary.get("model_differential")
    if not model:
        return {}
    out = {}
    for r in model["classes"]:
        if r.get("in_differential"):
            out[r["class"]] = f"{r['percent']:.1f}"
        else:
            out[r["class"]] = "-" if r.get("per_100_wbc") is None else f"{r['per_100_wbc']:.1f}/100"
    return out


def _triage_text(triage: Any) -> str:
    if isinstance(triage, Mapping):
        call = triage.get("call") or triage.get("triage") or triage.get("label") or ""
        rest = [str(triage[k]) for k in ("rule", "reason", "reasons", "why", "note") if triage.get(k)]
        return "; ".join([str(call), *rest]) if rest else str(call)
    return str(triage)


def _changes_table(ver: Mapping[str, Any], changed: Mapping[int, Mapping[str, Any]]) -> str:
    e = html.escape
    parts = [f"<h2>Cells changed in review ({len(changed)})</h2>"]
    if not changed:
        parts.append("<p class=meta>None: every cell keeps the model's call.</p>")
    else:
        parts.append(
            "<table><tr><th>cell</th><th class=l>model</th><th class=l>verified</th><th class=l>by, when</th></tr>"
        )
        for cid, c in sorted(changed.items()):
            parts.append(
                f"<tr><td>#{cid}</td><td class=l>{e(c['model'])}</td><td class=l><b>{e(c['verified'])}</b></td>"
                f"<td class=l>{e(c['by'])}, {e(c.get('iso', ''))}</td></tr>"
            )
        parts.append("</table>")
    n = len(ver.get("changes", []))
    parts.append(
        f"<p class=meta>{n} change{'s' * (n != 1)} on record in the session's audit trail (every change is kept, "
        "the model's call is never overwritten); cells not changed keep the model's call, confirmed by the sign-off.</p>"
    )
    return "".join(parts)


def _figure(c: StoredCell, change: Mapping[str, Any] | None, classes: Sequence[str], root: Path) -> str:
    """One cell: the crop; a tap (CSS only) enlarges it and shows the probabilities and the source frame."""
    e = html.escape
    probs = sorted(zip(classes, c.probabilities), key=lambda kv: -kv[1])
    plist = " &middot; ".join(f"{e(k)} {p:.2f}" for k, p in probs[:4] if p >= 0.005)
    where = e(f"frame {c.frame_name or c.frame_index}, box {', '.join(f'{v:.0f}' for v in c.box)}")
    model = f"model: {e(c.class_name)} {c.confidence:.2f}" + (" (unsure: review)" if c.review else "")
    was = f"<br><span class=was>was {e(change['model'])}; {e(change['by'])}</span>" if change else ""
    label = f"#{c.id}" + (f" {e(c.class_name)}?" if c.review and not change else f" {c.confidence:.2f}")
    if change:
        label = f"#{c.id} <span class=was>was {e(change['model'])}</span>"
    return (
        f"<figure class='{'changed' if change else ''}'><label><input class=zoom type=checkbox "
        f"aria-label='enlarge cell {c.id}'><img alt='cell {c.id}' src='{_img(root / c.crop)}'>"
        f"<span class=details>#{c.id} {model}<br>{plist}<br>{where}{was}</span></label>"
        f"<figcaption>{label}</figcaption></figure>"
    )


def _members(d: Mapping[str, Any], group: str | None) -> list[str]:
    return [r["class"] for r in d["classes"] if r.get("group") == group]


def write_reports(
    store: SessionStore,
    out: str | os.PathLike | None = None,
    info: Mapping[str, Any] | None = None,
    built: tuple[dict[str, Any], Sequence[StoredCell]] | None = None,
) -> dict[str, Path]:
    """Write ``summary.json``, ``cells.csv`` and ``report.html`` (default: into the session directory).

    Args:
        store: The session.
        out: Output directory (default: the session directory).
        info: Run facts for the summary (backend, frames, ...).
        built: ``(summary, cells)`` from :func:`build_summary`, when the caller has them already.

    Returns:
        ``{"summary": path, "cells": path, "report": path}``.
    """
    out = Path(out) if out is not None else store.root
    out.mkdir(parents=True, exist_ok=True)
    summary, cells = built if built is not None else build_summary(store, info)[:2]
    paths = {"summary": out / SUMMARY, "cells": out / CELLS_CSV, "report": out / REPORT}
    _atomic_text(paths["summary"], json.dumps(summary, indent=2) + "\n")
    write_cells_csv(paths["cells"], cells, store.settings["classes"])
    _atomic_text(paths["report"], render_html(summary, cells, store.root))
    return paths


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
