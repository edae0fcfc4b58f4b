"""End-of-session reports: ``summary.json`` (machines), ``cells.csv`` (spreadsheets), ``report.html`` (people).

Everything is computed from the cells committed to the session store, so a
report written after a crash and ``--resume`` says exactly what the store holds.
``report.html`` is one self-contained file (inline CSS, crops embedded as
base64 PNG) that can be mailed or archived: the differential table with 95 %
intervals and adult reference ranges, the flags, and a gallery of every cell
per class (review first) for a person to check.
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
        row: dict[str, Any] = {"class": c, "count": snap.counts.get(c, 0), "group": group, "in_differential": diff}
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
        "bundle": {"name": s.get("bundle_name"), "path": s.get("bundle"), "manifest_sha256": s.get("bundle_sha256")},
        "precision": s.get("precision"),
        "backend": (info or {}).get("backend", s.get("backend")),
        "source": (info or {}).get("source", s.get("source")),
        **{k: v for k, v in (info or {}).items() if k not in ("backend", "source")},
        "differential": snapshot_dict(snap, counter, not_estimated),
    }
    return summary, cells, counter


def write_cells_csv(path: Path, cells: Sequence[StoredCell], classes: Sequence[str]) -> Path:
    """One row per counted cell, with every class probability."""
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
                ]
            )
    os.replace(tmp, path)
    return path


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222;max-width:1200px}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9rem} table{border-collapse:collapse;margin-top:.5rem}
th,td{padding:.25rem .7rem;text-align:right;border-bottom:1px solid #eee} th:first-child,td:first-child{text-align:left}
tr.review td{color:#8a6d00} tr.other td{color:#777} .out{color:#b00020;font-weight:600}
.flags li{margin:.2rem 0} .flag-blast{color:#b00020;font-weight:700} .none{color:#2e7d32}
.gallery{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;text-align:center;font-size:.7rem;color:#555}
figure img{width:96px;height:96px;image-rendering:auto;border:1px solid #ccc;display:block}
.bar{display:inline-block;height:.7rem;background:#5c6bc0;vertical-align:middle}
.warn{background:#fff4e5;border-left:4px solid #ff9800;padding:.5rem 1rem}
"""


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
    """The self-contained HTML report."""
    e = html.escape
    d = summary["differential"]
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>hemaedge differential</title>"
        f"<style>{_CSS}</style></head><body>"
    ]
    parts.append("<h1>White-cell differential</h1>")
    meta = [
        f"session {e(str(summary.get('session', '')))}",
        f"model {e(str(summary['bundle'].get('name')))}",
        f"{e(str(summary.get('backend', '')))} {e(str(summary.get('precision', '')))}",
        f"source {e(str(summary.get('source', '')))}",
        f"written {e(str(summary.get('written', '')))}",
    ]
    if (summary.get("scale") or {}).get("describe"):
        meta.insert(3, f"scale {e(str(summary['scale']['describe']))}")
    parts.append(f"<div class=meta>{' &middot; '.join(meta)}</div>")
    if summary.get("note"):
        parts.append(f"<p class=warn>{e(str(summary['note']))}</p>")
    if not d["complete"]:
        parts.append(
            f"<p class=warn>Target not reached: {d['total_wbc']} of {d['target']} white cells counted. "
            "Intervals are wide; interpret with care.</p>"
        )
    parts += _inputs_html(summary.get("inputs") or {})
    parts.append(f"<h2>Differential ({d['total_wbc']} white cells, target {d['target']})</h2>")
    parts.append("<table><tr><th>class</th><th>n</th><th>%</th><th>95% CI</th><th>adult range</th><th></th></tr>")
    groups = summary["differential"]["groups"]
    for row in d["classes"]:
        cls = "review" if row["class"] == REVIEW else ("" if row["in_differential"] else "other")
        rr = groups.get(row["group"] or "", {}).get("reference_range_percent") if row["group"] else None
        if row["in_differential"]:
            lo, hi = row["ci95"]
            out = rr is not None and (lo > rr[1] or hi < rr[0]) and len(_members(d, row["group"])) == 1
            pct = f"<span class={'out' if out else ''}>{row['percent']:.1f}</span>"
            bar = f"<span class=bar style='width:{row['percent'] * 2:.0f}px'></span>"
            parts.append(
                f"<tr class='{cls}'><td>{e(_label(row['class']))}</td><td>{row['count']}</td><td>{pct}</td>"
                f"<td>{lo:.1f}&ndash;{hi:.1f}</td><td>{f'{rr[0]:g}&ndash;{rr[1]:g} %' if rr else ''}</td>"
                f"<td>{bar}</td></tr>"
            )
        elif row.get("estimated", True):
            parts.append(
                f"<tr class=other><td>{e(_label(row['class']))}</td><td>{row['count']}</td>"
                f"<td colspan=4>{row['per_100_wbc']:.1f} per 100 WBC (not in the differential)</td></tr>"
            )
        else:
            parts.append(
                f"<tr class=other><td>{e(_label(row['class']))}</td><td>-</td>"
                "<td colspan=4>not estimated (hemaedge count --platelets estimates it roughly)</td></tr>"
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
    parts.append(
        "<h2>Cells for review</h2><p class=meta>Every counted cell as the classifier saw it, grouped by "
        "the class it was counted as (review first). Hover for the probability and source frame.</p>"
    )
    by: dict[str, list[StoredCell]] = {}
    for c in cells:
        by.setdefault(REVIEW if c.review else c.class_name, []).append(c)
    order = [REVIEW] + [r["class"] for r in d["classes"] if r["class"] != REVIEW]
    for name in order:
        group = by.get(name, [])
        if not group:
            continue
        parts.append(f"<h3>{e(_label(name))} ({len(group)})</h3><div class=gallery>")
        for c in group[:GALLERY_LIMIT]:
            tip = e(f"#{c.id} {c.class_name} p={c.confidence:.2f} frame {c.frame_name or c.frame_index}")
            label = f"#{c.id}" + (f" {e(c.class_name)}?" if c.review else f" {c.confidence:.2f}")
            parts.append(
                f"<figure title='{tip}'><img alt='cell {c.id}' src='{_img(root / c.crop)}'>"
                f"<figcaption>{label}</figcaption></figure>"
            )
        if len(group) > GALLERY_LIMIT:
            parts.append(f"<p class=meta>+{len(group) - GALLERY_LIMIT} more in cells.csv</p>")
        parts.append("</div>")
    parts.append(
        "<p class=meta>Generated by hemaedge. A screening aid: abnormal results must be confirmed by "
        "a qualified person on the smear.</p></body></html>"
    )
    return "\n".join(parts)


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
