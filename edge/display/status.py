"""What the live display shows: one plain record, produced by the pipeline, read by the views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hemaedge.edge.records import CountSnapshot

REVIEW = "review"  # the review bucket's name (hemaedge.edge.count.REVIEW)


@dataclass(frozen=True)
class RecentCell:
    """A counted cell, for the "last cells" list."""

    id: int
    bucket: str  # class name or "review"
    confidence: float
    frame: str  # frame name or index


def display_order(classes: Sequence[str], differential: Sequence[bool]) -> list[str]:
    """The order every table shows (live and final): white-cell classes in model order, the review bucket,
    then the classes outside the differential (platelets, nucleated red cells: per 100 white cells)."""
    return (
        [c for c, d in zip(classes, differential) if d] + [REVIEW] + [c for c, d in zip(classes, differential) if not d]
    )


@dataclass(frozen=True)
class RunStatus:
    """The state of a counting session at one moment.

    Attributes:
        snapshot: The differential count.
        classes: The bundle's classes in model order.
        differential: Per class: part of the white-cell differential (else reported per 100 WBC).
        group_labels: Group key -> label for ``snapshot.group_counts``.
        state: ``starting``, ``counting``, ``paused``, ``stopping``, ``done`` (target reached),
            ``ended`` (source exhausted), ``failed``.
        session: Session directory or id.
        source: Source URI.
        backend: Backend in use (e.g. ``onnxruntime/CPU``).
        precision: Precision actually run (``int8``, ``fp32``...).
        frames: Frames read.
        fps: Frames per second over the last seconds.
        cells_per_s: Cells counted per second over the last seconds.
        skipped: Why frames were not segmented -> how many (``quality``, ``busy``, ``unplaced``).
        inputs_unusable: Still images that could not be used (unreadable, greyscale, too small, quality).
        at_edge: Detections not counted yet because the cell was cut by the frame border (counted once in view).
        warnings: Recent warnings for a person (blur, camera reconnecting...).
        recent: The last counted cells, newest last.
        review_threshold: Top probability below which a cell goes to review.
        message: One line (e.g. "press y to confirm reset").
        note: A standing remark about the session (e.g. that a demo counts drawn cells).
        triage: The slide call so far, one line (``""`` when the bundle has no triage rules).
        not_estimated: Classes the session does not estimate (platelets unless ``--platelets``): shown as
            "not estimated", never as a number.
    """

    snapshot: CountSnapshot
    classes: tuple[str, ...]
    differential: tuple[bool, ...]
    group_labels: dict[str, str] = field(default_factory=dict)
    state: str = "starting"
    session: str = ""
    source: str = ""
    backend: str = ""
    precision: str = ""
    frames: int = 0
    fps: float = 0.0
    cells_per_s: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    at_edge: int = 0
    warnings: tuple[str, ...] = ()
    recent: tuple[RecentCell, ...] = ()
    review_threshold: float = 0.6
    message: str = ""
    note: str = ""
    not_estimated: tuple[str, ...] = ()
    inputs_unusable: int = 0
    triage: str = ""
