"""TensorRT engine files in a bundle: naming, the station's identity, compatibility.

A serialized TensorRT engine runs only on the TensorRT version and GPU model
that built it. Its file name says both, and the manifest entry records them
(plus the precision actually built), so a station can tell before
deserialising whether an engine is its own:

    model.trt<tensorrt-version>.<gpu-slug>.<precision>.engine
    e.g. model.trt8.5.2.2.orin-sm87.int8.engine

Nothing here imports TensorRT at module import time.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from hemaedge.edge.bundle.manifest import Artifact, Manifest
from hemaedge.edge.classify.cuda_rt import CudaRuntime, GpuInfo
from hemaedge.edge.errors import MissingDependencyError

ENGINE_KIND = "engine"
ENGINE_PRECISIONS = ("int8", "fp16", "fp32")
_NAME = re.compile(
    r"^model\.trt(?P<version>[0-9][0-9.]*?)\.(?P<gpu>[a-z0-9-]+)\.(?P<precision>int8|fp16|fp32)\.engine$"
)


def tensorrt_install_hint() -> str:
    """The install step for TensorRT's Python bindings on this kind of machine."""
    if Path("/etc/nv_tegra_release").exists():
        return (
            "TensorRT comes with JetPack: sudo apt-get install python3-libnvinfer python3-libnvinfer-dev "
            "(or the full 'sudo apt-get install nvidia-jetpack'), and make the venv see system packages "
            "(deploy/jetson/install.sh creates it with --system-site-packages)"
        )
    return "pip install tensorrt (NVIDIA's wheel for your CUDA major version, e.g. tensorrt-cu12)"


def load_tensorrt():
    """Import ``tensorrt`` or raise a ``MissingDependencyError`` with the install step."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT is not installed: {tensorrt_install_hint()} ({exc})") from exc


def engine_file_name(trt_version: str, gpu_slug: str, precision: str) -> str:
    """``model.trt<version>.<gpu-slug>.<precision>.engine``."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision must be one of {ENGINE_PRECISIONS}, not {precision!r}")
    return f"model.trt{trt_version}.{gpu_slug}.{precision}.engine"


def parse_engine_file_name(name: str) -> tuple[str, str, str] | None:
    """``(tensorrt_version, gpu_slug, precision)`` from an engine file name, or None."""
    m = _NAME.match(name)
    return (m["version"], m["gpu"], m["precision"]) if m else None


@dataclass(frozen=True)
class Station:
    """What an engine must have been built for to run here."""

    trt_version: str
    gpu: GpuInfo

    @property
    def gpu_slug(self) -> str:
        """The GPU part of engine names built here."""
        return self.gpu.slug


def probe_station(trt=None, cuda: CudaRuntime | None = None, device: int = 0) -> Station:
    """This machine's TensorRT version and GPU.

    Raises:
        MissingDependencyError: TensorRT or cuda-python is absent.
        BackendError: CUDA reports no usable device.
    """
    trt = trt if trt is not None else load_tensorrt()
    cuda = cuda if cuda is not None else CudaRuntime()
    return Station(str(trt.__version__), cuda.gpu(device))


def engine_identity(art: Artifact) -> tuple[str, str, str] | None:
    """``(tensorrt_version, gpu_slug, precision)`` of an engine artifact.

    The manifest details are authoritative; the file name is the fallback
    for a hand-copied engine.
    """
    d = art.details
    if d.get("tensorrt_version") and d.get("gpu_slug") and art.precision:
        return str(d["tensorrt_version"]), str(d["gpu_slug"]), art.precision
    return parse_engine_file_name(art.file)


def engine_mismatch(art: Artifact, station: Station) -> str | None:
    """Why an engine cannot run on this station (None when it can)."""
    ident = engine_identity(art)
    if ident is None:
        return f"{art.file} does not say which TensorRT version and GPU built it"
    version, slug, _ = ident
    problems = []
    if version != station.trt_version:
        problems.append(f"TensorRT {version} (this station has {station.trt_version})")
    if slug != station.gpu_slug:
        problems.append(f"GPU {slug} (this station has {station.gpu_slug})")
    return f"{art.file} was built for " + " and ".join(problems) if problems else None


def build_command(bundle_path: str | Path, precision: str) -> str:
    """The exact command that builds this station's engine."""
    return f"hemaedge build-engine {bundle_path} --precision {precision}"


def find_engine(manifest: Manifest, station: Station, precision: str = "auto") -> tuple[Artifact | None, str]:
    """The bundle's engine for this station, or None and why not.

    Args:
        manifest: The bundle's manifest.
        station: This machine (``probe_station()``).
        precision: ``int8``/``fp16``/``fp32``, or ``auto`` for the fastest
            engine present (int8, then fp16, then fp32).

    Returns:
        ``(artifact, "")`` or ``(None, reason)``; the reason names any
        engines present that belong to other stations.
    """
    engines = [a for a in manifest.artifacts if a.kind == ENGINE_KIND]
    wanted = ENGINE_PRECISIONS if precision == "auto" else (precision,)
    for p in wanted:
        for art in engines:
            if art.precision == p and engine_mismatch(art, station) is None:
                return art, ""
    if not engines:
        return None, "the bundle has no TensorRT engine"
    own = [a for a in engines if engine_mismatch(a, station) is None]
    if own:
        have = ", ".join(sorted({a.precision or "?" for a in own}))
        return None, f"the bundle's engines for this station are {have}, not {precision}"
    return None, "; ".join(engine_mismatch(a, station) or "" for a in engines)


def make_logger(trt, echo=None, min_severity: str = "WARNING"):
    """A TensorRT ``ILogger`` that keeps the messages it sees.

    TensorRT reports why an engine did not build or deserialise only through
    its logger; keeping the messages lets us put the reason in one line.

    Args:
        trt: The imported ``tensorrt`` module.
        echo: Optional callable ``echo(text)`` for warnings and errors as they happen.
        min_severity: Lowest severity kept (``ERROR``, ``WARNING``, ``INFO``, ``VERBOSE``).
    """
    sev = trt.ILogger.Severity
    order = [sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING, sev.INFO, sev.VERBOSE]
    limit = order.index(getattr(sev, min_severity))

    class _KeepingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):
            if severity not in order or order.index(severity) > limit:
                return
            name = getattr(severity, "name", str(severity))
            self.messages.append((name, str(msg)))
            if echo is not None and order.index(severity) <= order.index(sev.WARNING):
                echo(f"TensorRT {name.lower()}: {msg}")

        def last_error(self) -> str:
            for name, msg in reversed(self.messages):
                if "ERROR" in name:
                    return msg
            return self.messages[-1][1] if self.messages else "no message from TensorRT"

    return _KeepingLogger()
