"""Differential counting: each physical cell once, class buckets, review, statistics and flags."""

from hemaedge.edge.count.counter import DEFAULT_REVIEW_THRESHOLD, DEFAULT_TARGET, REVIEW, DifferentialCounter, decide
from hemaedge.edge.count.flags import REFERENCE_RANGES, ClassGroups, canonical_group, compute_flags
from hemaedge.edge.count.stats import wilson_interval
from hemaedge.edge.count.tracking import CellMap, Keyframe, Registration, SlideRegistrar, SlideTracker, TrackResult

__all__ = [
    "DEFAULT_REVIEW_THRESHOLD",
    "DEFAULT_TARGET",
    "REFERENCE_RANGES",
    "REVIEW",
    "CellMap",
    "ClassGroups",
    "DifferentialCounter",
    "Keyframe",
    "Registration",
    "SlideRegistrar",
    "SlideTracker",
    "TrackResult",
    "canonical_group",
    "compute_flags",
    "decide",
    "wilson_interval",
]
