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

import functools
import os
import threading
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


PROBE = Path(__file__).with_name("int8_probe.onnx")  # written by tools/make_int8_probe.py
PROBE_INPUT = (1, 64, 6, 6)  # all ones
PROBE_TOLERANCE = 0.05  # relative: rounding moves an output by one step of its grid (1 %); saturation halves it


@functools.lru_cache(maxsize=1)
def int8_saturation() -> str:
    """Why OpenVINO's INT8 must not run on this CPU, or ``""`` when its 8-bit arithmetic is exact (or OpenVINO is
    not installed).

    The fast 8-bit kernels of x86 CPUs with AVX2 but no VNNI add pairs of 8-bit products in 16 bits and saturate
    (``docs/openvino.md``): the bundle's golden check can still pass (``bloodcnn5``'s large logits hide it), yet
    its accuracy goes. Flags in ``/proc/cpuinfo`` say that only on Linux x86; this runs the kernels themselves on a
    probe (``int8_probe.onnx``: a pointwise, a 3x3 and a depthwise quantized convolution whose every pair of products
    exceeds 16 bits) and compares them with the workstation's reference computation (ONNX Runtime's basic graph
    level, ``reference_session``), so it holds on any OS and any CPU, ARM included. About 0.2 s, once per process.
    """
    from hemaedge.edge.classify.onnxruntime import reference_session

    x = np.ones(PROBE_INPUT, np.float32)
    try:
        compiled = compile_onnx(PROBE, threads=1)
        result = compiled([x])
        got = [np.asarray(result[out]) for out in compiled.outputs]
        ref = reference_session(PROBE, threads=1).run([o.any_name for o in compiled.outputs], {"x": x})
    except MissingDependencyError:
        return ""
    except Exception as exc:  # a broken install: do not trust what could not be checked
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return f"OpenVINO's 8-bit arithmetic could not be checked on this CPU ({first})"
    for out, g, r in zip(compiled.outputs, got, ref):
        if np.abs(g - r).max() > PROBE_TOLERANCE * np.abs(r).max():
            return (
                f"OpenVINO's INT8 kernels saturate on this CPU (its 8-bit check, a {out.any_name} convolution, read "
                f"{float(np.abs(g).max()):.4g} where exact sums give {float(np.abs(r).max()):.4g}, as x86 CPUs with "
                "AVX2 but no VNNI do): bloodcnn5 on BCCD val read 0.80 with them, against 0.88 with ONNX Runtime's INT8"
            )
    return ""


STATIC_AFTER = 2  # a batch size seen this often gets a static-shape model of its own (see OpenVinoBackend)
STATIC_MAX_BATCH = 32
STATIC_MAX_MODELS = 8


