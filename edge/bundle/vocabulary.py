"""One vocabulary of cell classes: a canonical name for every class any bundle knows, and a display name.

Data sets name the same cell differently (BloodMNIST "immature granulocyte", PBC's folder "ig", DeepAPL's
"neutrophil_segmented", CellaVision's "Segmented neutrophils"). A bundle's manifest lists canonical names
(``export-model`` writes them), so sessions, reports, ``cells.csv``, FHIR results and class folders of every
bundle agree; people see the display names. A name the vocabulary does not know is kept as it is (a bundle
trained on other classes still works) and displayed with its underscores as spaces.

Stdlib only (part of the bundle contract).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# canonical name -> (display name, other spellings). Canonical names are lower case with underscores, so they
# are safe as folder and file names.
CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "neutrophil": ("Neutrophil", ("neutrophils", "neut", "polymorphonuclear", "pmn")),
    "neutrophil_segmented": (
        "Segmented neutrophil",
        ("segmented neutrophil", "segmented neutrophils", "neutrophil segmented", "seg", "sne", "segmented"),
    ),
    "neutrophil_band": ("Band neutrophil", ("band neutrophil", "band neutrophils", "neutrophil band", "band", "bne")),
    "lymphocyte": ("Lymphocyte", ("lymphocytes", "lymph", "ly", "small lymphocyte", "large lymphocyte")),
    "lymphocyte_variant": (
        "Variant lymphocyte",
        ("variant lymphocyte", "lymphocyte variant", "reactive lymphocyte", "atypical lymphocyte", "vly"),
    ),
    "monocyte": ("Monocyte", ("monocytes", "mono", "mo")),
    "eosinophil": ("Eosinophil", ("eosinophils", "eos", "eo")),
    "basophil": ("Basophil", ("basophils", "baso", "ba")),
    "immature_granulocyte": ("Immature granulocyte", ("ig", "immature granulocyte", "immature granulocytes")),
    "promyelocyte": ("Promyelocyte", ("promyelocytes", "pmy")),
    "myelocyte": ("Myelocyte", ("myelocytes", "my")),
    "metamyelocyte": ("Metamyelocyte", ("metamyelocytes", "mmy")),
    "blast": ("Blast", ("blasts", "blast cell", "blast no lineage spec", "bl")),
    "myeloblast": ("Myeloblast", ("myeloblasts",)),
    "lymphoblast": ("Lymphoblast", ("lymphoblasts",)),
    "monoblast": ("Monoblast", ("monoblasts",)),
    "promonocyte": ("Promonocyte", ("promonocytes",)),
    "prolymphocyte": ("Prolymphocyte", ("prolymphocytes",)),
    "plasma_cell": ("Plasma cell", ("plasma cell", "plasma cells", "plasmacyte")),
    "erythroblast": (
        "Erythroblast (NRBC)",
        ("erythroblasts", "nrbc", "erb", "nucleated red blood cell", "nucleated rbc", "normoblast"),
    ),
    "smudge_cell": ("Smudge cell", ("smudge cell", "smudge cells", "smudge", "basket cell")),
    "platelet": ("Platelet", ("platelets", "thrombocyte", "thrombocytes", "plt")),
    "giant_platelet": ("Giant platelet", ("giant platelet", "giant thrombocyte")),
    "platelet_aggregate": (
        "Platelet aggregate",
        ("platelet aggregate", "platelet clump", "thrombocyte aggregation"),
    ),
    "artifact": ("Artifact", ("artefact", "artifacts", "arifact")),
}


def _key(name: str) -> str:
    """Lower case, ``_``/``-``/``,`` and blanks to one space."""
    return re.sub(r"[\s_\-,]+", " ", name.strip().lower()).strip()


_BY_SPELLING: dict[str, str] = {}
for _canon, (_display, _spellings) in CLASSES.items():
    for _s in (_canon, _display, *_spellings):
        _BY_SPELLING.setdefault(_key(_s), _canon)


def canonical(name: str) -> str | None:
    """The canonical name of a class spelling (``"ig"`` -> ``"immature_granulocyte"``), None if unknown."""
    return _BY_SPELLING.get(_key(name))


def canonical_or_same(name: str) -> str:
    """The canonical name, or ``name`` itself when the vocabulary does not know it."""
    return canonical(name) or name


def canonical_classes(names: Iterable[str]) -> list[str]:
    """Canonical names for a bundle's classes, refusing a list in which two spellings mean the same class."""
    out = [canonical_or_same(n) for n in names]
    if len(set(out)) != len(out):
        dupes = sorted({c for c in out if out.count(c) > 1})
        raise ValueError(f"class names {list(names)} name the same class twice ({', '.join(dupes)})")
    return out


def display_name(name: str) -> str:
    """What people read for a class (``"neutrophil_band"`` -> ``"Band neutrophil"``)."""
    canon = canonical(name)
    if canon is not None:
        return CLASSES[canon][0]
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def same_class(a: str, b: str) -> bool:
    """Do two spellings name the same class (``"ig"`` and ``"immature granulocyte"``)?"""
    return canonical_or_same(a) == canonical_or_same(b)
