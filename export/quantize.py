"""Static INT8 QDQ quantization with ONNX Runtime (symmetric, per-channel weights, pre-processed graph)."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hemaedge.edge.errors import UsageError

METHODS = ("minmax", "entropy", "percentile")

# Where the Q/DQ pairs go (``export-model --quant-ops``). "weighted": only on the inputs of the operators with
# weights (convolutions, matrix products), never on their outputs: TensorRT's documented Q/DQ placement. A runtime
# then fuses what follows a convolution (bias, SiLU, the residual add) into it and quantizes once, where the next
# weighted operator needs INT8. "all": every operator ONNX Runtime can quantize, outputs included (the SiLU's
# sigmoid and multiply too): its QDQ quantizer's default, and what its own CPU kernels need to keep a ReLU network
# in INT8 from layer to layer, so the ONNX Runtime CPU variant uses it.
QUANT_OPS = ("weighted", "all")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


CALIB_CHUNK_BATCHES = 4  # calibration batches whose activations are held in memory at once
calibration_chunks: list[int] = []  # batches per chunk of the calibrations run in this process (for tests)


class _ListReader:
    """A ``CalibrationDataReader`` over batches already read."""

    def __init__(self, batches: list) -> None:
        self._it = iter(batches)

    def get_next(self):  # noqa: ANN201
        return next(self._it, None)


@contextlib.contextmanager
def bounded_calibration(chunk_batches: int | None = None):
    """Min-max calibration a chunk of ``chunk_batches`` reader batches at a time (bounded memory).

    ONNX Runtime's calibrators keep every intermediate output of every calibration batch
    until the end (an EfficientNet-B0 at 256x256 with 500 images peaked at 16 GB). Min-max
    ranges merge exactly, so inside this context a min-max calibrator is fed one chunk per
    ``collect_data`` call. Histogram calibrators (entropy, percentile) are left to one pass:
    merging their histograms chunk by chunk re-bins them when the range widens, which moved
    scales by up to 21% in our test and turns ORT's stock entropy (one candidate threshold)
    into a different, order-dependent search. For big models use a smaller ``--calib-size``
    with those methods.
    """
    import importlib
    import itertools

    chunk_batches = chunk_batches or CALIB_CHUNK_BATCHES
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    create = getattr(ort_quantize, "create_calibrator", None)
    if create is None:  # pragma: no cover - a future ORT that moved it: one pass, as ORT does
        yield
        return

    def create_bounded(*args, **kwargs):
        calibrator = create(*args, **kwargs)
        if type(calibrator).__name__ != "MinMaxCalibrater":
            return calibrator
        collect = calibrator.collect_data

        def collect_in_chunks(reader) -> None:  # noqa: ANN001
            batches = iter(reader.get_next, None)
            while True:
                chunk = list(itertools.islice(batches, chunk_batches))
                if not chunk:
                    break
                collect(_ListReader(chunk))
                calibration_chunks.append(len(chunk))

        calibrator.collect_data = collect_in_chunks
        return calibrator

    ort_quantize.create_calibrator = create_bounded
    try:
        yield
    finally:
        ort_quantize.create_calibrator = create


def quantize_int8(
    fp32: Path,
    out: Path,
    reader,
    method: str = "entropy",
    per_channel: bool = True,
    symmetric: bool = True,
    exclude: Sequence[str] = (),
    percentile: float = 99.999,
    dynamic_shapes: bool = False,
    ops: str = "all",
) -> Path:
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
        dynamic_shapes: The model takes inputs of any height and width (a detector): ONNX Runtime's symbolic
            shape inference cannot follow those through Resize, so the pre-processing pass skips it.
        ops: Where the Q/DQ pairs go: ``weighted`` or ``all`` (see ``QUANT_OPS``).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # ORT warns via the root logger
    if method not in METHODS:
        raise UsageError(f"calibration method must be one of {METHODS}, not {method!r}")
    if ops not in QUANT_OPS:
        raise UsageError(f"--quant-ops must be one of {QUANT_OPS}, not {ops!r}")
    cal = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        # ONNX Runtime's calibrators print progress to stdout; keep stdout clean for --json.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=dynamic_shapes)
        extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": symmetric}
        if ops == "weighted":
            extra["OpTypesToExcludeOutputQuantization"] = list(WEIGHTED_OPS)
        if method == "percentile":
            extra["CalibPercentile"] = percentile
        with bounded_calibration():
            quantize_static(
                str(pre),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=cal,
                nodes_to_exclude=list(exclude),
                op_types_to_quantize=list(WEIGHTED_OPS) if ops == "weighted" else None,
                extra_options=extra,
            )
    return out
