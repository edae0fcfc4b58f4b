"""ONNX Runtime backend (CPU, CUDA or TensorRT execution provider)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from hemaedge.edge.bundle.io import Bundle
from hemaedge.edge.classify.base import softmax
from hemaedge.edge.errors import BackendError, require

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

    @property
    def golden_key(self) -> str:
        """Which of the workstation's golden outputs this backend must reproduce (``int8``, ``int8_cpu``...)."""
        return f"{self.precision}_{self.variant}" if self.variant else self.precision

    @property
    def name(self) -> str:
        """Human name of the backend in use, e.g. ``onnxruntime/CPU``."""
        short = self.provider.replace("ExecutionProvider", "") if self.provider else "?"
        return f"onnxruntime/{short}"

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
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        try:
            self.session = ort.InferenceSession(os.fspath(self.model_path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own hierarchy; report it in one line
            raise BackendError(f"ONNX Runtime cannot load {self.model_path.name}: {str(exc).splitlines()[0]}") from exc
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        return self

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
