"""Build TensorRT engines from a bundle's ONNX, on the workstation or the station.

Shared by ``hemaedge build-engine`` (station) and ``export-model --target
tensorrt`` (workstation, ``export/commands/export.py``). No torch: this runs
on a Jetson with only JetPack's TensorRT and cuda-python.

Precision, in the order tried:

* **explicit INT8**: the bundle's QDQ ``int8`` ONNX is parsed and built with
  the INT8 flag; the scales are the workstation's, so no calibration here.
* **implicit INT8** (``implicit_int8=True``): the fp32 ONNX plus TensorRT's
  entropy calibrator fed with images preprocessed by the runtime's own
  ``preprocess``. The calibration cache is stored in the bundle and reused
  only when its recorded fp32-model digest, input shape, preprocessing and
  TensorRT version all match; otherwise it is rebuilt and the build says why.
* **FP16 / FP32**: the fp32 ONNX with (or without) the FP16 flag.

A GPU without fast INT8 (Jetson Nano, TX2) is refused with a clear message;
FP16 is built instead only with ``allow_fp16_fallback=True``, and the
manifest records the precision actually built.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable  # typing's: Log below is evaluated at run time (3.8 has no Callable[...] in abc)

import numpy as np
from hemaedge.edge.bundle.io import Bundle, add_artifact, load_bundle
from hemaedge.edge.bundle.manifest import Artifact, InputSpec, Manifest
from hemaedge.edge.bundle.preprocess import preprocess
from hemaedge.edge.classify.cuda_rt import CudaRuntime, GpuInfo
from hemaedge.edge.classify.engines import (
    ENGINE_KIND,
    ENGINE_PRECISIONS,
    engine_file_name,
    load_tensorrt,
    make_logger,
    probe_station,
)
from hemaedge.edge.errors import BackendError, InputError, UsageError

CACHE_KIND = "calibration-cache"
CACHE_FILE = "calibration.cache"
CALIBRATION_ALGORITHM = "entropy2"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

Log = Callable[[str], None]


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes of the engine's optimisation profile (crops per frame)."""

    min: int = 1
    opt: int = 8
    max: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise UsageError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    @classmethod
    def for_max(cls, max_batch: int, opt: int | None = None) -> BatchProfile:
        """Profile 1..max_batch with ``opt`` (default 8, clipped to max)."""
        return cls(1, min(opt or 8, max_batch), max_batch)


DEFAULT_PROFILE = BatchProfile()


@dataclass
class EngineBuild:
    """What was built, for the CLI and the manifest."""

    path: Path
    precision_requested: str
    precision_built: str
    mode: str
    trt_version: str
    gpu: GpuInfo
    profile: BatchProfile
    seconds: float
    calibration: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "engine": self.path.name,
            "precision_requested": self.precision_requested,
            "precision_built": self.precision_built,
            "mode": self.mode,
            "tensorrt_version": self.trt_version,
            "gpu": self.gpu.name,
            "gpu_slug": self.gpu.slug,
            "compute_capability": self.gpu.compute_capability,
            "profile": {"min": self.profile.min, "opt": self.profile.opt, "max": self.profile.max},
            "seconds": round(self.seconds, 1),
            "calibration": self.calibration,
            "notes": self.notes,
        }


# -- what the GPU can do --------------------------------------------------------------------------


def fast_precisions(builder: Any, gpu: GpuInfo) -> tuple[bool, bool]:
    """``(fast_int8, fast_fp16)`` from the builder, or from the compute capability.

    ``platform_has_fast_int8/fp16`` are deprecated since TensorRT 10.5; when
    they are gone, use the documented hardware rule: fast INT8 from sm_61 and
    sm_70 up (not sm_53 Nano, not sm_62 TX2); fast FP16 on sm_53, 60, 62, 70+.
    """
    cc = gpu.major * 10 + gpu.minor
    int8 = getattr(builder, "platform_has_fast_int8", None)
    fp16 = getattr(builder, "platform_has_fast_fp16", None)
    if int8 is None:
        int8 = cc == 61 or cc >= 70
    if fp16 is None:
        fp16 = cc in (53, 60, 62) or cc >= 70
    return bool(int8), bool(fp16)


