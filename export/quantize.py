"""Static INT8 QDQ quantization with ONNX Runtime (symmetric, per-channel weights, pre-processed graph)."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from edge.errors import UsageError

METHODS = ("minmax", "entropy", "percentile")


def quantize_int8(fp32: Path, out: Path, reader, method: str = "entropy", per_channel: bool = True,
                  symmetric: bool = True, exclude: Sequence[str] = (), percentile: float = 99.999) -> Path:
    """Quantize an FP32 ONNX model to INT8 QDQ.

    Args:
        fp32: The FP32 model.
        out: Where to write the INT8 model.
        reader: A ``CalibrationDataReader`` of preprocessed calibration batches.
        method: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: Per-output-channel weight scales.
        symmetric: Symmetric activations and weights (what TensorRT expects).
        exclude: Node names to keep in float.
        percentile: Percentile for the ``percentile`` method.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # ORT warns via the root logger
    if method not in METHODS:
        raise UsageError(f"calibration method must be one of {METHODS}, not {method!r}")
    cal = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        # ONNX Runtime's calibrators print progress to stdout; keep stdout clean for --json.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
        extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": symmetric}
        if method == "percentile":
            extra["CalibPercentile"] = percentile
        quantize_static(
            str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=cal,
            nodes_to_exclude=list(exclude), extra_options=extra,
        )
    return out
