"""Clinical class groups, adult reference ranges and the flags a count raises.

A bundle's classes are whatever its training set called them (BloodMNIST,
PBC, Raabin, TXL-PBC...). The manifest may map them to clinical groups
(``class_groups``); when it does not, the groups are derived from the class
names by ``hemaedge.edge.bundle.class_groups`` (the rules ``export-model`` writes into
manifests). Groups drive the flags (blasts present, left shift, values
outside the adult reference ranges) and which classes belong to the white-cell
differential at all: platelets and nucleated red cells do not count towards the
target and are reported per 100 white cells, as in a manual count.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hemaedge.edge.bundle.class_groups import group_of

# canonical group key (hemaedge.edge.bundle.class_groups) -> label
LABELS: dict[str, str] = {
    "neutrophils": "Neutrophils",
    "lymphocytes": "Lymphocytes",
    "monocytes": "Monocytes",
    "eosinophils": "Eosinophils",
    "basophils": "Basophils",
    "blasts": "Blasts",
    "immature_granulocytes": "Immature granulocytes",
    "nrbc": "Nucleated RBCs",
    "platelets": "Platelets",
    "smudge_cells": "Smudge cells",
}

# groups that are not white cells: shown, but outside the differential (per 100 WBC)
NON_DIFFERENTIAL = frozenset({"nrbc", "platelets", "rbc", "smudge_cells"})
_NON_WBC_NAMES = frozenset({"rbc", "erythrocyte", "red blood cell", "red cell"})

# adult peripheral-blood reference ranges, percent of white cells
REFERENCE_RANGES: dict[str, tuple[float, float]] = {
    "neutrophils": (40.0, 75.0),
    "lymphocytes": (20.0, 45.0),
    "monocytes": (2.0, 10.0),
    "eosinophils": (1.0, 6.0),
    "basophils": (0.0, 2.0),
}

REVIEW_FLAG_SHARE = 10.0  # percent of counted cells in "review" above which the count is flagged
# ... and above which the differential is said to be doubtful (a microscope or stain the model does not know, or an
# unusual slide): the default is unsure of 4 % of PBC val's cells and 11 % of BCCD val's (microscopes it was trained
# on), of 5-50 % of another lab's patients' (median 27 %)
UNFAMILIAR_REVIEW_SHARE = 25.0


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_BY_LABEL = {**{_key(label): key for key, label in LABELS.items()}, **{_key(k): k for k in LABELS}}


def canonical_group(name: str) -> str | None:
    """The canonical group key of a class or group name (``"Myeloblast"`` -> ``"blasts"``), else None.

    Red cells (``"rbc"``, ``"erythrocyte"``) map to ``"rbc"``, a group outside the differential.
    """
    k = _key(name)
    if k.rstrip("s") in _NON_WBC_NAMES or k in _NON_WBC_NAMES:
        return "rbc"
    return _BY_LABEL.get(k) or group_of(name)


@dataclass(frozen=True)
class ClassGroups:
    """How a bundle's classes map to clinical groups.

    Attributes:
        classes: The bundle's class names, in model order.
        groups: Group key -> member class names (ordered as in ``classes``).
        labels: Group key -> human label.
        differential: Per class: does it belong to the white-cell differential?
    """

    classes: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    labels: dict[str, str]
    differential: tuple[bool, ...]

    @classmethod
    def build(cls, classes: Sequence[str], manifest_groups: Mapping[str, Sequence[str]] | None = None) -> ClassGroups:
        """Groups from the manifest's ``class_groups`` when given, else from the class names."""
        classes = tuple(classes)
        groups: dict[str, list[str]] = {}
        labels: dict[str, str] = {}
        if manifest_groups:
            for gname, members in manifest_groups.items():
                key = canonical_group(gname) or _key(gname).replace(" ", "_")
                groups.setdefault(key, [])
                groups[key] += [m for m in members if m in classes and m not in groups[key]]
                labels[key] = LABELS.get(key, gname)
        else:
            for c in classes:
                key = canonical_group(c)
                if key is None or key == "rbc":
                    continue
                groups.setdefault(key, []).append(c)
                labels[key] = LABELS.get(key, key)
        ordered = {k: tuple(c for c in classes if c in v) for k, v in groups.items()}
        differential = tuple(canonical_group(c) not in NON_DIFFERENTIAL for c in classes)
        return cls(classes, ordered, labels, differential)

    def group_of(self, class_name: str) -> str | None:
        """The group a class belongs to (first match), else None."""
        for key, members in self.groups.items():
            if class_name in members:
                return key
        return None


def compute_flags(groups: ClassGroups, counts: Mapping[str, int], total: int, review: int, intervals_of) -> list[str]:
    """The flags a clinician must see, as short sentences.

    Args:
        groups: Class groups of the bundle.
        counts: Cells per class.
        total: Cells in the differential (classes in it + review).
        review: Low-confidence cells.
        intervals_of: ``f(k, n) -> (low %, high %)``, the 95 % interval used for the ranges.

    Reference-range flags are raised only when the whole 95 % interval lies
    outside the adult range, so a 100-cell count does not cry wolf on noise;
    each such flag says so.
    """
    flags: list[str] = []
    if total <= 0:
        return flags
    gcount = {key: sum(counts.get(c, 0) for c in members) for key, members in groups.groups.items()}
    if gcount.get("blasts", 0):
        k = gcount["blasts"]
        flags.append(f"BLASTS present: {k} cell{'s' * (k != 1)} ({100 * k / total:.1f} %) - confirm on the smear")
    if gcount.get("immature_granulocytes", 0):
        k = gcount["immature_granulocytes"]
        flags.append(f"Immature granulocytes: {k} ({100 * k / total:.1f} %) - left shift")
    for key, (lo, hi) in REFERENCE_RANGES.items():
        if key not in gcount:
            continue
        k = gcount[key]
        low, high = intervals_of(k, total)
        label = groups.labels.get(key, key)
        if low > hi:
            flags.append(
                f"{label} high: {100 * k / total:.0f} % (95% CI {low:.0f}-{high:.0f}) above adult {lo:g}-{hi:g} %"
            )
        elif high < lo:
            flags.append(
                f"{label} low: {100 * k / total:.0f} % (95% CI {low:.0f}-{high:.0f}) below adult {lo:g}-{hi:g} %"
            )
    share = 100 * review / total
    unsure = f"Review: {review} cell{'s' * (review != 1)} ({share:.0f} %) below the confidence threshold"
    if share > UNFAMILIAR_REVIEW_SHARE:  # it qualifies every flag but the blasts': right after them, else first
        flags.insert(
            int(bool(gcount.get("blasts", 0))),
            f"{unsure} - the differential may be wrong: this microscope or stain may be unlike those the model was "
            "trained on (or the slide unusual): check the gallery, and validate the model on this microscope's cells "
            "(hemaedge evaluate --station) or adapt it",
        )
    elif share > REVIEW_FLAG_SHARE:
        flags.append(f"{unsure} (> {REVIEW_FLAG_SHARE:g} %) - check the gallery")
    nrbc = gcount.get("nrbc", 0)
    if nrbc:
        flags.append(f"Nucleated RBCs: {nrbc} seen ({100 * nrbc / total:.0f} per 100 WBC)")
    return flags
