"""TensorRT backend: a bundle's engine on this station's GPU.

Same lifecycle as ``OrtBackend``: the constructor is cheap; ``__enter__``
checks that the engine belongs to this station (TensorRT version and GPU),
deserialises it, creates the execution context and a CUDA stream; ``classify``
copies a batch host-to-device, executes on the stream, copies back and
synchronises; ``__exit__`` frees everything.

TensorRT has two Python I/O APIs. The name-based tensor API
(``num_io_tensors`` / ``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``) exists from 8.5 and is the only one in 10.x; the
bindings API (``num_bindings`` / ``set_binding_shape`` / ``execute_async_v2``)
is 8.x only. Two small adapter classes hide the difference.

Host and device buffers are allocated once per batch-size bucket (powers of
two up to the engine profile's maximum) and reused; larger batches are split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.bundle.io import Bundle, load_bundle
from hemaedge.edge.bundle.manifest import Artifact
from hemaedge.edge.classify.base import softmax
from hemaedge.edge.classify.cuda_rt import CudaRuntime, native_handle
from hemaedge.edge.classify.engines import (
    build_command,
    engine_mismatch,
    find_engine,
    load_tensorrt,
    make_logger,
    probe_station,
)
from hemaedge.edge.errors import BackendError


class EngineMismatchError(BackendError):
    """The bundle's engine was built for another TensorRT version or GPU (or none exists)."""


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


class TensorIO:
    """TensorRT >= 8.5 name-based tensor API (the only one in 10.x)."""

    api = "tensor"

    def __init__(self, trt, engine, context):
        self.context = context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise BackendError(f"engine has inputs {ins} and outputs {outs}; a classifier needs one of each")
        self.input, self.output = ins[0], outs[0]
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input)))
        self.output_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output)))
        self.output_dims = _dims(engine.get_tensor_shape(self.output))
        lo, _, hi = engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])

    def set_batch(self, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(self.input, shape):
            raise BackendError(
                f"TensorRT refused input shape {shape} (profile batch {self.min_batch}..{self.max_batch})"
            )

    def output_shape(self) -> tuple[int, ...]:
        return _dims(self.context.get_tensor_shape(self.output))

    def execute(self, d_in: int, d_out: int, stream: int) -> None:
        self.context.set_tensor_address(self.input, d_in)
        self.context.set_tensor_address(self.output, d_out)
        if not self.context.execute_async_v3(stream):
            raise BackendError("TensorRT execute_async_v3 failed")


class BindingIO:
    """TensorRT 8.x bindings API (removed in 10.0)."""

    api = "bindings"

    def __init__(self, trt, engine, context):
        self.context = context
        n = engine.num_bindings
        ins = [i for i in range(n) if engine.binding_is_input(i)]
        outs = [i for i in range(n) if not engine.binding_is_input(i)]
        if len(ins) != 1 or len(outs) != 1:
            raise BackendError(f"engine has {len(ins)} inputs and {len(outs)} outputs; a classifier needs one of each")
        self.n_bindings = n
        self.in_idx, self.out_idx = ins[0], outs[0]
        self.input, self.output = engine.get_binding_name(self.in_idx), engine.get_binding_name(self.out_idx)
        self.input_dtype = np.dtype(trt.nptype(engine.get_binding_dtype(self.in_idx)))
        self.output_dtype = np.dtype(trt.nptype(engine.get_binding_dtype(self.out_idx)))
        self.output_dims = _dims(engine.get_binding_shape(self.out_idx))
        lo, _, hi = engine.get_profile_shape(0, self.in_idx)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])

    def set_batch(self, shape: tuple[int, ...]) -> None:
        if not self.context.set_binding_shape(self.in_idx, shape):
            raise BackendError(
                f"TensorRT refused input shape {shape} (profile batch {self.min_batch}..{self.max_batch})"
            )

    def output_shape(self) -> tuple[int, ...]:
        return _dims(self.context.get_binding_shape(self.out_idx))

    def execute(self, d_in: int, d_out: int, stream: int) -> None:
        bindings = [0] * self.n_bindings
        bindings[self.in_idx], bindings[self.out_idx] = d_in, d_out
        if not self.context.execute_async_v2(bindings, stream):
            raise BackendError("TensorRT execute_async_v2 failed")


