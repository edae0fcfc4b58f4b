"""OpenVINO backend (CPU): runs the bundle's ONNX models with Intel's OpenVINO runtime.

OpenVINO's CPU plugin fuses a QDQ INT8 model's quantized convolutions with what follows them (SiLU,
the sigmoid of squeeze-and-excitation, residual adds), where ONNX Runtime's CPU kernels run those
in float between a dequantize and a quantize. So the bundle's *portable* INT8 model (the one
TensorRT builds from) runs fast here, and EfficientNet's INT8 is faster than its FP32 instead of
3x slower. It also runs the FP32 model. x86-64 and ARM64 wheels are on PyPI (``pip install
'hemaedge[openvino]'``); there are none for 32-bit ARM.

Floating-point parts run in FP32 (``INFERENCE_PRECISION_HINT=f32``): on CPUs with bfloat16 units
OpenVINO would otherwise pick bf16 by itself, and the FP32 model would no longer reproduce the
workstation's golden outputs (measured: max |Δp| 0.028 on EfficientNet-B0, above the FP32 limit).

``openvino`` is imported only in ``__enter__`` (and in the probes below), so the package imports and
its ONNX Runtime paths run without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.bundle.io import Bundle
from hemaedge.edge.classify.base import softmax
from hemaedge.edge.errors import BackendError, MissingDependencyError

EXTRA = "openvino"
INSTALL_HINT = "pip install 'hemaedge[openvino]'"
NO_WHEEL_MACHINES = ("armv6l", "armv7l", "armhf", "arm")  # no OpenVINO wheels on PyPI for 32-bit ARM


def install_hint() -> str:
    """How to get OpenVINO on this machine (or why it cannot be had from PyPI)."""
    import platform

    machine = platform.machine().lower()
    if machine in NO_WHEEL_MACHINES:
        return f"OpenVINO publishes no wheels for 32-bit ARM ({machine}); use a 64-bit OS or ONNX Runtime"
    return INSTALL_HINT


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependencyError(
            f"the OpenVINO backend needs 'openvino', which is not installed: {install_hint()} ({exc})"
        ) from exc
    return openvino


def openvino_version() -> str:
    """OpenVINO's version (``"2026.4.1"``), or ``""`` when it is not installed."""
    try:
        import openvino
    except ImportError:
        return ""
    full = str(getattr(openvino, "__version__", "") or openvino.get_version())
    return full.split("-")[0]


def compile_config(
    threads: int = 0, device: str = "CPU", pinning: bool = False, streams: bool = False
) -> dict[str, Any]:
    """The properties hemaedge compiles a model with (the station, ``bench`` and the export's gate alike).

    ``streams``: OpenVINO's THROUGHPUT mode (several streams, each with its own threads, one request each)
    instead of LATENCY (one request using every thread).
    """
    hint = "THROUGHPUT" if streams else "LATENCY"
    cfg: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    if device == "CPU":
        cfg["ENABLE_CPU_PINNING"] = bool(pinning)
    return cfg


def compile_onnx(
    path: str | os.PathLike, threads: int = 0, device: str = "CPU", pinning: bool = False, streams: bool = False
) -> Any:
    """Read and compile an ONNX file with OpenVINO; ``BackendError`` (one line) when it cannot."""
    ov = _import_openvino()
    try:
        core = ov.Core()
        cfg = compile_config(threads, device, pinning, streams)
        return core.compile_model(core.read_model(os.fspath(path)), device, cfg)
    except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line C++ trace; report one line
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise BackendError(f"OpenVINO {openvino_version()} cannot load {Path(path).name}: {first}") from exc


class OpenVinoBackend:
    """Classify with OpenVINO on the CPU.

    Args:
        bundle: A loaded bundle.
        precision: ``"fp32"`` or ``"int8"``: which ONNX artifact to run. INT8 runs the portable
            (symmetric QDQ) model, the one the workstation's ``int8`` golden outputs come from.
        threads: Inference threads (0 = OpenVINO's default: one per physical core). With one thread the
            model is compiled for latency (what the station's counting worker runs: a frame's few crops
            per call, one core, the other core segmenting). With more, it is compiled for throughput:
            OpenVINO's streams (on 2 cores: 2 streams of 1 thread), and a batch is split across them
            and run in parallel, which scales better than one request spreading every layer over all
            threads (no synchronisation per layer) and suffers less when a neighbour takes a core.
        device: OpenVINO device name (``"CPU"``; others are not tested).
        pinning: Let OpenVINO pin its threads to cores. Off by default: on a station the capture
            thread shares the cores, and a pinned inference thread cannot move away from it.
    """

    def __init__(
        self, bundle: Bundle, precision: str = "int8", threads: int = 0, device: str = "CPU", pinning: bool = False
    ):
        if precision not in ("fp32", "int8"):
            raise BackendError(f"the OpenVINO backend runs the fp32 or int8 ONNX model, not {precision!r}")
        self.bundle = bundle
        self.precision = precision
        self.model_path: Path = bundle.onnx_path(precision)
        self.threads = threads
        self.device = device
        self.pinning = pinning
        self.output_kind = bundle.manifest.output_kind
        self.reason = ""
        self.version = ""
        self.streams = threads != 1
        self._compiled: Any = None
        self._request: Any = None
        self._requests: list[Any] = []
        self._output: Any = None
        spec = bundle.manifest.input
        self._shape = (spec.channels, spec.height, spec.width)

    @property
    def name(self) -> str:
        """Human name of the backend, e.g. ``openvino/CPU``."""
        return f"openvino/{self.device}"

    @property
    def golden_key(self) -> str:
        """Which golden outputs this backend must reproduce: those of the model file it runs."""
        return self.precision

    def __enter__(self) -> OpenVinoBackend:
        self._compiled = compile_onnx(self.model_path, self.threads, self.device, self.pinning, self.streams)
        self.version = openvino_version()
        n = 1
        if self.streams:
            try:
                n = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            except (RuntimeError, TypeError, ValueError):  # an older plugin without the property: one request
                n = 1
        self._requests = [self._compiled.create_infer_request() for _ in range(n)]
        self._request = self._requests[0]
        self._output = self._compiled.output(0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._request = self._compiled = self._output = None
        self._requests = []

    def run_raw(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw output for a batch (a copy: OpenVINO reuses its output buffer)."""
        if self._request is None:
            raise BackendError("backend used outside its 'with' block")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self._shape:
            raise BackendError(f"input shape {tuple(batch.shape)} does not match the bundle's N x {self._shape}")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        k = min(len(self._requests), len(x))
        if k <= 1:
            res = self._request.infer({0: x}, share_inputs=True)
            return np.array(res[self._output], dtype=np.float32, copy=True)
        parts = np.array_split(x, k)  # contiguous row blocks; each request runs on its own stream
        for req, part in zip(self._requests, parts):
            req.start_async({0: part}, share_inputs=True)
        for req in self._requests[:k]:
            req.wait()
        return np.concatenate([np.array(r.get_tensor(self._output).data, dtype=np.float32) for r in self._requests[:k]])

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``N x K`` for a preprocessed batch."""
        if len(batch) == 0:
            return np.zeros((0, len(self.bundle.manifest.classes)), np.float32)
        out = self.run_raw(batch)
        return out if self.output_kind == "probabilities" else softmax(out)