def plan_precision(
    requested: str, fast_int8: bool, fast_fp16: bool, allow_fp16_fallback: bool, gpu: GpuInfo
) -> tuple[str, str]:
    """The precision to build and a note when it differs from the request.

    Raises:
        UsageError: the GPU lacks fast support for the request and no fallback was allowed.
    """
    where = f"{gpu.name} (sm_{gpu.major}{gpu.minor})"
    if requested == "int8" and not fast_int8:
        if allow_fp16_fallback and fast_fp16:
            return "fp16", (
                f"{where} has no fast INT8 (Jetson Nano / TX2 class): building FP16 instead, "
                "as --allow-fp16-fallback permits"
            )
        raise UsageError(
            f"{where} has no fast INT8 (Jetson Nano / TX2 class): build with --precision fp16, "
            "or add --allow-fp16-fallback to accept FP16 when INT8 is unavailable"
        )
    if requested == "fp16" and not fast_fp16:
        raise UsageError(f"{where} has no fast FP16: build with --precision fp32")
    return requested, ""


# -- calibration cache rules ----------------------------------------------------------------------


def preprocess_fingerprint(spec: InputSpec) -> str:
    """Short digest of everything preprocessing does; calibration data depends on it."""
    d = {
        "size": [spec.channels, spec.height, spec.width],
        "colour": spec.colour_order,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "resize": spec.resize,
        "layout": spec.layout,
    }
    if spec.white_balance:  # named only when used, so the digest of a bundle without them is unchanged
        d["white_balance"] = True
    if spec.stain_ref:
        d["stain"] = [spec.stain_ref, *spec.stain_gain_range]
    if spec.stain_vectors:
        d["stain_vectors"] = [list(v) for v in spec.stain_vectors] + [spec.stain_hue_tolerance]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def calibration_key(manifest: Manifest, trt_version: str) -> dict[str, Any]:
    """What a calibration cache must match to be reused."""
    spec = manifest.input
    return {
        "model_sha256": manifest.artifact("fp32", "onnx").sha256,
        "input_shape": [spec.channels, spec.height, spec.width],
        "preprocess": preprocess_fingerprint(spec),
        "tensorrt_version": trt_version,
    }


def cache_status(manifest: Manifest, key: dict[str, Any]) -> tuple[Artifact | None, str]:
    """The bundle's reusable calibration cache, or None and why not.

    Returns:
        ``(artifact, "")`` when a cache matches every field of ``key``;
        ``(None, "")`` when the bundle has none; ``(None, reason)`` when it
        has one that is stale (the reason names each field that differs).
    """
    caches = [a for a in manifest.artifacts if a.kind == CACHE_KIND]
    if not caches:
        return None, ""
    reasons = []
    for art in caches:
        diff = [f"{k} {art.details.get(k)!r} != {v!r}" for k, v in key.items() if art.details.get(k) != v]
        if not diff:
            return art, ""
        reasons.append(f"{art.file}: " + ", ".join(diff))
    return None, "; ".join(reasons)


# -- calibration data -----------------------------------------------------------------------------


