"""A fake of the TensorRT (8.x and 10.x) and cuda-python runtime APIs that hemaedge calls.

THIS IS A CONTRACT FAKE, NOT EVIDENCE THAT TENSORRT WORKS. It checks that our
code calls the documented Python API of each TensorRT generation in a valid
order with valid arguments (network flags, parser, builder config, profiles,
the INT8 calibrator protocol, engine I/O through either the bindings or the
name-based tensor API, CUDA streams and copies). It cannot tell whether real
TensorRT accepts our models, how fast or how accurate the engines are, or
whether the Python bindings on a given JetPack behave as documented.

How faithful it tries to be:

* API generations: < 8.5 has only the bindings API; 8.5 to 9.x has both;
  >= 10.0 has only the tensor API, no ``max_workspace_size``, no
  ``num_bindings``/``execute_async_v2``. ``platform_has_fast_*`` can be
  removed to mimic their deprecation (10.5+).
* 8.x networks must be created with the EXPLICIT_BATCH flag (the ONNX
  parser refuses implicit-batch networks); 10.x warns if it is passed.
* Dynamic inputs need an optimisation profile; shapes are checked against it.
* INT8 builds: a network with Q/DQ nodes needs no calibrator; otherwise the
  calibrator protocol is driven as documented (``read_calibration_cache``,
  then ``get_batch_size``/``get_batch(names)`` until None, then
  ``write_calibration_cache``), reading each batch from fake device memory.
* A plan only deserialises with the same TensorRT version and GPU.
* CUDA: device memory is simulated; async copies and executions are queued
  on their stream and only happen at ``cudaStreamSynchronize``, so reading
  results before synchronising is caught. Execution runs the ONNX model
  with ONNX Runtime on the CPU, so outputs are real numbers.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FAKE_MAGIC = b"FAKE-TRT-PLAN\n"


# --------------------------------------------------------------------------------------- cuda ----


class FakeGpuState:
    """Device memory, streams and pinned host buffers of one fake GPU."""

    def __init__(self, name: str = "Orin", cc: tuple[int, int] = (8, 7)):
        self.name, self.cc = name, cc
        self.device: dict[int, bytearray] = {}
        self.pinned: dict[int, Any] = {}
        self.streams: dict[int, list] = {}
        self.next_ptr = 1 << 40
        self.next_stream = 1
        self.async_copies = 0
        self.pageable_async_copies = 0
        self.executions = 0

    def region(self, ptr: int, nbytes: int) -> tuple[bytearray, int]:
        for base, buf in self.device.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return buf, ptr - base
        raise RuntimeError(f"fake CUDA: {nbytes} bytes at {ptr:#x} is not inside any device allocation")

    def read(self, ptr: int, nbytes: int) -> bytes:
        buf, off = self.region(ptr, nbytes)
        return bytes(buf[off : off + nbytes])

    def write(self, ptr: int, data: bytes) -> None:
        buf, off = self.region(ptr, len(data))
        buf[off : off + len(data)] = data

    def enqueue(self, stream: int, op) -> None:
        if stream not in self.streams:
            raise RuntimeError(f"fake CUDA: unknown stream {stream}")
        self.streams[stream].append(op)

    def leaks(self) -> dict[str, int]:
        return {"device": len(self.device), "pinned": len(self.pinned), "streams": len(self.streams)}


class _Stream:
    def __init__(self, sid: int):
        self.sid = sid

    def __int__(self) -> int:
        return self.sid


def make_fake_cudart(gpu: FakeGpuState) -> types.ModuleType:
    """A module with the cuda-python runtime functions hemaedge calls."""
    rt = types.ModuleType("fake_cudart")

    class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2
        cudaErrorInvalidResourceHandle = 400

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    ok = cudaError_t.cudaSuccess
    rt.cudaError_t, rt.cudaMemcpyKind = cudaError_t, cudaMemcpyKind

    def cudaGetDeviceCount():  # noqa: N802
        return ok, 1

    def cudaGetDeviceProperties(device):  # noqa: N802
        if device != 0:
            return (cudaError_t.cudaErrorInvalidValue, None)
        props = types.SimpleNamespace(name=gpu.name.encode() + b"\0" * 8, major=gpu.cc[0], minor=gpu.cc[1])
        return ok, props

    def cudaMalloc(nbytes):  # noqa: N802
        ptr = gpu.next_ptr
        gpu.next_ptr += (int(nbytes) + 0xFFFF) & ~0xFFFF
        gpu.device[ptr] = bytearray(int(nbytes))
        return ok, ptr

    def cudaFree(ptr):  # noqa: N802
        if gpu.device.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (ok,)

    def cudaMallocHost(nbytes):  # noqa: N802
        buf = ctypes.create_string_buffer(int(nbytes))
        ptr = ctypes.addressof(buf)
        gpu.pinned[ptr] = buf
        return ok, ptr

    def cudaFreeHost(ptr):  # noqa: N802
        if gpu.pinned.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (ok,)

    def cudaStreamCreate():  # noqa: N802
        sid = gpu.next_stream
        gpu.next_stream += 1
        gpu.streams[sid] = []
        return ok, _Stream(sid)

    def cudaStreamDestroy(stream):  # noqa: N802
        if gpu.streams.pop(int(stream), None) is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        return (ok,)

    def _is_pinned(ptr: int, nbytes: int) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + len(buf) for base, buf in gpu.pinned.items())

    def _copy(dst, src, count, kind):
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            gpu.write(int(dst), ctypes.string_at(int(src), int(count)))
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            ctypes.memmove(int(dst), gpu.read(int(src), int(count)), int(count))
        else:
            raise RuntimeError(f"fake CUDA: unsupported copy kind {kind}")

    def cudaMemcpyAsync(dst, src, count, kind, stream):  # noqa: N802
        host = src if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else dst
        gpu.async_copies += 1
        if not _is_pinned(int(host), int(count)):
            gpu.pageable_async_copies += 1
        gpu.region(int(dst if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else src), int(count))  # bounds now
        gpu.enqueue(int(stream), lambda: _copy(dst, src, count, kind))
        return (ok,)

    def cudaMemcpy(dst, src, count, kind):  # noqa: N802
        _copy(dst, src, count, kind)
        return (ok,)

    def cudaStreamSynchronize(stream):  # noqa: N802
        ops = gpu.streams.get(int(stream))
        if ops is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        while ops:
            ops.pop(0)()
        return (ok,)

    for fn in (
        cudaGetDeviceCount,
        cudaGetDeviceProperties,
        cudaMalloc,
        cudaFree,
        cudaMallocHost,
        cudaFreeHost,
        cudaStreamCreate,
        cudaStreamDestroy,
        cudaMemcpyAsync,
        cudaMemcpy,
        cudaStreamSynchronize,
    ):
        setattr(rt, fn.__name__, fn)
    return rt


# ---------------------------------------------------------------------------------- tensorrt ----


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2])


@dataclass
class FakeTrtLog:
    """What the fake saw, for assertions."""

    network_flags: list[int] = field(default_factory=list)
    builder_flags: list[set] = field(default_factory=list)
    workspace: list[tuple[str, int]] = field(default_factory=list)
    calibration: list[dict] = field(default_factory=list)
    builds: int = 0


def make_fake_tensorrt(
    version: str = "10.3.0",
    gpu: FakeGpuState | None = None,
    fast_int8: bool = True,
    fast_fp16: bool = True,
    platform_flags: bool = True,
) -> types.ModuleType:
    """A module with the TensorRT Python API surface hemaedge calls, for one TensorRT version.

    Args:
        version: ``__version__``; decides which API generation is exposed.
        gpu: The fake GPU (shared with ``make_fake_cudart``).
        fast_int8 / fast_fp16: What ``platform_has_fast_int8/fp16`` report.
        platform_flags: False removes ``platform_has_fast_*`` (deprecated in 10.5).
    """
    gpu = gpu or FakeGpuState()
    vt = _version_tuple(version)
    has_bindings = vt < (10, 0)
    has_tensor_api = vt >= (8, 5)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.fake_log = FakeTrtLog()
    trt.fake_gpu = gpu

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self):
            pass

        def log(self, severity, msg):  # pragma: no cover - abstract
            raise NotImplementedError

    ILogger.Severity = Severity
    for s in Severity:
        setattr(ILogger, s.name, s)
    trt.ILogger = ILogger

    class Logger(ILogger):
        def __init__(self, min_severity=Severity.WARNING):
            self.min_severity = min_severity

        def log(self, severity, msg):
            pass

    trt.Logger = Logger

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3

    trt.DataType = DataType
    trt.nptype = lambda dt: {
        DataType.FLOAT: np.float32,
        DataType.HALF: np.float16,
        DataType.INT8: np.int8,
        DataType.INT32: np.int32,
    }[dt]

    class TensorIOMode(enum.IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    if has_tensor_api:
        trt.TensorIOMode = TensorIOMode

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag

    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        INT8 = 1

    trt.BuilderFlag = BuilderFlag

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    if vt >= (8, 4):
        trt.MemoryPoolType = MemoryPoolType

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

    # -- network / parser --------------------------------------------------------------------
    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, tuple(shape)

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs: list[Tensor] = []
            self.outputs: list[Tensor] = []
            self.onnx_path = None
            self.has_qdq = False

        @property
        def num_inputs(self):
            return len(self.inputs)

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class ParserError:
        def __init__(self, desc):
            self._desc = desc

        def desc(self):
            return self._desc

        def __str__(self):
            return self._desc

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            import onnx

            if has_bindings and not (self.network.flags & (1 << NetworkDefinitionCreationFlag.EXPLICIT_BATCH)):
                self.errors.append(ParserError("ONNX parser only supports networks with an explicit batch dimension"))
                return False
            try:
                model = onnx.load(path)
            except Exception as exc:  # noqa: BLE001 - mimic the parser's error reporting
                self.errors.append(ParserError(f"failed to parse ONNX model: {exc}"))
                return False

            def dims(vi):
                return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

            inits = {i.name for i in model.graph.initializer}
            self.network.inputs = [Tensor(v.name, dims(v)) for v in model.graph.input if v.name not in inits]
            self.network.outputs = [Tensor(v.name, dims(v)) for v in model.graph.output]
            self.network.onnx_path = str(path)
            self.network.has_qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
            return True

    trt.OnnxParser = OnnxParser

    # -- builder -----------------------------------------------------------------------------
    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's keyword names
            mn, op, mx = tuple(min), tuple(opt), tuple(max)
            if not all(a <= b <= c for a, b, c in zip(mn, op, mx)):
                raise ValueError(f"invalid profile for {name}: {mn} {op} {mx}")
            self.shapes[name] = (mn, op, mx)

    class BuilderConfig:
        def __init__(self):
            self.flags = set()
            self.profiles = []
            self.int8_calibrator = None
            self.calibration_profile = None
            self.pool_limits = {}

        def set_flag(self, flag):
            self.flags.add(BuilderFlag(flag))

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile):
            self.calibration_profile = profile

    if vt >= (8, 4):

        def set_memory_pool_limit(self, pool, size):
            self.pool_limits[MemoryPoolType(pool)] = size
            trt.fake_log.workspace.append(("pool", size))

        BuilderConfig.set_memory_pool_limit = set_memory_pool_limit
    if has_bindings:

        def _set_ws(self, size):
            trt.fake_log.workspace.append(("max_workspace_size", size))

        BuilderConfig.max_workspace_size = property(lambda self: 0, _set_ws)

    class HostMemory(bytes):
        pass

    class Builder:
        def __init__(self, logger):
            if not isinstance(logger, ILogger):
                raise TypeError("Builder needs an ILogger")
            self.logger = logger

        def create_network(self, flags=0):
            trt.fake_log.network_flags.append(flags)
            if not has_bindings and flags & (1 << NetworkDefinitionCreationFlag.EXPLICIT_BATCH):
                self.logger.log(Severity.WARNING, "EXPLICIT_BATCH is deprecated and has no effect in TensorRT 10")
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return OptimizationProfile()

        def _fail(self, msg):
            self.logger.log(Severity.ERROR, msg)
            return None

        def build_serialized_network(self, network, config):
            trt.fake_log.builds += 1
            trt.fake_log.builder_flags.append(set(config.flags))
            inp, out = network.get_input(0), network.get_output(0)
            sample = tuple(inp.shape[1:])
            dynamic = any(d < 0 for d in inp.shape)
            if dynamic and not config.profiles:
                return self._fail(
                    f"Network has dynamic or shape inputs, but no optimization profile has been defined ({inp.name})"
                )
            prof = config.profiles[0].shapes.get(inp.name) if config.profiles else None
            if config.profiles and prof is None:
                return self._fail(f"optimization profile does not set {inp.name}")
            if prof is not None and any(tuple(s[1:]) != sample for s in prof):
                return self._fail(f"profile shapes {prof} do not match input {inp.shape}")
            if prof is not None and not dynamic and any(tuple(s) != tuple(inp.shape) for s in prof):
                return self._fail(f"profile {prof} differs from the static input shape {inp.shape}")
            calibration = None
            if BuilderFlag.INT8 in config.flags and not network.has_qdq:
                cal = config.int8_calibrator
                if cal is None:
                    return self._fail("INT8 requested on a network without Q/DQ and no calibrator (fake refuses)")
                calibration = self._calibrate(cal, config, inp, sample, dynamic)
                if calibration is None:
                    return None
            if BuilderFlag.INT8 in config.flags and not fast_int8:
                self.logger.log(Severity.WARNING, "INT8 not supported natively on this platform")
            precision = (
                "int8" if BuilderFlag.INT8 in config.flags else "fp16" if BuilderFlag.FP16 in config.flags else "fp32"
            )
            header = {
                "version": version,
                "gpu": [gpu.name, *gpu.cc],
                "onnx": network.onnx_path,
                "input": inp.name,
                "output": out.name,
                "input_shape": list(inp.shape),
                "output_shape": list(out.shape),
                "profile": [list(s) for s in prof] if prof else [list(inp.shape)] * 3,
                "precision": precision,
                "calibration": calibration,
            }
            return HostMemory(FAKE_MAGIC + json.dumps(header).encode())

        def _calibrate(self, cal, config, inp, sample, dynamic):
            rec = {"from_cache": False, "batches": 0}
            trt.fake_log.calibration.append(rec)
            cache = cal.read_calibration_cache()
            if cache:
                rec["from_cache"] = True
                return {"source": "cache", "cache": bytes(cache).decode("latin1")}
            bs = int(cal.get_batch_size())
            if dynamic and vt >= (8, 5):
                cp = config.calibration_profile
                if cp is None or cp.shapes.get(inp.name) != ((bs, *sample),) * 3:
                    return self._fail(
                        "dynamic-shape calibration needs a calibration profile with the calibration batch shape"
                    )
            nbytes = bs * int(np.prod(sample)) * 4
            absmax = 0.0
            while True:
                ptrs = cal.get_batch([inp.name])
                if ptrs is None or ptrs is False:
                    break
                if len(ptrs) != 1:
                    return self._fail(f"get_batch returned {len(ptrs)} pointers for 1 input")
                data = np.frombuffer(gpu.read(int(ptrs[0]), nbytes), dtype=np.float32)
                absmax = max(absmax, float(np.abs(data).max()))
                rec["batches"] += 1
            if rec["batches"] == 0:
                return self._fail("calibrator produced no batches")
            table = f"TRT-{version}-EntropyCalibration2\n{inp.name}: {absmax:.6g}\n".encode()
            cal.write_calibration_cache(memoryview(table))
            return {"source": "batches", "batches": rec["batches"], "absmax": absmax}

    if platform_flags:
        Builder.platform_has_fast_int8 = property(lambda self: fast_int8)
        Builder.platform_has_fast_fp16 = property(lambda self: fast_fp16)
    trt.Builder = Builder

    # -- runtime / engine / context ----------------------------------------------------------
    class Engine:
        def __init__(self, header):
            self.h = header
            self.names = [header["input"], header["output"]]
            self._session = None

        def session(self):
            if self._session is None:
                import onnxruntime as ort

                self._session = ort.InferenceSession(self.h["onnx"], providers=["CPUExecutionProvider"])
            return self._session

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.shape = None
            self.addresses = {}

        def _set_shape(self, shape):
            lo, _, hi = self.engine.h["profile"]
            shape = tuple(int(d) for d in shape)
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shape = shape
            return True

        def _out_shape(self):
            out = list(self.engine.h["output_shape"])
            if self.shape is None:
                return tuple(out)
            out[0] = self.shape[0]
            return tuple(out)

        def _enqueue(self, d_in, d_out, stream):
            if self.shape is None:
                raise RuntimeError("fake TensorRT: input shape not set before execution")
            in_bytes = int(np.prod(self.shape)) * 4
            out_shape = self._out_shape()
            out_bytes = int(np.prod(out_shape)) * 4
            gpu.region(d_in, in_bytes)
            gpu.region(d_out, out_bytes)
            shape, session, name = self.shape, self.engine.session(), self.engine.h["input"]

            def run():
                x = np.frombuffer(gpu.read(d_in, in_bytes), dtype=np.float32).reshape(shape)
                y = session.run(None, {name: x})[0].astype(np.float32)
                gpu.write(d_out, np.ascontiguousarray(y).tobytes())
                gpu.executions += 1

            gpu.enqueue(int(stream), run)
            return True

    def _dtype(self, _):
        return DataType.FLOAT

    if has_tensor_api:
        Engine.num_io_tensors = property(lambda self: 2)
        Engine.get_tensor_name = lambda self, i: self.names[i]
        Engine.get_tensor_mode = lambda self, n: TensorIOMode.INPUT if n == self.h["input"] else TensorIOMode.OUTPUT
        Engine.get_tensor_dtype = _dtype
        Engine.get_tensor_shape = lambda self, n: tuple(
            self.h["input_shape"] if n == self.h["input"] else self.h["output_shape"]
        )
        Engine.get_tensor_profile_shape = lambda self, n, p: [tuple(s) for s in self.h["profile"]]
        Context.set_input_shape = lambda self, n, shape: n == self.engine.h["input"] and self._set_shape(shape)
        Context.get_tensor_shape = lambda self, n: self._out_shape() if n == self.engine.h["output"] else self.shape
        Context.set_tensor_address = lambda self, n, ptr: self.addresses.__setitem__(n, int(ptr)) or True

        def execute_async_v3(self, stream_handle):
            h = self.engine.h
            if set(self.addresses) != {h["input"], h["output"]}:
                raise RuntimeError("fake TensorRT: not every I/O tensor has an address")
            return self._enqueue(self.addresses[h["input"]], self.addresses[h["output"]], int(stream_handle))

        Context.execute_async_v3 = execute_async_v3
    if has_bindings:
        Engine.num_bindings = property(lambda self: 2)
        Engine.get_binding_name = lambda self, i: self.names[i]
        Engine.binding_is_input = lambda self, i: i == 0
        Engine.get_binding_dtype = _dtype
        Engine.get_binding_shape = lambda self, i: tuple(self.h["input_shape"] if i == 0 else self.h["output_shape"])
        Engine.get_profile_shape = lambda self, p, i: [tuple(s) for s in self.h["profile"]]
        Context.set_binding_shape = lambda self, i, shape: i == 0 and self._set_shape(shape)
        Context.get_binding_shape = lambda self, i: self._out_shape() if i == 1 else self.shape

        def execute_async_v2(self, bindings, stream_handle):
            if len(bindings) != 2 or not all(bindings):
                raise RuntimeError(f"fake TensorRT: bindings {bindings} must give both I/O pointers")
            return self._enqueue(int(bindings[0]), int(bindings[1]), int(stream_handle))

        Context.execute_async_v2 = execute_async_v2

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            data = bytes(data)
            if not data.startswith(FAKE_MAGIC):
                self.logger.log(Severity.ERROR, "Serialization assertion failed: magic tag does not match")
                return None
            h = json.loads(data[len(FAKE_MAGIC) :])
            if h["version"] != version:
                self.logger.log(
                    Severity.ERROR,
                    f"The engine plan file is not compatible with this version of TensorRT, "
                    f"expecting library version {version} got {h['version']}",
                )
                return None
            if h["gpu"] != [gpu.name, *gpu.cc]:
                self.logger.log(Severity.ERROR, "The engine plan file is generated on an incompatible device")
                return None
            return Engine(h)

    trt.Runtime = Runtime
    return trt


def fake_pair(version: str = "10.3.0", gpu_name: str = "Orin", cc: tuple[int, int] = (8, 7), **kw):
    """``(tensorrt, cudart)`` fakes sharing one fake GPU."""
    gpu = FakeGpuState(gpu_name, cc)
    return make_fake_tensorrt(version, gpu, **kw), make_fake_cudart(gpu)