class _Compiled:
    """A compiled model, its infer requests (one per stream) and its output port."""

    def __init__(self, compiled: Any, streams: bool):
        n = 1
        if streams:
            try:
                n = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            except (RuntimeError, TypeError, ValueError):  # an older plugin without the property: one request
                n = 1
        self.compiled = compiled
        self.requests = [compiled.create_infer_request() for _ in range(n)]
        self.output = compiled.output(0)


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
        static_shapes: Give each batch size seen repeatedly (up to ``STATIC_MAX_BATCH``) a model compiled
            for exactly that size, in a background thread; until it is ready the dynamic-batch model
            runs it. With a static batch OpenVINO folds the shape arithmetic of EfficientNet's
            squeeze-and-excitation reshapes into constants: measured 15-34% more crops per CPU-second at
            batches of 1-4 (the station's: one frame's new cells), 9% at 16. Compiling takes seconds for
            a 256-px model, hence in the background; :meth:`settle` waits for it (benchmarks).
    """

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "int8",
        threads: int = 0,
        device: str = "CPU",
        pinning: bool = False,
        static_shapes: bool = True,
    ):
        if precision not in ("fp32", "int8"):
            raise BackendError(f"the OpenVINO backend runs the fp32 or int8 ONNX model, not {precision!r}")
        self.bundle = bundle
        self.precision = precision
        self.model_path: Path = bundle.onnx_path(precision)
        self.threads = threads
        self.device = device
        self.pinning = pinning
        self.static_shapes = static_shapes
        self.output_kind = bundle.manifest.output_kind
        self.reason = ""
        self.version = ""
        self.streams = threads != 1
        self._core: Any = None
        self._dynamic: _Compiled | None = None
        self._static: dict[int, _Compiled] = {}
        self._seen: dict[int, int] = {}
        self._pending: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._pool: Any = None
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

    @property
    def static_batches(self) -> list[int]:
        """The batch sizes that have a static-shape model ready."""
        return sorted(self._static)

    def _compile(self, batch: int | None) -> _Compiled:
        try:
            model = self._core.read_model(os.fspath(self.model_path))
            if batch is not None:
                model.reshape([batch, *self._shape])
            cfg = compile_config(self.threads, self.device, self.pinning, self.streams)
            return _Compiled(self._core.compile_model(model, self.device, cfg), self.streams)
        except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line C++ trace; report one line
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise BackendError(f"OpenVINO {self.version} cannot load {self.model_path.name}: {first}") from exc

    def __enter__(self) -> OpenVinoBackend:
        ov = _import_openvino()
        self.version = openvino_version()
        self._core = ov.Core()
        self._dynamic = self._compile(None)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            pending, pool = list(self._pending.values()), self._pool
            self._pool = None
        for fut in pending:
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True)  # a compile already running finishes (seconds at most)
        self._dynamic = None
        self._static, self._seen, self._pending = {}, {}, {}
        self._core = None

    def settle(self, timeout: float | None = 120.0) -> None:
        """Wait until the static-shape models being compiled are ready (benchmarks call it after a warm-up)."""
        import concurrent.futures

        with self._lock:
            pending = list(self._pending.values())
        if pending:
            concurrent.futures.wait(pending, timeout=timeout)

    def _compile_static(self, batch: int) -> None:
        try:
            self._static[batch] = self._compile(batch)
        except BackendError:
            pass  # the dynamic-batch model keeps serving this size
        finally:
            with self._lock:
                self._pending.pop(batch, None)

    def _model_for(self, batch: int) -> _Compiled:
        """The static-shape model for this batch size when ready, else the dynamic one (and maybe start a compile)."""
        ready = self._static.get(batch)
        if ready is not None:
            return ready
        if self.static_shapes and batch <= STATIC_MAX_BATCH:
            with self._lock:
                self._seen[batch] = self._seen.get(batch, 0) + 1
                start = (
                    self._seen[batch] >= STATIC_AFTER
                    and batch not in self._pending
                    and len(self._static) + len(self._pending) < STATIC_MAX_MODELS
                )
                if start:
                    if self._pool is None:
                        import concurrent.futures

                        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hemaedge-ov-compile")
                    self._pending[batch] = self._pool.submit(self._compile_static, batch)
        assert self._dynamic is not None
        return self._dynamic

    def run_raw(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw output for a batch (a copy: OpenVINO reuses its output buffers)."""
        if self._dynamic is None:
            raise BackendError("backend used outside its 'with' block")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self._shape:
            raise BackendError(f"input shape {tuple(batch.shape)} does not match the bundle's N x {self._shape}")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        k = min(len(self._dynamic.requests), len(x))
        if k <= 1:
            model = self._model_for(len(x))
            res = model.requests[0].infer({0: x}, share_inputs=True)
            return np.array(res[model.output], dtype=np.float32, copy=True)
        parts = np.array_split(x, k)  # contiguous row blocks; request i runs on stream i
        running = []
        for i, part in enumerate(parts):
            model = self._model_for(len(part))
            if i >= len(model.requests):  # pragma: no cover - same config, same number of requests
                model = self._dynamic
            req = model.requests[i]
            req.start_async({0: part}, share_inputs=True)
            running.append((req, model.output))
        for req, _ in running:
            req.wait()
        return np.concatenate([np.array(req.get_tensor(out).data, dtype=np.float32) for req, out in running])

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``N x K`` for a preprocessed batch."""
        if len(batch) == 0:
            return np.zeros((0, len(self.bundle.manifest.classes)), np.float32)
        out = self.run_raw(batch)
        return out if self.output_kind == "probabilities" else softmax(out)
