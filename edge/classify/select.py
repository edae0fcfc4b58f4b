"""Pick the best inference backend this station can run, and say why.

Order for ``preference="auto"``:

1. a TensorRT engine from the bundle built for this station's TensorRT and GPU;
2. ONNX Runtime with its TensorRT execution provider;
3. ONNX Runtime with its CUDA execution provider;
4. on the CPU: **measured**. Every CPU runtime this station has (ONNX Runtime, and OpenVINO when
   the ``openvino`` extra is installed) at every precision asked for is loaded, checked against
   the bundle's golden outputs and timed; the fastest that passes wins. The measurement is cached
   per bundle, station, runtime versions and threads (``hemaedge.edge.classify.measure``).

The returned backend is not loaded yet (use it as a context manager); its ``reason`` attribute
holds the reason too. The reason is one line for people, e.g. ``"TensorRT not installed: using
OpenVINO CPU (int8 ONNX), the fastest of 4 measured here (...): OpenVINO CPU int8 382, ..."``. An
explicit preference (``--backend openvino``, ``ort-cpu``...) is not measured; one that this machine
cannot honour raises ``BackendError`` / ``MissingDependencyError`` with the install step instead of
quietly running something else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from hemaedge.edge.bundle.io import Bundle, load_bundle
from hemaedge.edge.classify.base import Backend
from hemaedge.edge.errors import BackendError, HemaedgeError, MissingDependencyError, UsageError

PREFERENCES = ("auto", "tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu", "openvino")
ALIASES = {
    "trt": "tensorrt",
    "cpu": "ort-cpu",
    "cuda": "ort-cuda",
    "onnxruntime": "ort-cpu",
    "ort": "ort-cpu",
    "ov": "openvino",
}
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


def _require_int8(bundle: Bundle, have: list[str]) -> None:
    """``--precision int8`` on a bundle without an INT8 ONNX model: a one-line UsageError saying what to do."""
    if "int8" not in have:
        raise UsageError(
            f"bundle '{bundle.manifest.name}' has no int8 ONNX model (it has {have}); "
            "use --precision fp32 or re-export with --int8"
        )


def _ort_precision(bundle: Bundle, choice: str, precision: str) -> tuple[str, str]:
    """Which ONNX artifact ONNX Runtime runs, and a note when it differs from the request."""
    have = bundle.manifest.precisions("onnx")
    if precision == "int8":
        _require_int8(bundle, have)
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


def _wanted_precisions(bundle: Bundle, precision: str) -> tuple[list[str], str]:
    """The ONNX precisions a CPU runtime may run for a request, and a note when it differs from it."""
    have = bundle.manifest.precisions("onnx")
    if precision == "int8":
        _require_int8(bundle, have)
        return ["int8"], ""
    if precision == "fp16":
        return ["fp32"], "fp16 is a TensorRT engine precision; the CPU runs the fp32 model"
    if precision == "fp32":
        return ["fp32"], ""
    return [p for p in ("int8", "fp32") if p in have], ""


def _openvino_gate(bundle: Bundle) -> str:
    """Why OpenVINO may not run the bundle's INT8 model (it missed the accuracy gate at export, or its 8-bit kernels
    saturate on this CPU), else ``""``."""
    from hemaedge.edge.classify.openvino import int8_saturation

    saturates = int8_saturation()
    if saturates:
        return saturates
    gate = (bundle.manifest.metrics or {}).get("int8_openvino") or {}
    if gate.get("passed") is False:
        return (
            f"its INT8 on OpenVINO lost {gate.get('drop_points', float('nan')):.2f} points at export "
            f"(gate {gate.get('max_drop', '?')})"
        )
    return ""


def cpu_candidates(bundle: Bundle, precision: str = "auto", threads: int = 0) -> tuple[list[Any], dict[str, str], str]:
    """Every CPU backend x precision this station could run the bundle on.

    Returns:
        ``(candidates, runtimes, note)``: :class:`~hemaedge.edge.classify.measure.Candidate` s, the
        runtimes' versions (``{"onnxruntime": "1.23.2", "openvino": "2026.4.1"}``) and a note about
        the precision request (e.g. fp16 runs fp32 on a CPU).
    """
    from hemaedge.edge.classify.measure import Candidate
    from hemaedge.edge.classify.onnxruntime import OrtBackend, available_providers, onnxruntime_version
    from hemaedge.edge.classify.openvino import OpenVinoBackend, openvino_version

    wanted, note = _wanted_precisions(bundle, precision)
    out: list[Any] = []
    runtimes: dict[str, str] = {}
    if "CPUExecutionProvider" in available_providers():
        runtimes["onnxruntime"] = onnxruntime_version()
        for p in wanted:
            out.append(
                Candidate(
                    f"onnxruntime/{p}",
                    "ONNX Runtime CPU",
                    p,
                    lambda p=p: OrtBackend(bundle, precision=p, providers=["cpu"], threads=threads),
                )
            )
    ov = openvino_version()
    if ov:
        runtimes["openvino"] = ov
        for p in wanted:
            out.append(
                Candidate(
                    f"openvino/{p}",
                    "OpenVINO CPU",
                    p,
                    lambda p=p: OpenVinoBackend(bundle, precision=p, threads=threads),
                    excluded=_openvino_gate(bundle) if p == "int8" else "",
                )
            )
    return out, runtimes, note


def _measured_cpu(
    bundle: Bundle,
    precision: str,
    threads: int,
    notify: Callable[[str], None] | None,
    cache: Any,
    remeasure: bool,
) -> tuple[Any, str]:
    """``--backend auto`` on the CPU: the fastest candidate that reproduces the golden outputs.

    The backend carries what was measured (``measurements``, ``measured_key``) for ``doctor`` and ``bench``.
    """
    from hemaedge.edge.classify.measure import choose

    candidates, runtimes, note = cpu_candidates(bundle, precision, threads)
    if not candidates:
        raise MissingDependencyError("no CPU inference runtime is installed: pip install onnxruntime")
    choice = choose(candidates, bundle, runtimes, threads, cache=cache, notify=notify, remeasure=remeasure)
    backend = choice.candidate.factory()
    with contextlib.suppress(AttributeError):
        backend.measurements = choice.measurements
        backend.measured_key = choice.candidate.key
    return backend, choice.reason + (f"; {note}" if note else "")


def _openvino(bundle: Bundle, precision: str, threads: int) -> tuple[Any, str]:
    """``--backend openvino``: not measured; INT8 when the bundle has it and it passed its gate on OpenVINO."""
    from hemaedge.edge.classify.openvino import OpenVinoBackend, install_hint, openvino_version

    version = openvino_version()
    if not version:
        raise MissingDependencyError(f"--backend openvino: OpenVINO is not installed: {install_hint()}")
    wanted, note = _wanted_precisions(bundle, precision)
    prec = wanted[0]
    gate = _openvino_gate(bundle)
    if precision == "auto" and prec == "int8" and gate:
        prec, note = "fp32", f"{gate}; --precision int8 forces it"
    reason = f"using OpenVINO {version} CPU ({prec} ONNX)" + (f"; {note}" if note else "")
    return OpenVinoBackend(bundle, precision=prec, threads=threads), reason


def select_backend(
    bundle: Bundle | str | os.PathLike,
    preference: str = "auto",
    precision: str = "auto",
    *,
    build_missing: bool = False,
    threads: int = 0,
    trt: Any = None,
    cudart: Any = None,
    notify: Callable[[str], None] | None = None,
    cache: Any = None,
    remeasure: bool = False,
) -> tuple[Backend, str]:
    """Choose the backend for a bundle on this machine.

    Args:
        bundle: A loaded bundle or its directory.
        preference: ``auto``, ``tensorrt``, ``ort-tensorrt``, ``ort-cuda``, ``ort-cpu`` or
            ``openvino`` (aliases: ``trt``, ``cuda``, ``cpu``, ``onnxruntime``, ``ov``).
        precision: ``auto`` (on the CPU: the fastest measured; elsewhere the fastest the backend
            has), ``int8``, ``fp16`` (TensorRT engines only; the others run fp32) or ``fp32``.
        build_missing: With TensorRT present but no engine for this station,
            build one from the bundle's ONNX on ``__enter__`` (takes minutes)
            instead of falling back.
        threads: Inference threads of ONNX Runtime / OpenVINO (0 = their default).
        trt: ``tensorrt`` module override (tests).
        cudart: cuda-python runtime module override (tests).
        notify: Told in one line when ``auto`` starts measuring the CPU backends (default: stderr).
        cache: A ``MeasurementCache`` (default: the per-user one).
        remeasure: Measure the CPU backends again even when a measurement is cached.

    Returns:
        ``(backend, reason)``: a backend not yet entered, and one line saying
        what was chosen and why the better options were not (also ``backend.reason``).

    Raises:
        UsageError: unknown preference/precision, or a precision the bundle lacks.
        BackendError / MissingDependencyError: an explicit preference this
            machine cannot honour (the message names the install step), or no CPU
            backend reproduces the bundle's golden outputs.
    """
    backend, reason = _select(
        bundle, preference, precision, build_missing, threads, trt, cudart, notify, cache, remeasure
    )
    with contextlib.suppress(AttributeError):  # a backend class with __slots__ simply does not carry it
        backend.reason = reason
    return backend, reason


def _select(
    bundle: Bundle | str | os.PathLike,
    preference: str,
    precision: str,
    build_missing: bool,
    threads: int,
    trt: Any,
    cudart: Any,
    notify: Callable[[str], None] | None,
    cache: Any,
    remeasure: bool,
) -> tuple[Backend, str]:
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    pref = normalise_preference(preference)
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if pref == "openvino":
        return _openvino(bundle, precision, threads)
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
    if not have and pref != "auto":
        raise MissingDependencyError("ONNX Runtime is not installed: pip install onnxruntime")
    order = ["ort-tensorrt", "ort-cuda"] if pref in ("auto", "tensorrt") else [pref]
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
    backend, reason = _measured_cpu(bundle, precision, threads, notify, cache, remeasure)
    return backend, f"{skipped}: {reason}" if skipped else reason
