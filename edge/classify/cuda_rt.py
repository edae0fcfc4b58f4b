"""The few CUDA runtime calls the TensorRT path needs, through cuda-python.

cuda-python moved its runtime module: ``cuda.bindings.runtime`` (12.6+, the
only one in 13.x) replaced ``cuda.cudart`` (removed in 13.0). Every function
returns a tuple ``(cudaError_t, *results)``; ``_check`` turns a failure into
one readable ``BackendError``. Nothing here is imported unless the TensorRT
path is used, so the package imports on a machine without CUDA.
"""

from __future__ import annotations

import ctypes
import importlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from hemaedge.edge.errors import BackendError, MissingDependencyError

_MODULES = ("cuda.bindings.runtime", "cuda.cudart")
INSTALL_HINT = (
    "pip install 'hemaedge[jetson]' (cuda-python; on a Jetson match it to JetPack's CUDA: "
    "'cuda-python>=11.4,<12' on JetPack 5, 'cuda-python>=12.2,<13' on JetPack 6)"
)


def load_cudart() -> Any:
    """Import cuda-python's runtime module, new layout first.

    Raises:
        MissingDependencyError: when cuda-python is absent, with the install step.
    """
    errors = []
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise MissingDependencyError(
        f"the TensorRT backend needs cuda-python, which is not installed: {INSTALL_HINT} ({'; '.join(errors)})"
    )


def _check(rt: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on error."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != int(rt.cudaError_t.cudaSuccess):
        name = getattr(err, "name", str(err))
        raise BackendError(f"CUDA call {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def native_handle(obj: Any) -> int:
    """The integer handle of a CUDA object (a stream) as TensorRT's Python API wants it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-python 13+: int(obj) is deprecated there

        return int(get_cuda_native_handle(obj))
    except ImportError:
        return int(obj)


@dataclass(frozen=True)
class GpuInfo:
    """What identifies a GPU for engine compatibility: name and compute capability."""

    name: str
    major: int
    minor: int

    @property
    def compute_capability(self) -> str:
        """``"8.7"``-style compute capability."""
        return f"{self.major}.{self.minor}"

    @property
    def slug(self) -> str:
        """File-name-safe id, e.g. ``orin-sm87`` or ``nvidia-geforce-rtx-4090-sm89``."""
        return gpu_slug(self.name, self.major, self.minor)


def gpu_slug(name: str, major: int, minor: int) -> str:
    """Lower-case, dash-separated GPU name plus ``-sm<cc>``."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return f"{base}-sm{major}{minor}"


class CudaRuntime:
    """Thin, checked wrapper over the cuda-python runtime calls we use.

    Args:
        rt: The cuda-python runtime module (default: imported with ``load_cudart``).
    """

    def __init__(self, rt: Any | None = None):
        self.rt = rt if rt is not None else load_cudart()

    def device_count(self) -> int:
        """Number of CUDA devices (0 when the driver reports none or cannot be loaded)."""
        try:
            res = self.rt.cudaGetDeviceCount()
        except RuntimeError:  # cuda-python 11.x (JetPack 5) raises "Failed to dlopen libcuda.so.1" without a driver
            return 0
        if int(res[0]) != int(self.rt.cudaError_t.cudaSuccess):
            return 0
        return int(res[1])

    def gpu(self, device: int = 0) -> GpuInfo:
        """Name and compute capability of a device."""
        try:
            res = self.rt.cudaGetDeviceProperties(device)
        except RuntimeError as exc:  # no loadable CUDA driver (see device_count)
            raise BackendError(f"CUDA driver not usable: {exc}") from exc
        props = _check(self.rt, res, "cudaGetDeviceProperties")
        name = props.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
        return GpuInfo(str(name).strip(), int(props.major), int(props.minor))

    def malloc(self, nbytes: int) -> int:
        """Device allocation; returns the device pointer as an int."""
        return int(_check(self.rt, self.rt.cudaMalloc(max(1, int(nbytes))), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        """Free a device allocation."""
        _check(self.rt, self.rt.cudaFree(ptr), "cudaFree")

    def malloc_host(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
        """Page-locked host buffer viewed as a numpy array of ``shape``."""
        ptr = int(_check(self.rt, self.rt.cudaMallocHost(max(1, int(nbytes))), "cudaMallocHost"))
        raw = (ctypes.c_byte * int(nbytes)).from_address(ptr)
        return ptr, np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def free_host(self, ptr: int) -> None:
        """Free a page-locked host buffer."""
        _check(self.rt, self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def stream(self) -> Any:
        """A new CUDA stream object."""
        return _check(self.rt, self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def destroy_stream(self, stream: Any) -> None:
        """Destroy a stream."""
        _check(self.rt, self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def htod_async(self, dst: int, host: np.ndarray, stream: Any) -> None:
        """Copy a contiguous host array to device memory on ``stream``."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(
            self.rt, self.rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, kind, stream), "cudaMemcpyAsync(H2D)"
        )

    def htod(self, dst: int, host: np.ndarray) -> None:
        """Blocking host-to-device copy (calibration batches)."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.rt, self.rt.cudaMemcpy(dst, host.ctypes.data, host.nbytes, kind), "cudaMemcpy(H2D)")

    def dtoh_async(self, host: np.ndarray, src: int, stream: Any) -> None:
        """Copy device memory into a contiguous host array on ``stream``."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(
            self.rt, self.rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, kind, stream), "cudaMemcpyAsync(D2H)"
        )

    def sync(self, stream: Any) -> None:
        """Wait for everything queued on ``stream``."""
        _check(self.rt, self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
