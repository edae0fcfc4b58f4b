"""The backend protocol: cheap constructor, load on ``__enter__``, release on ``__exit__``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """Runs a bundle's model on preprocessed ``N x C x H x W`` float32 batches."""

    name: str
    precision: str

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Return class probabilities ``N x K`` (float32, rows sum to 1)."""
        ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z
