"""Default clinical grouping of a model's classes, written into the manifest as ``class_groups``.

A bundle's class list is whatever the model was trained on: the 8 BloodMNIST /
PBC classes, the 12 types of a leukaemia screen (myeloblast, lymphoblast,
promyelocyte, ...), or a 2-class blast-vs-normal model. The station's report
and flags work on clinical groups, so ``export-model`` records a mapping
group -> member classes in the manifest. This module derives the default
mapping from the class names (stdlib only); a user can override it.

Group keys are the canonical keys the counter understands (``blasts``,
``immature_granulocytes``, ``neutrophils``, ...). Only groups with at least one
member class are returned, members in model order, each class in at most one
group. Classes no rule recognises stay ungrouped (the report lists them by name).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# group key -> class-name spellings (after _norm). Order matters only for readability.
GROUP_SPELLINGS: dict[str, tuple[str, ...]] = {
    "blasts": (
        "blast",
        "blast cell",
        "myeloblast",
        "lymphoblast",
        "monoblast",
        "megakaryoblast",
        "leukemic blast",
        "leukaemic blast",
        "abnormal blast",
    ),
    "immature_granulocytes": (
        "immature granulocyte",
        "ig",
        "promyelocyte",
        "myelocyte",
        "metamyelocyte",
        "pmy",
        "my",
        "mmy",
        "meta",
        "myelo",
        "promyelo",
    ),
    "neutrophils": (
        "neutrophil",
        "band",
        "band neutrophil",
        "neutrophil band",
        "segmented neutrophil",
        "neutrophil segmented",
        "segmented",
        "seg",
        "bne",
        "sne",
        "neut",
        "polymorphonuclear",
    ),
    "lymphocytes": (
        "lymphocyte",
        "lymph",
        "small lymphocyte",
        "large lymphocyte",
        "reactive lymphocyte",
        "variant lymphocyte",
        "atypical lymphocyte",
        "lymphocyte reactive",
        "lymphocyte atypical",
        "lym",
        "lymphocyte typical",
    ),
    "monocytes": ("monocyte", "mono", "mon"),
    "eosinophils": ("eosinophil", "eos", "eosino"),
    "basophils": ("basophil", "baso", "bas"),
    "nrbc": (
        "erythroblast",
        "nrbc",
        "nucleated rbc",
        "nucleated red cell",
        "nucleated red blood cell",
        "normoblast",
        "ery",
    ),
    "platelets": (
        "platelet",
        "thrombocyte",
        "plt",
        "giant platelet",
        "giant thrombocyte",
        "platelet clump",
        "platelet aggregate",
        "thrombocyte aggregation",
    ),
    # broken cells: counted and reported per 100 white cells, never classified (typical of CLL, common in leukaemia)
    "smudge_cells": ("smudge cell", "smudge", "basket cell"),
}

_NEGATIONS = frozenset({"non", "not", "no", "other", "without"})
_BY_SPELLING = {s: key for key, spellings in GROUP_SPELLINGS.items() for s in spellings}


def _norm(name: str) -> str:
    """Lower case; ``_``, ``-`` and runs of blanks to one space; one trailing plural ``s`` dropped."""
    s = re.sub(r"[\s_\-]+", " ", name.strip().lower())
    return s[:-1] if len(s) > 3 and s.endswith("s") and not s.endswith("ss") else s


def group_of(class_name: str) -> str | None:
    """The default group key of one class name (``"Myeloblasts"`` -> ``"blasts"``), else None."""
    n = _norm(class_name)
    if n in _BY_SPELLING:
        return _BY_SPELLING[n]
    # Compound names such as "neutrophil (band)" or "blast, myeloid": try each word.
    words = re.findall(r"[a-z]+", n)
    if any(w in _NEGATIONS for w in words):  # "non-blast", "not neutrophil": no default group
        return None
    for w in words:
        w = w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
        if w in _BY_SPELLING and len(w) > 3:
            return _BY_SPELLING[w]
    return None


def default_class_groups(classes: Sequence[str] | Iterable[str]) -> dict[str, list[str]]:
    """Clinical groups for a class list, as the manifest records them.

    Args:
        classes: The model's class names in output order.

    Returns:
        ``{group key: [member class names in model order]}`` holding only the
        groups with at least one member, e.g. for
        ``["myeloblast", "lymphoblast", "promyelocyte", "neutrophil"]``:
        ``{"blasts": ["myeloblast", "lymphoblast"], "immature_granulocytes":
        ["promyelocyte"], "neutrophils": ["neutrophil"]}``.
    """
    groups: dict[str, list[str]] = {}
    for c in classes:
        key = group_of(c)
        if key is not None:
            groups.setdefault(key, []).append(c)
    order = list(GROUP_SPELLINGS)
    return {k: groups[k] for k in order if k in groups}
