"""ONNX Runtime calibration reader over an ImageSet, using the runtime's preprocessing."""

from __future__ import annotations

import numpy as np
from hemaedge.calibration.datasets import ImageSet, batches


def make_reader(images: ImageSet, spec, idx: np.ndarray, input_name: str = "input", batch: int = 32):
    """An ``onnxruntime.quantization.CalibrationDataReader`` yielding preprocessed batches.

    Args:
        images: The calibration image set (never the validation split).
        spec: The bundle InputSpec (same preprocessing as the station).
        idx: Which images to use.
        input_name: The model's input name.
        batch: Images per calibration batch.
    """
    from onnxruntime.quantization import CalibrationDataReader

    idx = equal_batches(np.asarray(idx), batch)
    bsize = calibration_batch(len(idx), batch)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches(images, spec, idx, bsize))

        def get_next(self):
            nxt = next(self._it, None)
            return None if nxt is None else {input_name: nxt[0]}

        def rewind(self) -> None:
            self._it = iter(batches(images, spec, idx, bsize))

    return _Reader()


def equal_batches(idx: np.ndarray, batch: int = 32, smallest: int = 8) -> np.ndarray:
    """Trim ``idx`` so it splits into equal batches.

    ONNX Runtime's histogram calibrators (entropy, percentile) stack per-batch
    activations and fail on a short last batch. Prefer a batch size that
    divides ``len(idx)``; otherwise drop the remainder (at most ``batch - 1``).
    """
    n = len(idx)
    if n <= batch:
        return idx
    for b in range(batch, smallest - 1, -1):
        if n % b == 0:
            return idx
    return idx[: n - n % batch]


def calibration_batch(n: int, batch: int = 32, smallest: int = 8) -> int:
    """The batch size ``make_reader`` uses for ``n`` images (see ``equal_batches``)."""
    if n <= batch:
        return n
    return next((b for b in range(batch, smallest - 1, -1) if n % b == 0), batch)