def calibration_files(folder: str | os.PathLike) -> list[Path]:
    """Image files (recursively) and ``.npy`` arrays under ``folder``, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"calibration folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + (".npy",))
    if not files:
        raise InputError(f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) or .npy arrays")
    return files


def load_calibration_images(folder: str | os.PathLike, limit: int = 512) -> list[np.ndarray]:
    """Up to ``limit`` RGB uint8 images, spread evenly over the sorted files.

    Image files are read with OpenCV (BGR, converted to RGB); a ``.npy`` file
    holds an ``N x H x W x 3`` uint8 RGB array (e.g. crops from ``hemaedge collect``).
    """
    images: list[np.ndarray] = []
    for path in calibration_files(folder):
        if path.suffix.lower() == ".npy":
            arr = np.load(path)
            if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
                raise InputError(f"{path} must be an N x H x W x 3 uint8 RGB array, not {arr.shape} {arr.dtype}")
            images.extend(arr)
        else:
            import cv2

            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                raise InputError(f"cannot read calibration image {path}")
            images.append(np.ascontiguousarray(img[..., ::-1]))
    if len(images) > limit:
        idx = np.linspace(0, len(images) - 1, limit).round().astype(int)
        images = [images[i] for i in idx]
    return images


def calibration_batches(images: list[np.ndarray], spec: InputSpec, batch_size: int) -> Iterator[np.ndarray]:
    """Preprocessed ``batch_size x C x H x W`` float32 batches, exactly as the station preprocesses.

    TensorRT's calibrator wants every batch full, so the last one is padded
    with images from the start of the set.
    """
    if not images:
        return
    stain = None  # session stain normalisation: the calibration set is one session
    if spec.stain_ref:
        from hemaedge.edge.bundle.preprocess import estimate_stain, resized

        stain = estimate_stain(resized(images, spec), spec)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        while len(chunk) < batch_size:
            chunk = chunk + images[: batch_size - len(chunk)]
        yield preprocess(chunk, spec, colour_order="RGB", session=stain)


def make_calibrator(
    trt: Any, cuda: CudaRuntime, batches: Iterable[np.ndarray], batch_shape: tuple[int, ...], cache: bytes | None = None
):
    """An ``IInt8EntropyCalibrator2`` feeding ``batches`` (or replaying ``cache``).

    TensorRT calls ``read_calibration_cache`` first; when it returns bytes the
    batches are never asked for. Otherwise it calls ``get_batch(names)`` until
    it returns None, then ``write_calibration_cache(cache)``. A Python
    exception inside these callbacks would be swallowed by TensorRT, so it is
    kept in ``error`` and re-raised after the build.
    """
    nbytes = int(np.prod(batch_shape)) * 4

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = iter(batches)
            self.batch_shape = tuple(batch_shape)
            self.cache = cache
            self.written: bytes | None = None
            self.device: int | None = None
            self.samples = 0
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            return int(self.batch_shape[0])

        def get_batch(self, names, *_):
            try:
                batch = next(self.batches, None)
                if batch is None:
                    return None
                batch = np.ascontiguousarray(batch, dtype=np.float32)
                if batch.shape != self.batch_shape:
                    raise BackendError(f"calibration batch has shape {batch.shape}, expected {self.batch_shape}")
                if self.device is None:
                    self.device = cuda.malloc(nbytes)
                cuda.htod(self.device, batch)
                self.samples += batch.shape[0]
                return [self.device for _ in names]
            except Exception as exc:  # noqa: BLE001 - TensorRT would swallow it; re-raised after the build
                self.error = exc
                return None

        def read_calibration_cache(self, *_):
            return self.cache

        def write_calibration_cache(self, data, *_):
            self.written = bytes(data)

        def free(self) -> None:
            if self.device is not None:
                cuda.free(self.device)
                self.device = None

    return EntropyCalibrator()


# -- the build ------------------------------------------------------------------------------------


def network_flags(trt: Any) -> int:
    """``EXPLICIT_BATCH`` on TensorRT 8.x; 0 on 10.x, where it is deprecated and networks are always explicit-batch."""
    major = int(str(trt.__version__).split(".")[0])
    if major >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def qdq_problems(onnx_path: Path) -> list[str]:
    """Why TensorRT would reject a QDQ INT8 model (empty when fine, or when ``onnx`` is absent).

    TensorRT supports only symmetric signed INT8: every Quantize/DequantizeLinear
    zero point must be int8 and 0. ONNX Runtime's default static quantization
    (uint8 asymmetric activations) fails that.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return []
    model = onnx.load(str(onnx_path), load_external_data=False)
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    unsigned = asymmetric = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = consts.get(node.input[2])
        if zp is None:
            continue
        arr = numpy_helper.to_array(zp)
        if arr.dtype == np.uint8:
            unsigned += 1
        elif np.any(arr != 0):
            asymmetric += 1
    problems = []
    if unsigned:
        problems.append(f"{unsigned} Q/DQ nodes use uint8 zero points")
    if asymmetric:
        problems.append(f"{asymmetric} Q/DQ nodes have non-zero zero points (asymmetric)")
    return problems


def _set_workspace(trt: Any, config: Any, workspace_mb: int | None) -> None:
    if not workspace_mb:
        return
    nbytes = int(workspace_mb) << 20
    if hasattr(config, "set_memory_pool_limit"):  # TensorRT >= 8.4
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, nbytes)
    else:  # older 8.x
        config.max_workspace_size = nbytes


