"""Verified cells as a class-per-folder image tree: what ``hemaedge adapt`` and ``export-model --calib`` read.

Layout::

    DIR/<class>/<session>-<uid8>-c<cell>.png   the crop the classifier saw, in the folder of its VERIFIED class
    DIR/export-cells.json                      where every file came from (see below)

Folder names are the bundle's class names exactly (the image-folder reader
matches them against the model's classes). Cells still in review and artefacts
are left out: they have no verified class. Only signed-off sessions are
exported unless ``allow_unsigned`` (the manifest then says which were not signed).

``export-cells.json`` names the sessions (uid, folder, bundle and its manifest
sha256, station, who signed when) and every cell (file, verified class, the
model's call, whether the review changed it, who verified it), so a bundle
adapted on these cells can name the sessions its cells came from
(:func:`sessions_of`). Exporting into a folder that already holds an export adds
to it (sessions exported again are replaced); the class lists must agree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hemaedge.edge.count import REVIEW
from hemaedge.edge.errors import InputError, StoreError, UsageError
from hemaedge.edge.review.verified import Verified, iso
from hemaedge.edge.store.review import ARTEFACT, ReviewLog, model_bucket

MANIFEST = "export-cells.json"
FORMAT = "hemaedge-export-cells/1"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "session"


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``export-cells.json`` of an export folder.

    Raises:
        InputError: there is none, or it is not an export's manifest.
    """
    path = Path(folder) / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is missing or unreadable: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"{path} is not a hemaedge export-cells manifest")
    return doc


def sessions_of(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The sessions whose verified cells an export folder holds (for an adapted bundle's manifest)."""
    return [
        {k: s.get(k) for k in ("uid", "name", "bundle", "station", "signed", "verified_by", "signed_at", "cells")}
        for s in read_manifest(folder)["sessions"]
    ]


def resolve_session(spec: str | os.PathLike, sessions_dir: str | os.PathLike = "sessions") -> Path:
    """A session folder from its path, or its name under ``sessions_dir``."""
    p = Path(spec)
    if not p.is_dir() and not p.is_absolute() and (Path(sessions_dir) / p).is_dir():
        p = Path(sessions_dir) / p
    return p


def export_cells(
    sessions: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    allow_unsigned: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the verified cells of ``sessions`` into ``out`` (see the module docstring); returns the manifest.

    Raises:
        UsageError: an unsigned session (without ``allow_unsigned``), or class lists that differ.
        StoreError: a session cannot be read, or ``out`` cannot be written.
    """
    out = Path(out)
    try:
        old = read_manifest(out) if (out / MANIFEST).exists() else None
    except InputError as exc:
        raise UsageError(f"{out} holds something that is not an export-cells folder: {exc}") from exc
    views: list[tuple[Path, ReviewLog, Verified]] = []
    try:
        for spec in sessions:
            root = resolve_session(spec)
            rl = ReviewLog.open(root)
            views.append((root, rl, Verified(rl, base={})))
        classes = _agree([v.classes for _, _, v in views], [str(r) for r, _, _ in views], old)
        for root, _, v in views:
            if v.signed is None and not allow_unsigned:
                raise UsageError(
                    f"session {root} is not signed off: review and sign it first (hemaedge review {root}), "
                    "or pass --unsigned to export the model's calls and the changes made so far"
                )
        doc = old or {"format": FORMAT, "classes": classes, "sessions": [], "cells": []}
        redo = {rl.uid for _, rl, _ in views}
        for entry in [c for c in doc["cells"] if c["session"] in redo]:
            (out / entry["file"]).unlink(missing_ok=True)  # exported again below, maybe into another class
        doc["cells"] = [c for c in doc["cells"] if c["session"] not in redo]
        doc["sessions"] = [s for s in doc["sessions"] if s["uid"] not in redo]
        for root, rl, v in views:
            cells, session = _export_one(root, rl, v, out)
            doc["cells"] += cells
            doc["sessions"].append(session)
            if log is not None:
                log(f"{root}: {session['cells']} cells ({session['changed']} changed in review)")
        doc["written"] = iso(time.time())
        doc["class_folders"] = {c: sum(1 for x in doc["cells"] if x["class"] == c) for c in classes}
        doc["note"] = (
            "Each cell is in the folder of its verified class (the review's, not the model's); cells left in "
            "review and artefacts are not exported. Crops are as the classifier saw them, before resizing."
        )
        _write_json(out / MANIFEST, doc)
        return doc
    except OSError as exc:
        raise StoreError(f"cannot write the cells into {out}: {exc.strerror or exc}") from exc
    finally:
        for _, rl, _ in views:
            rl.close()


def _agree(lists: Sequence[Sequence[str]], names: Sequence[str], old: dict[str, Any] | None) -> list[str]:
    if not lists:
        raise UsageError("name at least one session")
    first = list(lists[0])
    for cl, name in zip(lists, names):
        if list(cl) != first:
            raise UsageError(
                f"session {name} was counted with classes {list(cl)}, {names[0]} with {first}: "
                "export them into different folders"
            )
    if old is not None and list(old["classes"]) != first:
        raise UsageError(f"the export folder holds classes {old['classes']}, these sessions {first}: use another --out")
    for c in first:
        if c in (REVIEW, ARTEFACT) or not c.strip() or c.startswith(".") or any(ch in c for ch in "/\\\0"):
            raise UsageError(f"class name {c!r} cannot be a folder name")
    return first


def _export_one(root: Path, rl: ReviewLog, v: Verified, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    signed = v.signed
    last_by: dict[int, str] = {}
    for ch in v.changes:
        last_by[ch.cell_id] = ch.reviewer
    stem = f"{_safe(root.name)}-{rl.uid[:8]}"
    made: set[Path] = set()
    cells = []
    for c in v.cells:
        cls = v.classes_of[c.id]
        if cls in (REVIEW, ARTEFACT):
            continue
        folder = out / cls
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        rel = f"{cls}/{stem}-c{c.id:06d}.png"
        shutil.copyfile(root / c.crop, out / rel)
        changed = cls != model_bucket(c)
        by = last_by.get(c.id) if changed else None
        cells.append(
            {
                "file": rel,
                "class": cls,
                "model_class": c.class_name,
                "model_confidence": round(c.confidence, 4),
                "model_unsure": bool(c.review),
                "changed": changed,
                "verified_by": by or (signed.reviewer if signed else None),
                "session": rl.uid,
                "cell": c.id,
            }
        )
    s = v.settings
    session = {
        "uid": rl.uid,
        "name": root.name,
        "path": str(root.resolve()),
        "bundle": {"name": s.get("bundle_name"), "manifest_sha256": s.get("bundle_sha256")},
        "station": signed.station if signed else None,
        "signed": signed is not None,
        "verified_by": [so.reviewer for so in v.signoffs],
        "signed_at": iso(signed.t) if signed else None,
        "cells": len(cells),
        "changed": sum(1 for c in cells if c["changed"]),
        "left_out": {
            "review": sum(1 for x in v.classes_of.values() if x == REVIEW),
            "artefact": sum(1 for x in v.classes_of.values() if x == ARTEFACT),
        },
    }
    return cells, session


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