def make_io(trt, engine, context) -> TensorIO | BindingIO:
    """The adapter for this TensorRT: tensor API where it exists, else bindings."""
    if hasattr(engine, "num_io_tensors") and hasattr(context, "execute_async_v3"):
        return TensorIO(trt, engine, context)
    return BindingIO(trt, engine, context)


@dataclass
class _Buffers:
    capacity: int
    d_in: int
    d_out: int
    h_in_ptr: int
    h_out_ptr: int
    h_in: np.ndarray
    h_out: np.ndarray


class TensorRTBackend:
    """Classify with a TensorRT engine from the bundle.

    Args:
        bundle: A loaded bundle (or its path).
        precision: ``int8``/``fp16``/``fp32``, or ``auto`` for the fastest
            engine this station has.
        artifact: A specific engine artifact (default: found by ``precision``).
        rebuild: When the bundle has no engine for this station, build one
            from its ONNX (minutes) instead of refusing.
        build_options: Keyword arguments for ``trt_build.build_for_bundle``
            when rebuilding (e.g. ``allow_fp16_fallback=True``).
        trt: The ``tensorrt`` module (tests pass a fake; default: imported).
        cudart: The cuda-python runtime module (default: imported).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        precision: str = "auto",
        artifact: Artifact | None = None,
        rebuild: bool = False,
        build_options: dict | None = None,
        trt: Any = None,
        cudart: Any = None,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.precision = artifact.precision if artifact is not None and artifact.precision else precision
        self.artifact = artifact
        self.rebuild = rebuild
        self.build_options = dict(build_options or {})
        self._trt = trt
        self._cudart = cudart
        self.output_kind = self.bundle.manifest.output_kind
        self.engine = self.context = self.runtime = self.io = self.stream = None
        self.cuda: CudaRuntime | None = None
        self.buffers: dict[int, _Buffers] = {}
        self.gpu_name = ""
        self.notes: list[str] = []

    @property
    def name(self) -> str:
        """Human name, e.g. ``tensorrt/int8 (Orin)``."""
        return f"tensorrt/{self.precision}" + (f" ({self.gpu_name})" if self.gpu_name else "")

    # -- lifecycle -------------------------------------------------------------------------------
    def _resolve(self, trt, station) -> Artifact:
        if self.artifact is not None:
            why = engine_mismatch(self.artifact, station)
            if why is None:
                return self.artifact
        else:
            art, why = find_engine(self.bundle.manifest, station, self.precision)
            if art is not None:
                return art
        precision = self.precision if self.precision != "auto" else "int8"
        if not self.rebuild:
            raise EngineMismatchError(
                f"{why}: build this station's engine with: {build_command(self.bundle.path, precision)}"
            )
        from hemaedge.edge.classify.trt_build import build_for_bundle

        self.notes.append(f"{why}: rebuilding from the bundle's ONNX")
        result = build_for_bundle(
            self.bundle.path, precision=precision, trt=trt, cudart=self._cudart, **self.build_options
        )
        self.notes.extend(result.notes)
        self.bundle = load_bundle(self.bundle.path)
        return next(a for a in self.bundle.manifest.artifacts if a.file == result.path.name)

    def __enter__(self) -> TensorRTBackend:
        trt = self._trt if self._trt is not None else load_tensorrt()
        self.cuda = CudaRuntime(self._cudart)
        station = probe_station(trt, self.cuda)
        art = self._resolve(trt, station)
        self.artifact, self.precision, self.gpu_name = art, art.precision or self.precision, station.gpu.name
        path = self.bundle.file(art)
        logger = make_logger(trt)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            self.runtime = None
            raise EngineMismatchError(
                f"TensorRT {station.trt_version} cannot load {art.file} ({logger.last_error()}): "
                f"rebuild it here with: {build_command(self.bundle.path, self.precision)}"
            )
        self.context = self.engine.create_execution_context()
        self.io = make_io(trt, self.engine, self.context)
        self.stream = self.cuda.stream()
        self.sample_dims = self._sample_dims()
        return self

    def _sample_dims(self) -> tuple[int, ...]:
        """Per-sample output dims (everything after the batch axis); refuses dynamic ones."""
        dims = self.io.output_dims[1:]
        if any(d < 0 for d in dims):
            raise BackendError(f"engine output {self.io.output} has dynamic non-batch dims {self.io.output_dims}")
        return dims

    def __exit__(self, *exc: object) -> None:
        cuda = self.cuda
        if cuda is not None:
            for buf in self.buffers.values():
                cuda.free(buf.d_in)
                cuda.free(buf.d_out)
                cuda.free_host(buf.h_in_ptr)
                cuda.free_host(buf.h_out_ptr)
            if self.stream is not None:
                cuda.destroy_stream(self.stream)
        self.buffers = {}
        self.stream = None
        # Release in dependency order: context before engine before runtime.
        self.io = None
        self.context = None
        self.engine = None
        self.runtime = None

    # -- running ---------------------------------------------------------------------------------
    def _buffers_for(self, n: int, sample_shape: tuple[int, ...]) -> _Buffers:
        cap = 1
        while cap < n:
            cap *= 2
        cap = min(cap, self.io.max_batch)
        buf = self.buffers.get(cap)
        if buf is None:
            assert self.cuda is not None
            in_shape, out_shape = (cap, *sample_shape), (cap, *self.sample_dims)
            in_bytes = int(np.prod(in_shape)) * self.io.input_dtype.itemsize
            out_bytes = int(np.prod(out_shape)) * self.io.output_dtype.itemsize
            h_in_ptr, h_in = self.cuda.malloc_host(in_bytes, self.io.input_dtype, in_shape)
            h_out_ptr, h_out = self.cuda.malloc_host(out_bytes, self.io.output_dtype, out_shape)
            buf = _Buffers(
                cap, self.cuda.malloc(in_bytes), self.cuda.malloc(out_bytes), h_in_ptr, h_out_ptr, h_in, h_out
            )
            self.buffers[cap] = buf
        return buf

    def run_raw(self, batch: np.ndarray) -> np.ndarray:
        """The engine's raw output for a preprocessed ``N x C x H x W`` batch."""
        if self.context is None or self.cuda is None:
            raise BackendError("backend used outside its 'with' block")
        batch = np.asarray(batch)
        sample_shape = tuple(batch.shape[1:])
        handle = native_handle(self.stream)
        outs = []
        for start in range(0, len(batch), self.io.max_batch):
            chunk = batch[start : start + self.io.max_batch]
            n = len(chunk)
            if n < self.io.min_batch:
                raise BackendError(f"engine profile needs at least {self.io.min_batch} samples per batch, got {n}")
            self.io.set_batch((n, *sample_shape))  # TensorRT checks the shape before any buffer is sized for it
            got = self.io.output_shape()
            if got != (n, *self.sample_dims):
                raise BackendError(f"engine output shape {got} does not match batch {n} x {self.sample_dims}")
            buf = self._buffers_for(n, sample_shape)
            h_in, h_out = buf.h_in[:n], buf.h_out[:n]
            h_in[...] = chunk  # converts dtype into the pinned buffer
            self.cuda.htod_async(buf.d_in, h_in, self.stream)
            self.io.execute(buf.d_in, buf.d_out, handle)
            self.cuda.dtoh_async(h_out, buf.d_out, self.stream)
            self.cuda.sync(self.stream)
            outs.append(np.array(h_out, dtype=np.float32))  # copy out of the reused pinned buffer
        return np.concatenate(outs) if outs else np.zeros((0, *self.sample_dims), np.float32)

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``N x K`` for a preprocessed batch."""
        if len(batch) == 0:
            return np.zeros((0, len(self.bundle.manifest.classes)), np.float32)
        out = self.run_raw(batch).reshape(len(batch), -1)
        return out if self.output_kind == "probabilities" else softmax(out)