def build_serialized(
    trt: Any,
    builder: Any,
    logger: Any,
    onnx_path: Path,
    precision: str,
    profile: BatchProfile,
    *,
    calibrator: Any = None,
    workspace_mb: int | None = None,
    log: Log | None = None,
) -> tuple[bytes, BatchProfile]:
    """Parse an ONNX file and build a serialized engine.

    Returns:
        ``(plan bytes, effective profile)``; the profile is pinned to the
        model's batch size when the ONNX batch axis is fixed.
    """
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"TensorRT cannot parse {onnx_path.name}: {errors[0] if errors else logger.last_error()}")
    if network.num_inputs != 1:
        raise BackendError(f"{onnx_path.name} has {network.num_inputs} inputs; a classifier has one")
    inp = network.get_input(0)
    dims = tuple(int(d) for d in inp.shape)
    sample = dims[1:]
    if any(d < 0 for d in sample):
        raise BackendError(
            f"{onnx_path.name} input {inp.name} has dynamic non-batch dims {dims}; export a fixed C x H x W"
        )
    if dims[0] >= 0 and (profile.min, profile.max) != (dims[0], dims[0]):
        if log:
            log(
                f"{onnx_path.name} has a fixed batch of {dims[0]}: the engine takes exactly {dims[0]} crops per call "
                "(export with a dynamic batch axis for 1..N)"
            )
        profile = BatchProfile(dims[0], dims[0], dims[0])
    config = builder.create_builder_config()
    _set_workspace(trt, config, workspace_mb)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    opt.set_shape(inp.name, (profile.min, *sample), (profile.opt, *sample), (profile.max, *sample))
    config.add_optimization_profile(opt)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        if dims[0] < 0 and hasattr(config, "set_calibration_profile"):
            shape = (calibrator.get_batch_size(), *sample)
            cal = builder.create_optimization_profile()
            cal.set_shape(inp.name, shape, shape, shape)
            config.set_calibration_profile(cal)
    plan = builder.build_serialized_network(network, config)
    if calibrator is not None and getattr(calibrator, "error", None) is not None:
        raise BackendError(f"INT8 calibration failed: {calibrator.error}") from calibrator.error
    if plan is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path.name}: {logger.last_error()}")
    return bytes(plan), profile


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_for_bundle(
    bundle_path: str | os.PathLike | Bundle,
    precision: str = "int8",
    *,
    implicit_int8: bool = False,
    calib_dir: str | os.PathLike | None = None,
    calib_samples: int = 512,
    calib_batch: int = 16,
    recalibrate: bool = False,
    profile: BatchProfile = DEFAULT_PROFILE,
    allow_fp16_fallback: bool = False,
    workspace_mb: int | None = None,
    log: Log | None = None,
    trt: Any = None,
    cudart: Any = None,
) -> EngineBuild:
    """Build this machine's engine for a bundle and list it (and any new calibration cache) in the manifest.

    Args:
        bundle_path: The bundle directory (must be writable).
        precision: ``int8`` (explicit QDQ unless ``implicit_int8``), ``fp16`` or ``fp32``.
        implicit_int8: Calibrate the fp32 ONNX with TensorRT's entropy calibrator.
        calib_dir: Images (or ``.npy`` crops) to calibrate with; needed unless
            the bundle holds a matching calibration cache.
        calib_samples: Most images used for calibration.
        calib_batch: Calibration batch size.
        recalibrate: Ignore a matching calibration cache.
        profile: Batch sizes for the optimisation profile.
        allow_fp16_fallback: On a GPU without fast INT8, build FP16 instead of refusing.
        workspace_mb: Builder workspace limit (default: TensorRT's).
        log: Callable for progress lines.
        trt: ``tensorrt`` module override (tests).
        cudart: cuda-python runtime module override (tests).

    Raises:
        UsageError: a contradictory request, refused before any build work.
        BackendError: TensorRT failed to parse or build (its last error in the message).
    """
    log = log or (lambda _msg: None)
    t0 = time.monotonic()
    opts = _BuildOptions(
        precision,
        implicit_int8,
        calib_dir,
        calib_samples,
        calib_batch,
        recalibrate,
        profile,
        allow_fp16_fallback,
        workspace_mb,
    )
    opts.validate()
    bundle = _writable_bundle(bundle_path, opts)
    gpu = _open_gpu(trt, cudart, log)
    target = _choose_precision(gpu, opts, log)
    calib = _calibration(bundle, gpu, opts, target.built, log)
    notes = target.notes + calib.notes
    engine = _build_engine(bundle, gpu, opts, target.built, calib, log)
    out = _write_engine(bundle, gpu, opts, target.built, engine, calib, notes, log)
    return EngineBuild(
        out,
        precision,
        target.built,
        engine.mode,
        gpu.station.trt_version,
        gpu.station.gpu,
        engine.profile,
        time.monotonic() - t0,
        calib.text,
        notes,
    )


