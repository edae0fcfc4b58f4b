"""ONNX Runtime backend (CPU, CUDA or TensorRT execution provider)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.bundle.io import Bundle
from hemaedge.edge.classify.base import softmax
from hemaedge.edge.errors import BackendError, HemaedgeError, require

_LEVEL_OF: dict[tuple[str, int, int, str], str] = {}  # the graph level chosen per model file in this process
LEVEL_MARGIN = 0.05  # raw output units: the full level is kept unless the basic one is closer to golden by more

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_SHORT = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def available_providers() -> list[str]:
    """Execution providers this ONNX Runtime build offers ([] without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def onnxruntime_version() -> str:
    """ONNX Runtime's version, or ``""`` without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return ""
    return str(ort.__version__)


def _load(path: Path, options: Any, providers: list[str]) -> Any:
    """An ONNX Runtime session, or a one-line BackendError saying why the model cannot load."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own hierarchy; report it in one line
        raise BackendError(f"ONNX Runtime cannot load {Path(path).name}: {str(exc).splitlines()[0]}") from exc


def cpu_session(
    path: Path, options: Callable[[str], Any], distance: Callable[[Any], float] | None = None
) -> tuple[Any, str]:
    """An ONNX Runtime CPU session for ``path`` that computes what the workstation did, and a note (``""``, or why
    the basic graph optimisations run).

    With all optimisations ONNX Runtime fuses an INT8 model's quantized ops into kernels that, on an x86 CPU
    without VNNI (AVX2 only: many laptops and mini-PCs), saturate their 16-bit sums: the shipped INT8 models'
    raw outputs then differ from their golden outputs by up to 3.9 (measured 2026-12-07 on an AVX2-only AMD EPYC,
    ONNX Runtime 1.32; the CPU INT8 variants reproduce them exactly with the basic level, more slowly). The golden
    check's thresholds on probabilities do not always see it (``bloodcnn5``'s large logits hide it, yet 0.3 points
    of its val accuracy go), so the level is chosen by ``distance(session)``, the largest raw |difference| from the
    golden outputs: the full level when it reproduces them exactly or lies within ``LEVEL_MARGIN`` of the basic
    level's distance, else the basic level. The choice is remembered per model file for the process. Without
    ``distance`` (FP32 models compute alike at every level; no golden outputs) the full level runs unchecked.
    ``options(level)`` makes the ``SessionOptions`` for a level."""
    import onnxruntime as ort

    def session(level: str) -> Any:
        return _load(path, options(level), ["CPUExecutionProvider"])

    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns, str(ort.__version__))
    level = _LEVEL_OF.get(key, "all") if distance is not None else "all"
    sess = session(level)
    if distance is not None and key not in _LEVEL_OF:
        d_full = distance(sess)
        if d_full > 1e-6:
            basic = session("basic")
            if distance(basic) + LEVEL_MARGIN < d_full:
                level, sess = "basic", basic
        _LEVEL_OF[key] = level
    if level == "all":
        return sess, ""
    return sess, "basic graph optimisations: the full ones miss the golden outputs on this CPU"


def reference_session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session that computes a model alike on every CPU, for the workstation's measurements
    (INT8 accuracy gates, golden outputs, the quantization search): the basic graph optimisations, whose INT8 kernels
    do not saturate on CPUs without VNNI (``cpu_session``); FP32 models compute the same at every level."""
    return _load(path, session_options("basic", threads), ["CPUExecutionProvider"])


def session_options(level: str = "all", threads: int = 0, spin: bool | None = None, inter_threads: int = 0) -> Any:
    """ONNX Runtime ``SessionOptions``: graph optimisation ``level`` (``"all"`` or ``"basic"``), intra-op ``threads``
    and ``inter_threads`` (0: ONNX Runtime's default), idle threads spinning or not (None: ONNX Runtime's default),
    warnings off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    if threads:
        so.intra_op_num_threads = threads
    if inter_threads:
        so.inter_op_num_threads = inter_threads
    so.log_severity_level = 3
    if spin is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return so


