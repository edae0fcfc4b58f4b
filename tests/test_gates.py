"""The INT8 gates: overall accuracy, and the recall of each critical class (blasts, promyelocytes)."""

from __future__ import annotations

import numpy as np
import pytest
from hemaedge.edge.errors import AccuracyGateError
from hemaedge.evaluation.metrics import classification_report
from hemaedge.export.gates import class_drops, class_gate, default_critical, misses_class_gate

CLASSES = ["blast", "promyelocyte", "lymphocyte", "neutrophil_segmented"]


def report(pred, truth):
    p = np.eye(len(CLASSES), dtype=np.float32)[pred]
    return classification_report(p, np.asarray(truth), CLASSES)


def test_critical_classes_default_to_blasts_and_promyelocytes():
    assert default_critical(CLASSES) == ["blast", "promyelocyte"]
    assert default_critical(["myeloblast", "lymphoblast", "lymphocyte"]) == ["myeloblast", "lymphoblast"]
    assert default_critical(["neutrophil", "lymphocyte", "ig"]) == []  # a normal-only bundle gates no class


def test_a_blast_recall_drop_fails_the_export_even_when_overall_accuracy_holds():
    truth = [0] * 20 + [1] * 20 + [2] * 200 + [3] * 200
    fp32 = report(truth, truth)
    worse = list(truth)
    worse[:2] = [2, 2]  # INT8 calls 2 of 20 blasts lymphocytes: recall 1.00 -> 0.90, accuracy 1.000 -> 0.995
    int8 = report(worse, truth)
    drops = class_drops(fp32, int8, ["blast", "promyelocyte"], CLASSES)
    assert drops["blast"] == {"fp32_recall": 1.0, "int8_recall": 0.9, "drop_points": 10.0, "support": 20}
    assert drops["promyelocyte"]["drop_points"] == 0.0
    with pytest.raises(AccuracyGateError, match="blast recall FP32 1.0000, INT8 0.9000, drop 10.00 points"):
        class_gate(drops, 2.0)
    assert misses_class_gate(drops, 2.0) == "blast recall drops 10.00 points (> 2.0)"
    class_gate(drops, 10.0)  # within a looser gate: no error
    assert misses_class_gate(drops, 10.0) == ""
