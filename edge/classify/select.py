"""Pick the best inference backend this station can run, and say why.

Order for ``preference="auto"``:

1. a TensorRT engine from the bundle built for this station's TensorRT and GPU;
2. ONNX Runtime with its TensorRT execution provider;
3. ONNX Runtime with its CUDA execution provider;
4. ONNX Runtime on the CPU.

The returned backend is not loaded yet (use it as a context manager). The
reason is one line for people, e.g. ``"TensorRT not installed: using ONNX
Runtime CPU (int8 ONNX)"``. An explicit preference that this machine cannot
honour raises ``BackendError`` with the install step instead of quietly
running something else.
"""

from __future__ import annotations

import os
from typing import Any

from hemaedge.edge.bundle.io import Bundle, load_bundle
from hemaedge.edge.classify.base import Backend
from hemaedge.edge.errors import BackendError, HemaedgeError, MissingDependencyError, UsageError

PREFERENCES = ("auto", "tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu")
ALIASES = {"trt": "tensorrt", "cpu": "ort-cpu", "cuda": "ort-cuda", "onnxruntime": "ort-cpu", "ort": "ort-cpu"}
PRECISIONS = ("auto", "int8", "fp16", "fp32")

# ONNX Runtime provider short names (OrtBackend's) per choice, in the order handed to the session.
_ORT_CHOICES = {
    "ort-tensorrt": (["tensorrt", "cuda", "cpu"], "TensorrtExecutionProvider", "ONNX Runtime TensorRT EP"),
    "ort-cuda": (["cuda", "cpu"], "CUDAExecutionProvider", "ONNX Runtime CUDA"),
    "ort-cpu": (["cpu"], "CPUExecutionProvider", "ONNX Runtime CPU"),
}
_ORT_INSTALL = {
    "TensorrtExecutionProvider": "install an onnxruntime-gpu build with TensorRT (on a Jetson: the wheel for your JetPack "
    "from the Jetson Zoo / jetson-ai-lab index; see deploy/jetson/README.md)",
    "CUDAExecutionProvider": "pip install onnxruntime-gpu (on a Jetson: the wheel for your JetPack; see deploy/jetson/README.md)",
    "CPUExecutionProvider": "pip install onnxruntime",
}


def normalise_preference(preference: str) -> str:
    """Canonical backend preference (accepts aliases such as ``cpu``/``cuda``/``trt``)."""
    p = ALIASES.get(preference.lower(), preference.lower())
    if p not in PREFERENCES:
        raise UsageError(f"unknown backend {preference!r}: choose one of {', '.join(PREFERENCES)}")
    return p


def _ort_precision(bundle: Bundle, choice: str, precision: str) -> tuple[str, str]:
    """Which ONNX artifact ONNX Runtime runs, and a note when it differs from the request."""
    have = bundle.manifest.precisions("onnx")
    if precision == "int8":
        if "int8" not in have:
            raise UsageError(
                f"bundle '{bundle.manifest.name}' has no int8 ONNX model (it has {have}); "
                "use --precision fp32 or re-export with --int8"
            )
        return "int8", ""
    if precision == "fp16":
        return "fp32", "fp16 is a TensorRT engine precision; ONNX Runtime runs the fp32 model"
    if precision == "fp32":
        return "fp32", ""
    # auto: INT8 pays off on the CPU for most models; ONNX Runtime's GPU providers run the fp32 model
    # (QDQ INT8 on the CUDA EP is fake-quantised and no faster).
    if choice == "ort-cpu" and "int8" in have:
        speed = (bundle.manifest.metrics or {}).get("cpu_speed") or {}
        if speed.get("int8") and speed.get("fp32") and speed["int8"] < speed["fp32"]:
            return "fp32", (
                f"INT8 ran slower than FP32 on CPU at export ({speed['int8']:.0f} vs {speed['fp32']:.0f} "
                "crops/s): ONNX Runtime's CPU kernels do not fuse this model's INT8; --precision int8 forces it"
            )
        return "int8", ""
    return "fp32", ""


