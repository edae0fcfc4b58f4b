"""The verified differential: the session recounted from the review's classes, with the same counting code.

A cell's verified class is its latest reclassification, or the model's bucket
when nobody changed it (sign-off confirms those). Cells moved to ``artefact``
are not white cells: they stay on record but are not counted. The recount goes
through :func:`hemaedge.edge.display.report.build_summary` (the counter, the
Wilson intervals, the clinical groups and the flags of ``edge/count/``) on the
stored cells with their verified class put in place of the model's, so the
verified differential cannot drift from the model's one by a second implementation.

The summary gains a ``verification`` section (status, who pre-classified with
which bundle on which station, the sign-offs, every audit row, the cells whose
class changed) and keeps the model's own differential as ``model_differential``.

Triage: the slide-level call (acute / chronic / none / insufficient) comes with the recount: ``build_summary``
runs :func:`hemaedge.edge.count.triage.session_triage` on the cells it is given, here the verified ones, under the
rules the session was counted with, so a reclassified blast changes the call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hemaedge.edge.count import REVIEW
from hemaedge.edge.display.report import (
    CELLS_CSV,
    REPORT,
    SUMMARY,
    _atomic_text,
    build_summary,
    render_html,
    write_cells_csv,
)
from hemaedge.edge.store import StoredCell
from hemaedge.edge.store.review import ARTEFACT, ReviewLog, SignOff, model_bucket

# keys build_summary writes itself; everything else an existing summary.json holds is carried over
_OWN_KEYS = frozenset(
    {"session", "written", "epoch", "bundle", "precision", "differential", "verification", "model_differential"}
)


def station_name(settings: Mapping[str, Any] | None = None) -> str:
    """The station's name: the session's ``station`` setting when it has one, else this machine's host name."""
    name = (settings or {}).get("station")
    return str(name) if name else socket.gethostname()


def iso(t: float | None) -> str:
    """A timestamp as local ISO 8601 with its UTC offset (``2026-11-26T10:15:00+01:00``)."""
    if t is None:
        return ""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(float(t), timezone.utc).astimezone().isoformat(timespec="seconds")


def as_verified(cell: StoredCell, verified: str, classes: Sequence[str]) -> StoredCell | None:
    """The cell with its verified class in place of the model's; None for an artefact (not counted)."""
    if verified == ARTEFACT:
        return None
    if verified == REVIEW:
        return dataclasses.replace(cell, review=True)
    return dataclasses.replace(cell, class_index=list(classes).index(verified), class_name=verified, review=False)


def read_base_summary(root: Path) -> dict[str, Any]:
    """The count's ``summary.json`` (what the station wrote at the end), or ``{}`` when absent or unreadable."""
    try:
        data = json.loads((Path(root) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Verified:
    """A session's review state at one moment: cells, verified classes, audit rows, sign-offs, summary."""

    def __init__(self, log: ReviewLog, base: Mapping[str, Any] | None = None):
        self.log = log
        self.settings = log.settings()
        self.classes = list(self.settings["classes"])
        self.cells = log.cells()
        self.changes = log.changes()
        self.signoffs = log.signoffs()
        self.last_change = self.changes[-1].id if self.changes else 0
        self.classes_of = {c.id: model_bucket(c) for c in self.cells}
        for ch in self.changes:
            if ch.cell_id in self.classes_of:
                self.classes_of[ch.cell_id] = ch.new_class
        self.base = dict(base) if base is not None else read_base_summary(log.root)
        self.counted = [
            v for v in (as_verified(c, self.classes_of[c.id], self.classes) for c in self.cells) if v is not None
        ]

    @property
    def signed(self) -> SignOff | None:
        """The first sign-off, when signed."""
        return self.signoffs[0] if self.signoffs else None

    @property
    def in_review(self) -> list[int]:
        """Cells still in the review bucket (sign-off waits for them)."""
        return [cid for cid, v in self.classes_of.items() if v == REVIEW]

    def changed_cells(self) -> list[dict[str, Any]]:
        """Cells whose verified class differs from the model's call, with who made the last change and when."""
        last: dict[int, Any] = {}
        for ch in self.changes:
            last[ch.cell_id] = ch
        out = []
        for c in self.cells:
            v = self.classes_of[c.id]
            if v != model_bucket(c):
                ch = last[c.id]
                out.append(
                    {
                        "cell": c.id,
                        "model": model_bucket(c),
                        "model_top_class": c.class_name,
                        "confidence": round(c.confidence, 4),
                        "verified": v,
                        "by": ch.reviewer,
                        "time": ch.t,
                        "iso": iso(ch.t),
                    }
                )
        return out

    def status(self) -> str:
        """``signed``, ``in review`` (changes, no signature yet) or ``unverified``."""
        if self.signed is not None:
            return "signed"
        return "in review" if self.changes else "unverified"

    def summary(self) -> dict[str, Any]:
        """The verified summary (see the module docstring)."""
        info = {k: v for k, v in self.base.items() if k not in _OWN_KEYS}
        model = build_summary(self.log.store, None, self.cells)[0]["differential"]
        summary, _, _ = build_summary(self.log.store, info, self.counted)
        s = self.settings
        station = station_name(s) if self.signed is None else self.signed.station
        summary["verification"] = {
            "status": self.status(),
            "session_uid": self.log.uid,
            "pre_classified_by": {
                "bundle": s.get("bundle_name"),
                "manifest_sha256": s.get("bundle_sha256"),
                "station": station,
                "precision": s.get("precision"),
            },
            "signoffs": [{**so.to_dict(), "iso": iso(so.t)} for so in self.signoffs],
            "cells": len(self.cells),
            "counted": len(self.counted),
            "in_review": len(self.in_review),
            "artefacts": sorted(cid for cid, v in self.classes_of.items() if v == ARTEFACT),
            "changed_cells": self.changed_cells(),
            "changes": [{**ch.to_dict(), "iso": iso(ch.t)} for ch in self.changes],
            "last_change": self.last_change,
            "rule": "a cell's verified class is its latest change, else the model's call (confirmed by the "
            "sign-off); artefacts are not counted",
        }
        summary["model_differential"] = model
        return summary


def write_verified_reports(log: ReviewLog, out: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``summary.json``, ``cells.csv`` and ``report.html`` from the review's state (default: the session).

    The count's own summary keys (frames, backend, note...) are kept; ``cells.csv``
    gains the ``verified_class`` column; the report says whether it is signed.
    """
    out = Path(out) if out is not None else log.root
    out.mkdir(parents=True, exist_ok=True)
    v = Verified(log)
    summary = v.summary()
    paths = {"summary": out / SUMMARY, "cells": out / CELLS_CSV, "report": out / REPORT}
    _atomic_text(paths["summary"], json.dumps(summary, indent=2) + "\n")
    write_cells_csv(paths["cells"], v.cells, v.classes, verified=v.classes_of)
    _atomic_text(paths["report"], render_html(summary, v.cells, log.root))
    return paths


def clock(t: float) -> str:
    """Local wall-clock time for people."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(t)))