@dataclass
class _BuildOptions:
    """What ``build_for_bundle`` was asked to build, and how (its arguments, bar the bundle and the overrides)."""

    precision: str
    implicit_int8: bool
    calib_dir: str | os.PathLike | None
    calib_samples: int
    calib_batch: int
    recalibrate: bool
    profile: BatchProfile
    allow_fp16_fallback: bool
    workspace_mb: int | None

    def validate(self) -> None:
        """Refuse a contradictory request before any work."""
        if self.precision not in ENGINE_PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(ENGINE_PRECISIONS)}, not {self.precision!r}")
        if self.implicit_int8 and self.precision != "int8":
            raise UsageError("--implicit-int8 only applies to --precision int8")
        if self.calib_dir is not None and not self.implicit_int8:
            raise UsageError(
                "--calib is used only with --implicit-int8 (explicit INT8 carries the workstation's scales)"
            )
        if self.calib_batch < 1 or self.calib_samples < 1:
            raise UsageError("--calib-batch and --calib-samples must be positive")


@dataclass
class _Gpu:
    """TensorRT and the CUDA runtime opened on this station, with the builder and its logger."""

    trt: Any
    cuda: CudaRuntime
    station: Any  # probe_station's record: TensorRT version, GPU and its slug
    logger: Any
    builder: Any


@dataclass
class _Target:
    """The precision to build (INT8 may become FP16 on a GPU without fast INT8) and the notes saying why."""

    built: str
    notes: list[str]


@dataclass
class _Calib:
    """Implicit INT8's calibrator (None otherwise), what the log says about it, its cache key and notes."""

    calibrator: Any = None
    text: str = ""
    key: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Engine:
    """The serialized engine, its effective batch profile, the build mode and the ONNX artifact it came from."""

    plan: bytes
    profile: BatchProfile
    mode: str
    source: Artifact


def _writable_bundle(bundle_path: str | os.PathLike | Bundle, opts: _BuildOptions) -> Bundle:
    """Load the bundle; refuse explicit INT8 without a TensorRT-compatible QDQ model, or a read-only bundle."""
    bundle = bundle_path if isinstance(bundle_path, Bundle) else load_bundle(bundle_path)
    manifest = bundle.manifest
    if opts.precision == "int8" and not opts.implicit_int8:
        if "int8" not in manifest.precisions("onnx"):
            raise UsageError(
                f"bundle '{manifest.name}' has no int8 (QDQ) ONNX model: re-export with --int8, "
                "or calibrate here with --implicit-int8 --calib DIR"
            )
        problems = qdq_problems(bundle.onnx_path("int8"))
        if problems:
            raise UsageError(
                f"{bundle.onnx_path('int8').name} is not TensorRT-compatible INT8 ({'; '.join(problems)}): "
                "re-export with symmetric int8 quantization, or use --implicit-int8 --calib DIR"
            )
    if not os.access(bundle.path, os.W_OK):
        raise UsageError(
            f"bundle {bundle.path} is not writable; copy it somewhere writable to add this station's engine"
        )
    return bundle


def _open_gpu(trt: Any, cudart: Any, log: Log) -> _Gpu:
    """Open TensorRT (or the override) and the CUDA runtime, probe the station, make the builder."""
    trt = trt if trt is not None else load_tensorrt()
    cuda = CudaRuntime(cudart)
    station = probe_station(trt, cuda)
    logger = make_logger(trt, echo=log)
    return _Gpu(trt, cuda, station, logger, trt.Builder(logger))


def _choose_precision(gpu: _Gpu, opts: _BuildOptions, log: Log) -> _Target:
    """The precision this GPU builds for the request (logged when it differs)."""
    fast_int8, fast_fp16 = fast_precisions(gpu.builder, gpu.station.gpu)
    built, note = plan_precision(opts.precision, fast_int8, fast_fp16, opts.allow_fp16_fallback, gpu.station.gpu)
    if note:
        log(note)
    return _Target(built, [note] if note else [])


