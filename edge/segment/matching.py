"""Box matching: IoU and centre matrices, and greedy one-to-one matching by score.

Runtime code (``hemaedge verify`` compares a detector's boxes with its golden ones); the data set readers that
measure detection on labelled frames live in ``hemaedge.evaluation.groundtruth``.
"""

from __future__ import annotations

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N x 4) with every box in ``b`` (M x 4)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def centre_matrix(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Where the centre of ``pred[i]`` lies inside ``truth[j]``: ``1 - distance / half-diagonal`` of the truth box
    (in ``(0, 1]``, higher nearer its centre), else 0."""
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    truth = np.asarray(truth, np.float64).reshape(-1, 4)
    if not len(pred) or not len(truth):
        return np.zeros((len(pred), len(truth)))
    cx, cy = (pred[:, 0] + pred[:, 2]) / 2, (pred[:, 1] + pred[:, 3]) / 2
    inside = (
        (cx[:, None] >= truth[None, :, 0])
        & (cx[:, None] <= truth[None, :, 2])
        & (cy[:, None] >= truth[None, :, 1])
        & (cy[:, None] <= truth[None, :, 3])
    )
    tx, ty = (truth[:, 0] + truth[:, 2]) / 2, (truth[:, 1] + truth[:, 3]) / 2
    half = np.hypot(truth[:, 2] - truth[:, 0], truth[:, 3] - truth[:, 1]) / 2
    d = np.hypot(cx[:, None] - tx[None, :], cy[:, None] - ty[None, :]) / np.maximum(half[None, :], 1e-9)
    return np.where(inside, np.clip(1.0 - d, 1e-6, 1.0), 0.0)


def match(
    pred: np.ndarray, scores: np.ndarray | None, truth: np.ndarray, iou: float = 0.5, rule: str = "iou"
) -> tuple[int, int, int]:
    """Greedy one-to-one matching by score: ``(true positives, false positives, false negatives)``.

    ``rule="iou"``: a prediction matches a truth box at IoU >= ``iou``. ``rule="centre"``: it matches
    when its centre lies inside the truth box (looser, for tiny objects such as platelets, whose
    boxes are a few pixels across and drawn loosely); ``iou`` is then ignored.
    """
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    truth = np.asarray(truth, np.float64).reshape(-1, 4)
    if scores is None:
        scores = np.ones(len(pred))
    order = np.argsort(-np.asarray(scores, np.float64))
    if rule == "centre":
        m, iou = centre_matrix(pred, truth), 1e-9
    elif rule == "iou":
        m = iou_matrix(pred, truth)
    else:
        raise ValueError(f"rule must be 'iou' or 'centre', not {rule!r}")
    used = np.zeros(len(truth), bool)
    tp = 0
    for i in order:
        if not len(truth):
            break
        cand = np.where(~used, m[i], -1.0)
        j = int(np.argmax(cand))
        if cand[j] >= iou:
            used[j] = True
            tp += 1
    return tp, len(pred) - tp, len(truth) - tp
