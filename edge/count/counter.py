"""The differential counter: class buckets, a review bucket, the target, statistics and flags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from hemaedge.edge.count.flags import ClassGroups, compute_flags
from hemaedge.edge.count.stats import wilson_interval
from hemaedge.edge.records import CountSnapshot, Prediction

REVIEW = "review"
DEFAULT_TARGET = 100
DEFAULT_REVIEW_THRESHOLD = 0.6


def decide(probabilities: np.ndarray, classes: Sequence[str], threshold: float) -> tuple[int, str, float, bool]:
    """The bucket for one prediction.

    Returns:
        ``(class_index, class_name, confidence, review)``; ``review`` is True
        when the top probability is below ``threshold`` (the cell goes to the
        review bucket, its top class is kept only as a hint).
    """
    i = int(np.argmax(probabilities))
    conf = float(probabilities[i])
    return i, classes[i], conf, conf < threshold


class DifferentialCounter:
    """Counts cells per class towards a target.

    The differential (what the target and the percentages refer to) holds the
    white-cell classes plus the review bucket; non-white classes (platelets,
    nucleated red cells) are counted alongside but not towards the target.

    Args:
        classes: Class names in model order.
        target: White cells to count before the session is complete.
        review_threshold: Probability below which a cell goes to review: the probability of the top class's
            clinical group (its members summed), so a model unsure only between two classes of one group (band or
            segmented neutrophil) counts the cell in that group; with one class per group it is the top probability.
        class_groups: The manifest's ``class_groups`` (empty: derived from names).
    """

    def __init__(
        self,
        classes: Sequence[str],
        target: int = DEFAULT_TARGET,
        review_threshold: float = DEFAULT_REVIEW_THRESHOLD,
        class_groups: Mapping[str, Sequence[str]] | None = None,
    ):
        if target < 1:
            raise ValueError("target must be at least 1")
        if not 0.0 <= review_threshold <= 1.0:
            raise ValueError("review threshold must lie in 0..1")
        self.classes = tuple(classes)
        self.target = int(target)
        self.review_threshold = float(review_threshold)
        self.groups = ClassGroups.build(self.classes, class_groups)
        self._in_differential = [c for c, d in zip(self.classes, self.groups.differential) if d]
        index = {c: i for i, c in enumerate(self.classes)}
        self._group_members: list[tuple[int, ...]] = [(i,) for i in range(len(self.classes))]
        for members in self.groups.groups.values():
            idx = tuple(index[m] for m in members if m in index)
            for i in idx:
                self._group_members[i] = idx
        self.reset()

    def reset(self) -> None:
        """Forget every cell."""
        self.counts = dict.fromkeys(self.classes, 0)
        self.review = 0
        self.top_counts = dict.fromkeys(self.classes, 0)  # by top class, review cells included (for triage)

    @property
    def total(self) -> int:
        """White cells counted (differential classes + review)."""
        return self.review + sum(self.counts[c] for c in self._in_differential)

    @property
    def done(self) -> bool:
        """Has the target been reached?"""
        return self.total >= self.target

    def decide(self, probabilities: np.ndarray) -> tuple[int, str, float, bool]:
        """See :func:`decide`, with this counter's classes and threshold applied to the top class's group."""
        i, name, conf, _ = decide(probabilities, self.classes, self.review_threshold)
        return i, name, conf, self.group_confidence(i, probabilities) < self.review_threshold

    def group_confidence(self, class_index: int, probabilities: np.ndarray | None) -> float:
        """The probability of ``class_index``'s clinical group: its members' probabilities summed."""
        if probabilities is None or len(probabilities) != len(self.classes):
            raise ValueError("group_confidence needs one probability per class")
        return float(sum(float(probabilities[j]) for j in self._group_members[class_index]))

    def extend_target(self, by: int, limit: int) -> int:
        """Raise the target by ``by`` white cells, at most to ``limit``; returns the new target."""
        self.target = max(self.target, min(limit, self.target + by))
        return self.target

    def is_review(self, prediction: Prediction) -> bool:
        """Does this prediction go to the review bucket (its group's probability below the review threshold)?"""
        probs = getattr(prediction, "probabilities", None)
        if probs is None or len(probs) != len(self.classes):
            return prediction.confidence < self.review_threshold
        return self.group_confidence(prediction.class_index, probs) < self.review_threshold

    def add(self, class_index: int, review: bool) -> str:
        """Count one cell; returns its bucket (a class name or ``"review"``)."""
        self.top_counts[self.classes[class_index]] += 1
        if review:
            self.review += 1
            return REVIEW
        name = self.classes[class_index]
        self.counts[name] += 1
        return name

    def snapshot(self) -> CountSnapshot:
        """Counts, percentages with 95 % Wilson intervals, group counts and flags."""
        n = self.total
        percentages: dict[str, float] = {}
        intervals: dict[str, tuple[float, float]] = {}
        for i, c in enumerate(self.classes):
            if self.groups.differential[i]:
                percentages[c] = 100.0 * self.counts[c] / n if n else 0.0
                intervals[c] = wilson_interval(self.counts[c], n)
        percentages[REVIEW] = 100.0 * self.review / n if n else 0.0
        intervals[REVIEW] = wilson_interval(self.review, n)
        group_counts = {k: sum(self.counts[c] for c in members) for k, members in self.groups.groups.items()}
        flags = compute_flags(self.groups, self.counts, n, self.review, wilson_interval)
        return CountSnapshot(
            counts=dict(self.counts),
            total=n,
            target=self.target,
            percentages=percentages,
            intervals=intervals,
            review=self.review,
            flags=tuple(flags),
            group_counts=group_counts,
        )