def _calibration(bundle: Bundle, gpu: _Gpu, opts: _BuildOptions, built: str, log: Log) -> _Calib:
    """Implicit INT8: a calibrator from the bundle's matching cache, else from ``calib_dir``'s images."""
    if not (built == "int8" and opts.implicit_int8):
        return _Calib()
    manifest = bundle.manifest
    key = calibration_key(manifest, gpu.station.trt_version)
    cached, stale = cache_status(manifest, key)
    spec = manifest.input
    batch_shape = (opts.calib_batch, spec.channels, spec.height, spec.width)
    if cached is not None and not opts.recalibrate:
        calibration = f"reused calibration cache {cached.file} (model, input shape, preprocessing and TensorRT match)"
        calibrator = make_calibrator(gpu.trt, gpu.cuda, (), batch_shape, cache=bundle.file(cached).read_bytes())
    else:
        if stale:
            why = f"the bundle's calibration cache is stale ({stale})"
        elif opts.recalibrate and cached is not None:
            why = "--recalibrate ignores the bundle's calibration cache"
        else:
            why = "the bundle has no calibration cache"
        if opts.calib_dir is None:
            raise UsageError(f"{why}: give calibration images with --calib DIR")
        calibration = f"{why}: recalibrating"
        images = load_calibration_images(opts.calib_dir, opts.calib_samples)
        batches = calibration_batches(images, spec, opts.calib_batch)
        calibrator = make_calibrator(gpu.trt, gpu.cuda, batches, batch_shape)
        calibration += f" with {len(images)} images from {opts.calib_dir}"
    log(calibration)
    notes = [calibration]
    if int(str(gpu.station.trt_version).split(".")[0]) >= 10:
        notes.append(
            "implicit INT8 calibration is deprecated since TensorRT 10.1; the bundle's explicit QDQ INT8 is preferred"
        )
    return _Calib(calibrator, calibration, key, notes)


def _build_engine(bundle: Bundle, gpu: _Gpu, opts: _BuildOptions, built: str, calib: _Calib, log: Log) -> _Engine:
    """Build the engine from the ONNX model the mode needs (the calibrator is freed afterwards, built or not)."""
    mode = {"int8": "implicit-int8" if opts.implicit_int8 else "explicit-int8"}.get(built, built)
    source = bundle.onnx_path("int8") if mode == "explicit-int8" else bundle.onnx_path("fp32")
    source_art = bundle.manifest.artifact("int8" if mode == "explicit-int8" else "fp32", "onnx")
    log(
        f"building {mode} engine from {source.name} for {gpu.station.gpu.name} with TensorRT "
        f"{gpu.station.trt_version} (this can take minutes)"
    )
    calibrator = calib.calibrator
    try:
        plan, profile = build_serialized(
            gpu.trt,
            gpu.builder,
            gpu.logger,
            source,
            built,
            opts.profile,
            calibrator=calibrator,
            workspace_mb=opts.workspace_mb,
            log=log,
        )
    finally:
        if calibrator is not None:
            calibrator.free()
    return _Engine(plan, profile, mode, source_art)


def _write_engine(
    bundle: Bundle,
    gpu: _Gpu,
    opts: _BuildOptions,
    built: str,
    engine: _Engine,
    calib: _Calib,
    notes: list[str],
    log: Log,
) -> Path:
    """Write the engine (and a new calibration cache) into the bundle and list them in its manifest."""
    station = gpu.station
    out = bundle.path / engine_file_name(station.trt_version, station.gpu_slug, built)
    _write_atomic(out, engine.plan)
    bundle = add_artifact(
        bundle,
        out,
        ENGINE_KIND,
        built,
        tensorrt_version=station.trt_version,
        gpu=station.gpu.name,
        gpu_slug=station.gpu_slug,
        compute_capability=station.gpu.compute_capability,
        precision_requested=opts.precision,
        mode=engine.mode,
        source_onnx=engine.source.file,
        source_sha256=engine.source.sha256,
        profile={"min": engine.profile.min, "opt": engine.profile.opt, "max": engine.profile.max},
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        notes=notes,
    )
    calibrator = calib.calibrator
    if calibrator is not None and calibrator.written is not None:
        cache_path = bundle.path / CACHE_FILE
        _write_atomic(cache_path, calibrator.written)
        add_artifact(
            bundle,
            cache_path,
            CACHE_KIND,
            "int8",
            **calib.key,
            algorithm=CALIBRATION_ALGORITHM,
            samples=calibrator.samples,
            batch_size=opts.calib_batch,
        )
        log(f"wrote {CACHE_FILE} ({calibrator.samples} samples) into the bundle")
    return out