class OrtBackend:
    """Classify with ONNX Runtime.

    Args:
        bundle: A loaded bundle.
        precision: ``"fp32"`` or ``"int8"`` (which ONNX artifact to run).
        providers: Provider short names (``cpu``, ``cuda``, ``tensorrt``) in
            preference order; default: the best this machine has.
        threads: Intra-op threads (0 = ONNX Runtime's default).
        spin: Let idle ONNX Runtime threads spin-wait (faster for back-to-back
            batches on an otherwise idle machine; on a station the capture thread
            needs those cycles, so it is off by default).
        variant: ``auto`` runs the bundle's CPU variant of the model (if it has one) when only the
            CPU provider is in use; ``portable`` always runs the portable model; ``cpu`` prefers the
            CPU variant whatever the provider.
    """

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "int8",
        providers: list[str] | None = None,
        threads: int = 0,
        spin: bool = False,
        variant: str = "auto",
    ):
        self.bundle = bundle
        self.precision = precision
        self.model_path: Path = bundle.onnx_path(precision)
        self.want = [_SHORT.get(p, p) for p in providers] if providers else None
        self.threads = threads
        self.spin = spin
        self.session = None
        self.provider = ""
        self.output_kind = bundle.manifest.output_kind
        self.want_variant = variant
        self.variant = ""  # "cpu" when the CPU variant of the model runs (see __enter__)
        self.reason = ""  # why it was chosen (select_backend sets it)
        self.note = ""  # set when the CPU session runs ONNX Runtime's basic graph optimisations (``cpu_session``)

    @property
    def golden_key(self) -> str:
        """Which of the workstation's golden outputs this backend must reproduce (``int8``, ``int8_cpu``...)."""
        return f"{self.precision}_{self.variant}" if self.variant else self.precision

    @property
    def name(self) -> str:
        """Human name of the backend in use, e.g. ``onnxruntime/CPU``."""
        short = self.provider.replace("ExecutionProvider", "") if self.provider else "?"
        return f"onnxruntime/{short}" + (f" ({self.note})" if self.note else "")

    def __enter__(self) -> OrtBackend:
        ort = require("onnxruntime", "station", "the ONNX Runtime backend")
        have = ort.get_available_providers()
        if self.want:
            missing = [p for p in self.want if p not in have]
            if missing and len(missing) == len(self.want):
                raise BackendError(f"ONNX Runtime here offers {have}, not the requested {self.want}")
            providers = [p for p in self.want if p in have]
        else:
            providers = [p for p in PROVIDER_ORDER if p in have]
        if self.want_variant not in ("auto", "portable", "cpu"):
            raise BackendError(f"model variant must be auto, portable or cpu, not {self.want_variant!r}")
        if self.want_variant == "cpu" or (self.want_variant == "auto" and providers == ["CPUExecutionProvider"]):
            # CPU only: the bundle's CPU variant when it has one (asymmetric INT8: ReLU folds into the
            # quantized conv; TensorRT cannot take it, so GPU providers keep the portable model).
            art = self.bundle.manifest.artifact(self.precision, "onnx", target="cpu")
            self.model_path = self.bundle.file(art)
            self.variant = art.details.get("target") or ""

        def options(level: str) -> Any:
            return session_options(level, self.threads, spin=self.spin)

        if providers == ["CPUExecutionProvider"]:
            self.session, self.note = cpu_session(self.model_path, options, self._golden_distance())
        else:
            self.session = _load(self.model_path, options("all"), providers)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        return self

    def _golden_distance(self) -> Callable[[Any], float] | None:
        """For an INT8 model: a session's largest raw |difference| from the bundle's golden outputs (None: no
        golden outputs, or an FP32 model, which every optimisation level computes alike)."""
        from hemaedge.edge.bundle.golden import load_golden, reference_precision

        if self.precision != "int8":
            return None
        try:
            golden = load_golden(self.bundle)
        except HemaedgeError:
            return None
        ref = golden.outputs[reference_precision(golden, self.golden_key)]

        def distance(sess: Any) -> float:
            name = sess.get_inputs()[0].name
            x = np.ascontiguousarray(golden.inputs, dtype=np.float32)
            out = np.concatenate([sess.run(None, {name: x[i : i + 32]})[0] for i in range(0, len(x), 32)])
            return float(np.abs(out.astype(np.float64) - ref.reshape(out.shape)).max())

        return distance

    def __exit__(self, *exc: object) -> None:
        self.session = None

    def run_raw(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw output for a batch."""
        if self.session is None:
            raise BackendError("backend used outside its 'with' block")
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``N x K`` for a preprocessed batch."""
        if len(batch) == 0:
            return np.zeros((0, len(self.bundle.manifest.classes)), np.float32)
        out = self.run_raw(batch)
        return out.astype(np.float32) if self.output_kind == "probabilities" else softmax(out)