def _try_tensorrt(bundle: Bundle, precision: str, build_missing: bool, trt: Any, cudart: Any) -> tuple[Any, str]:
    """A TensorRT backend for this station, or None and the one-line reason."""
    from hemaedge.edge.classify.cuda_rt import CudaRuntime
    from hemaedge.edge.classify.engines import build_command, find_engine, load_tensorrt, probe_station
    from hemaedge.edge.classify.tensorrt import TensorRTBackend

    try:
        trt = trt if trt is not None else load_tensorrt()
    except MissingDependencyError:
        return None, "TensorRT not installed"
    try:
        cuda = CudaRuntime(cudart)
        station = probe_station(trt, cuda)
    except MissingDependencyError:
        return None, "cuda-python not installed (the TensorRT backend needs it: pip install 'hemaedge[jetson]')"
    except HemaedgeError as exc:
        return None, f"TensorRT present but no usable CUDA GPU ({exc})"
    art, why = find_engine(bundle.manifest, station, precision)
    if art is None and not build_missing:
        want = precision if precision != "auto" else "int8"
        return None, f"no TensorRT engine for this station ({why}; build one with: {build_command(bundle.path, want)})"
    backend = TensorRTBackend(bundle, precision=precision, artifact=art, rebuild=build_missing, trt=trt, cudart=cudart)
    if art is None:
        return backend, f"TensorRT {station.trt_version} on {station.gpu.name}: building an engine first ({why})"
    return backend, f"TensorRT {station.trt_version} engine {art.file} ({art.precision}) on {station.gpu.name}"


def select_backend(
    bundle: Bundle | str | os.PathLike,
    preference: str = "auto",
    precision: str = "auto",
    *,
    build_missing: bool = False,
    threads: int = 0,
    trt: Any = None,
    cudart: Any = None,
) -> tuple[Backend, str]:
    """Choose the backend for a bundle on this machine.

    Args:
        bundle: A loaded bundle or its directory.
        preference: ``auto``, ``tensorrt``, ``ort-tensorrt``, ``ort-cuda`` or
            ``ort-cpu`` (aliases: ``trt``, ``cuda``, ``cpu``, ``onnxruntime``).
        precision: ``auto`` (the fastest the chosen backend has), ``int8``,
            ``fp16`` (TensorRT engines only; ONNX Runtime runs fp32) or ``fp32``.
        build_missing: With TensorRT present but no engine for this station,
            build one from the bundle's ONNX on ``__enter__`` (takes minutes)
            instead of falling back.
        threads: ONNX Runtime intra-op threads (0 = its default).
        trt: ``tensorrt`` module override (tests).
        cudart: cuda-python runtime module override (tests).

    Returns:
        ``(backend, reason)``: a backend not yet entered, and one line saying
        what was chosen and why the better options were not.

    Raises:
        UsageError: unknown preference/precision, or a precision the bundle lacks.
        BackendError / MissingDependencyError: an explicit preference this
            machine cannot honour (the message names the install step).
    """
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    pref = normalise_preference(preference)
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    skipped = ""
    if pref in ("auto", "tensorrt"):
        backend, why = _try_tensorrt(bundle, precision, build_missing, trt, cudart)
        if backend is not None:
            return backend, f"using {why}"
        if pref == "tensorrt":
            from hemaedge.edge.classify.engines import tensorrt_install_hint

            hint = f": {tensorrt_install_hint()}" if why == "TensorRT not installed" else ""
            raise BackendError(f"--backend tensorrt is not possible here: {why}{hint}")
        skipped = why

    from hemaedge.edge.classify.onnxruntime import OrtBackend, available_providers

    have = available_providers()
    if not have:
        raise MissingDependencyError("ONNX Runtime is not installed: pip install onnxruntime")
    order = list(_ORT_CHOICES) if pref in ("auto", "tensorrt") else [pref]
    for choice in order:
        providers, provider, label = _ORT_CHOICES[choice]
        if provider not in have:
            if pref == choice:
                raise BackendError(
                    f"--backend {choice}: this ONNX Runtime offers {have}, not {provider}: {_ORT_INSTALL[provider]}"
                )
            continue
        ort_precision, note = _ort_precision(bundle, choice, precision)
        backend = OrtBackend(bundle, precision=ort_precision, providers=providers, threads=threads)
        reason = f"using {label} ({ort_precision} ONNX)" + (f"; {note}" if note else "")
        return backend, f"{skipped}: {reason}" if skipped else reason
    raise BackendError(f"ONNX Runtime here offers {have}, none of which hemaedge can use")
