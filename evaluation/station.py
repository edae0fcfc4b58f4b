"""The station path on labelled data: how a lab validates a station on its own cells.

For every labelled cell: the station's segmenter finds the cells of its image, the one labelled is picked (the
detection overlapping the labelled box with IoU >= 0.5, or, for single-cell images, the one nearest the centre),
the crop is cut with the bundle's crop geometry at the session's scale (the data set is one session: its median
white-cell box), preprocessed and classified by the station's own backend. A labelled cell the segmenter misses
counts as wrong.

Classes are matched between the data set's labels and the bundle by name, by any spelling of the same class
(``edge.bundle.vocabulary``), by ``--map LABEL=CLASS`` or, failing those, by clinical group: a data set's
"neutrophil" is right when a blast-aware bundle calls the cell a band or a segmented neutrophil.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hemaedge.edge.bundle.class_groups import group_of
from hemaedge.edge.bundle.preprocess import SessionStain, stain_angles
from hemaedge.edge.bundle.vocabulary import canonical_or_same, display_name, same_class
from hemaedge.edge.errors import InputError, UsageError
from hemaedge.edge.records import Frame
from hemaedge.edge.segment.crops import central_detection, typical_side
from hemaedge.evaluation.labelled import LabelledCell, best_match

MISSED = "(missed)"
OTHER = "(other)"


@dataclass(frozen=True)
class LabelMatch:
    """What a data set's label means in the bundle's classes.

    Attributes:
        label: The data set's name for the class.
        accepts: The bundle classes that count as right for it.
        how: ``"name"``, ``"map"`` or ``"group <key>"``.
    """

    label: str
    accepts: tuple[str, ...]
    how: str


def parse_map(pairs: Iterable[str]) -> dict[str, list[str]]:
    """``["LABEL=CLASS", "LABEL=CLASS2"]`` -> ``{LABEL: [CLASS, CLASS2]}``."""
    out: dict[str, list[str]] = {}
    for pair in pairs:
        label, sep, cls = pair.partition("=")
        if not sep or not label.strip() or not cls.strip():
            raise UsageError(f"--map wants LABEL=CLASS, not {pair!r}")
        out.setdefault(label.strip(), []).append(cls.strip())
    return out


def match_labels(
    labels: Iterable[str],
    classes: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    mapping: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, LabelMatch]:
    """Match every data-set label to the bundle classes that count as right for it.

    Raises:
        UsageError: a label matches nothing (the message lists the bundle's classes and the ``--map`` fix).
    """
    mapping = mapping or {}
    out: dict[str, LabelMatch] = {}
    unmatched = []
    for label in sorted(set(labels)):
        if label in mapping:
            bad = [c for c in mapping[label] if not any(same_class(c, k) for k in classes)]
            if bad:
                raise UsageError(f"--map {label}={bad[0]}: the bundle has no class {bad[0]!r}; it has {list(classes)}")
            accepts = tuple(k for k in classes if any(same_class(c, k) for c in mapping[label]))
            out[label] = LabelMatch(label, accepts, "map")
            continue
        same = tuple(k for k in classes if same_class(label, k))
        if same:
            out[label] = LabelMatch(label, same, "name")
            continue
        key = group_of(canonical_or_same(label)) or group_of(label)
        members = tuple(groups.get(key, ())) if key else ()
        if members:
            out[label] = LabelMatch(label, members, f"group {key}")
        else:
            unmatched.append(label)
    if unmatched:
        raise UsageError(
            f"data labels {unmatched} match none of the bundle's classes {list(classes)}: "
            f"map them with --map LABEL=CLASS, or leave them out with --classes"
        )
    return out


@dataclass
class StationEvaluation:
    """The result of :func:`evaluate_station` (``to_dict()`` is what ``--json`` prints)."""

    bundle: str
    data: str
    layout: str
    backend: str
    matches: dict[str, LabelMatch]
    truth: list[str] = field(default_factory=list)  # per labelled cell: its label
    predicted: list[str] = field(default_factory=list)  # per labelled cell: the bundle class, or MISSED
    confidence: list[float] = field(default_factory=list)  # per cell: its group's probability (what review uses)
    review_threshold: float = 0.6
    typical_side: float | None = None
    stain_strength: float | None = None
    stain_angles: list[float] | None = None  # degrees between the set's two stains and the bundle's reference ones
    detector_check: dict[str, Any] | None = None  # the checked segmenter's session check (``edge/segment/checked.py``)

    def outcome(self, i: int) -> str:
        """The label the prediction of cell ``i`` counts as (its own label when right), MISSED or OTHER."""
        pred = self.predicted[i]
        if pred == MISSED:
            return MISSED
        if pred in self.matches[self.truth[i]].accepts:
            return self.truth[i]
        hits = [lab for lab, m in self.matches.items() if pred in m.accepts]
        return hits[0] if len(hits) == 1 else OTHER

    def to_dict(self) -> dict[str, Any]:
        """Accuracy (misses count as wrong), per-label precision/recall, confusion matrix, the matching used."""
        labels = sorted(self.matches)
        outcomes = [self.outcome(i) for i in range(len(self.truth))]
        n = len(self.truth)
        right = sum(o == t for o, t in zip(outcomes, self.truth))
        detected = sum(p != MISSED for p in self.predicted)
        cols = labels + [OTHER, MISSED]
        cm = {t: dict.fromkeys(cols, 0) for t in labels}
        for t, o in zip(self.truth, outcomes):
            cm[t][o] += 1
        per = {}
        for lab in labels:
            tp = cm[lab][lab]
            support = sum(cm[lab].values())
            called = sum(cm[t][lab] for t in labels)
            per[lab] = {
                "n": support,
                "correct": tp,
                "recall": tp / support if support else None,
                "precision": tp / called if called else None,
                "accepts": list(self.matches[lab].accepts),
                "matched_by": self.matches[lab].how,
            }
        review = sum(c < self.review_threshold for c, p in zip(self.confidence, self.predicted) if p != MISSED)
        predicted_counts: dict[str, int] = {}
        by_label: dict[str, dict[str, int]] = {lab: {} for lab in labels}  # what each label's cells were called
        for t, p in zip(self.truth, self.predicted):
            predicted_counts[p] = predicted_counts.get(p, 0) + 1
            by_label[t][p] = by_label[t].get(p, 0) + 1
        return {
            "bundle": self.bundle,
            "data": self.data,
            "layout": self.layout,
            "backend": self.backend,
            "cells": n,
            "detected": detected,
            "missed": n - detected,
            "accuracy": right / n if n else 0.0,
            "accuracy_of_detected": right / detected if detected else 0.0,
            "review_share": review / detected if detected else 0.0,
            "typical_cell_side_px": None if self.typical_side is None else round(self.typical_side, 1),
            "stain_strength": None if self.stain_strength is None else round(self.stain_strength, 3),
            **({} if self.stain_angles is None else {"stain_angles_deg": [round(a, 1) for a in self.stain_angles]}),
            **({} if self.detector_check is None else {"detector_check": self.detector_check}),
            "per_class": per,
            "confusion": {"rows": labels, "columns": cols, "matrix": [[cm[t][c] for c in cols] for t in labels]},
            "predicted_classes": predicted_counts,
            # the bundle's own classes, per label: e.g. how many normal lymphocytes a blast-aware bundle calls blast
            "predicted_by_label": {
                lab: dict(sorted(by_label[lab].items(), key=lambda kv: (-kv[1], kv[0]))) for lab in labels
            },
        }


def _read(cell: LabelledCell) -> np.ndarray | None:
    """The image as BGR, or None when it cannot be read (counted as missed, never as a crash)."""
    from hemaedge.edge.sources.files import read_image

    try:
        return read_image(cell.image)
    except InputError:
        return None


def locate(station: Any, cells: Sequence[LabelledCell], progress: Any = None) -> list[tuple[int, np.ndarray, tuple]]:
    """Find each labelled cell with the station's segmenter: ``(index, RGB image, detected box)`` per cell found.

    The detection overlapping the labelled box with IoU >= 0.5, or without a box the one nearest the centre.
    Images that cannot be read, and cells the segmenter misses, are left out.
    """
    found: list[tuple[int, np.ndarray, tuple]] = []
    for i, cell in enumerate(cells):
        bgr = _read(cell)
        if bgr is not None:
            frame = Frame(bgr, "BGR", 0.0, "evaluate", i, cell.image.name)
            dets = station.segmenter.detect(frame)
            if cell.box is not None:
                k = best_match([d.box for d in dets], cell.box)
                det = dets[k] if k is not None else None
            else:
                det = central_detection(dets, bgr.shape)
            if det is not None:
                found.append((i, np.ascontiguousarray(bgr[..., ::-1]), det.box))
        if progress is not None and i % 50 == 0:
            progress(i + 1)
    return found


def station_crops(
    station: Any, cells: Sequence[LabelledCell], progress: Any = None
) -> tuple[list[tuple[int, np.ndarray]], float | None]:
    """Crops of the labelled cells cut exactly as the station cuts them: ``([(index, RGB crop)], typical side)``.

    The data set is one session (one microscope, one scale): crops at ``scale="session"`` share the median box
    side of all the cells found, as the station's running median would settle.
    """
    from hemaedge.edge.bundle.preprocess import cut_crop

    found = locate(station, cells, progress)
    typical = typical_side(box for _, _, box in found)
    return [(i, cut_crop(rgb, box, station.geometry, typical)) for i, rgb, box in found], typical


def evaluate_station(
    station: Any,
    cells: Sequence[LabelledCell],
    matches: Mapping[str, LabelMatch],
    *,
    data: str = "",
    layout: str = "",
    batch: int = 64,
    progress: Any = None,
) -> StationEvaluation:
    """Run ``station`` (an *entered* ``Station``) over labelled cells and score it.

    Args:
        station: The station (``Station.from_bundle``), entered so its backend is loaded.
        cells: The labelled cells (``read_labelled``), all of one session (one microscope, one scale).
        matches: ``match_labels`` of their labels.
        data: Shown in the result.
        layout: Shown in the result.
        batch: Crops per classification call.
        progress: Called with the number of images done, now and then.
    """
    crops, typical = station_crops(station, cells, progress)
    check = getattr(station.segmenter, "check", None)  # the checked detector's, None for the others
    result = StationEvaluation(
        bundle=str(station.bundle.path),
        data=data,
        layout=layout,
        backend=station.backend_reason,
        matches=dict(matches),
        truth=[c.label for c in cells],
        predicted=[MISSED] * len(cells),
        confidence=[0.0] * len(cells),
        typical_side=typical,
        detector_check=check,
    )
    from hemaedge.edge.count import DifferentialCounter

    m = station.bundle.manifest
    review = DifferentialCounter(m.classes, 1, class_groups=m.class_groups)  # the station's review decision
    stain = SessionStain.of_set([c for _, c in crops], m.input, batch)  # one session, in any order
    if m.input.stain_ref:
        result.stain_strength = stain.strength
        result.stain_angles = stain_angles(stain.vectors, m.input)
    for s in range(0, len(crops), batch):
        part = crops[s : s + batch]
        for (i, _), pred in zip(part, station.predict([c for _, c in part], stain.estimate)):
            result.predicted[i] = pred.class_name
            result.confidence[i] = review.group_confidence(pred.class_index, pred.probabilities)
    return result


def print_station_report(res: dict[str, Any]) -> None:
    """Rich tables: the headline, per class, the confusion matrix."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if (res.get("detector_check") or {}).get("decision") == "both":
        con.print(f"[yellow]white cells:[/] {res['detector_check']['describe']}", highlight=False)
    con.print(
        f"[bold]{res['bundle']}[/] on {res['data']} ({res['layout']}), station path ({res['backend']}): accuracy "
        f"[bold]{res['accuracy']:.4f}[/] on {res['cells']} cells ({res['missed']} not detected; "
        f"{res['accuracy_of_detected']:.4f} of those detected; {100 * res['review_share']:.1f}% would go to review)",
        highlight=False,
    )
    t = Table("label", "counts as", "n", "recall", "precision")
    for lab, m in res["per_class"].items():
        t.add_row(
            lab,
            ", ".join(display_name(c) for c in m["accepts"])
            + ("" if m["matched_by"] == "name" else f" ({m['matched_by']})"),
            str(m["n"]),
            "-" if m["recall"] is None else f"{m['recall']:.3f}",
            "-" if m["precision"] is None else f"{m['precision']:.3f}",
        )
    con.print(t)
    cm = res["confusion"]
    table = Table("true \\ called", *[c[:10] for c in cm["columns"]], title="confusion matrix")
    for row, vals in zip(cm["rows"], cm["matrix"]):
        table.add_row(row, *[str(v) for v in vals])
    con.print(table)
