"""Test-time views: each crop is classified as it is and flipped / turned, and its class probabilities averaged.

A white cell on a smear has no up, down, left or right, and the models are trained with any-angle rotation and
flips, so the views are the same cell to the model; averaging them removes part of the error that depends on how
a cell happened to lie. The bundle says how many views (``views`` in the manifest, 1 when absent: an older
hemaedge ignores it and classifies each crop once). Views are exact pixel permutations (no resampling), so every
backend and precision sees the crops it was checked on.

``views``: 1 (the crop), 2 (+ mirrored left-right), 4 (+ mirrored top-bottom, + turned 90 degrees), 8 (all eight
turns and mirrors). 4 and 8 need square inputs.
"""

from __future__ import annotations

import numpy as np

VIEWS = (1, 2, 4, 8)


# (mirrored left-right first?, then turned k x 90 degrees): 1 view the crop; 2 + mirrored; 4 + mirrored top-bottom
# (mirrored, turned 180) + turned 90; 8 the other four
ORDER = ((0, 0), (1, 0), (1, 2), (0, 1), (0, 2), (0, 3), (1, 1), (1, 3))


def _view(batch: np.ndarray, mirror: int, turns: int) -> np.ndarray:
    """One view of an ``N x C x H x W`` batch."""
    return np.rot90(batch[..., ::-1] if mirror else batch, turns, axes=(2, 3))


def expand(batch: np.ndarray, views: int) -> np.ndarray:
    """The batch in ``views`` views, view-major: ``views * N x C x H x W`` (contiguous)."""
    if views == 1:
        return batch
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, not {views}")
    return np.ascontiguousarray(np.concatenate([_view(batch, m, k) for m, k in ORDER[:views]]))


def merge(probabilities: np.ndarray, views: int) -> np.ndarray:
    """Average the class probabilities of each crop's views (rows as ``expand`` ordered them): ``N x K``."""
    if views == 1:
        return probabilities
    p = np.asarray(probabilities, np.float32)
    return p.reshape(views, len(p) // views, *p.shape[1:]).mean(axis=0)
