"""The INT8 accuracy gates of ``export-model``: overall accuracy, and the recall of each critical class.

Overall accuracy can hide what matters most: a leukaemia screen that keeps 98 % accuracy but loses five points
of blast recall misses the patients it exists for. So besides ``--max-drop`` on overall accuracy, the export
fails when the recall of a class the manifest marks critical (``critical_classes``: by default the blast classes
and promyelocytes) drops more than ``--max-class-drop`` points, printing both numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hemaedge.edge.bundle.class_groups import default_class_groups
from hemaedge.edge.bundle.vocabulary import canonical_or_same
from hemaedge.edge.errors import AccuracyGateError

# groups and classes whose recall is gated by default (clinically: the cells a triage must not miss)
CRITICAL_GROUPS = ("blasts",)
CRITICAL_CLASSES = ("promyelocyte",)


def default_critical(classes: Sequence[str]) -> list[str]:
    """The classes of a bundle whose recall is gated: its blast classes and promyelocytes (none for a normal-only
    bundle)."""
    groups = default_class_groups(classes)
    critical = {c for g in CRITICAL_GROUPS for c in groups.get(g, ())}
    critical |= {c for c in classes if canonical_or_same(c) in CRITICAL_CLASSES}
    return [c for c in classes if c in critical]


def accuracy_gate(fp32_acc: float, int8_acc: float, max_drop: float) -> float:
    """Return the drop in points, or raise AccuracyGateError (printing both numbers) when it exceeds ``max_drop``."""
    drop = (fp32_acc - int8_acc) * 100
    if drop > max_drop:
        raise AccuracyGateError(
            f"INT8 fails the accuracy gate: val accuracy FP32 {fp32_acc:.4f}, INT8 {int8_acc:.4f}, "
            f"drop {drop:.2f} points > --max-drop {max_drop} (try --calib-method, --search, or more --calib-size)"
        )
    return drop


def class_drops(
    fp32: Mapping[str, Any], int8: Mapping[str, Any], critical: Sequence[str], classes: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per critical class: FP32 and INT8 recall and the drop in points (``classification_report`` dicts).

    ``classes`` are the report's class names in model order; ``critical`` may use any spelling of them.
    """
    out = {}
    for name in critical:
        key = next((c for c in classes if canonical_or_same(c) == canonical_or_same(name)), None)
        if key is None or fp32["per_class"][key]["support"] == 0:
            continue
        r32 = fp32["per_class"][key]["recall"]
        r8 = int8["per_class"][key]["recall"]
        out[canonical_or_same(key)] = {
            "fp32_recall": round(r32, 4),
            "int8_recall": round(r8, 4),
            "drop_points": round((r32 - r8) * 100, 3),
            "support": int(fp32["per_class"][key]["support"]),
        }
    return out


def class_gate(drops: Mapping[str, Mapping[str, float]], max_class_drop: float, what: str = "INT8") -> None:
    """Raise AccuracyGateError naming the first critical class whose recall fell more than ``max_class_drop``."""
    for name, d in drops.items():
        if d["drop_points"] > max_class_drop:
            raise AccuracyGateError(
                f"{what} fails the per-class gate: {name} recall FP32 {d['fp32_recall']:.4f}, {what} "
                f"{d['int8_recall']:.4f}, drop {d['drop_points']:.2f} points > --max-class-drop {max_class_drop} "
                f"({d['support']} {name} cells in val; try --search or another --calib-method)"
            )


def misses_class_gate(drops: Mapping[str, Mapping[str, float]], max_class_drop: float) -> str:
    """``""`` when every critical class is within the gate, else one line saying which is not."""
    worst = [(n, d) for n, d in drops.items() if d["drop_points"] > max_class_drop]
    if not worst:
        return ""
    n, d = max(worst, key=lambda nd: nd[1]["drop_points"])
    return f"{n} recall drops {d['drop_points']:.2f} points (> {max_class_drop})"
