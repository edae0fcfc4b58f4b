"""Contract tests of hemaedge's calls into TensorRT 8.x / 10.x and cuda-python.

These run against ``tests/fake_tensorrt.py``, a fake of the documented Python
APIs. They are a CONTRACT TEST OF OUR CALLS, NOT EVIDENCE THAT TENSORRT
WORKS: they prove we drive each API generation in a valid, documented order
(network flags, parser, builder config and profiles, the INT8 calibrator
protocol, bindings vs tensor I/O, stream copies and synchronisation), and
that our cache, naming and fallback rules hold. They cannot show that real
TensorRT accepts our models or what accuracy/speed its engines have; the
``tensorrt``-marked tests in test_tensorrt_real.py do that where TensorRT exists.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fake_tensorrt import fake_pair
from hemaedge.edge.bundle import load_bundle, preprocess
from hemaedge.edge.bundle.io import write_manifest
from hemaedge.edge.classify.cuda_rt import GpuInfo, gpu_slug
from hemaedge.edge.classify.engines import engine_file_name, find_engine, parse_engine_file_name, probe_station
from hemaedge.edge.classify.onnxruntime import OrtBackend
from hemaedge.edge.classify.select import select_backend
from hemaedge.edge.classify.tensorrt import EngineMismatchError, TensorRTBackend
from hemaedge.edge.classify.trt_build import (
    CACHE_KIND,
    BatchProfile,
    build_for_bundle,
    fast_precisions,
    plan_precision,
    qdq_problems,
)
from hemaedge.edge.errors import BackendError, UsageError
from trt_helpers import calibration_folder, trt_bundle

VERSIONS = ("8.2.1.8", "8.5.2.2", "10.3.0")  # bindings-only, both APIs, tensor-only


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    return trt_bundle(tmp_path / "bundle")


def _engines(path: Path):
    return [a for a in load_bundle(path).manifest.artifacts if a.kind == "engine"]


# -- naming ---------------------------------------------------------------------------------------


def test_engine_file_name_round_trip():
    name = engine_file_name("8.5.2.2", "orin-sm87", "int8")
    assert name == "model.trt8.5.2.2.orin-sm87.int8.engine"
    assert parse_engine_file_name(name) == ("8.5.2.2", "orin-sm87", "int8")
    assert parse_engine_file_name("model.onnx") is None
    assert gpu_slug("NVIDIA GeForce RTX 4090", 8, 9) == "nvidia-geforce-rtx-4090-sm89"
    assert GpuInfo("NVIDIA Tegra X1", 5, 3).slug == "nvidia-tegra-x1-sm53"
    with pytest.raises(ValueError):
        engine_file_name("10.3.0", "orin-sm87", "int4")


# -- building -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_explicit_int8_build_lists_engine_with_identity(bundle_dir, version):
    trt, rt = fake_pair(version)
    result = build_for_bundle(bundle_dir, "int8", trt=trt, cudart=rt)
    assert result.precision_built == "int8" and result.mode == "explicit-int8"
    assert result.path.name == f"model.trt{version}.orin-sm87.int8.engine"
    # 8.x needs EXPLICIT_BATCH; 10.x networks are always explicit-batch and the flag is deprecated.
    assert trt.fake_log.network_flags == [1 if version.startswith("8.") else 0]
    assert trt.fake_log.builder_flags[-1] == {trt.BuilderFlag.INT8}
    assert trt.fake_log.calibration == []  # QDQ carries its scales
    (art,) = _engines(bundle_dir)  # load_bundle verified its sha256
    assert art.precision == "int8" and art.file == result.path.name
    d = art.details
    assert d["tensorrt_version"] == version and d["gpu_slug"] == "orin-sm87" and d["mode"] == "explicit-int8"
    assert d["source_onnx"] == "model.int8.onnx" and d["profile"] == {"min": 1, "opt": 8, "max": 64}
    header = json.loads(result.path.read_bytes().split(b"\n", 1)[1])
    assert header["profile"] == [[1, 3, 28, 28], [8, 3, 28, 28], [64, 3, 28, 28]]


def test_asymmetric_qdq_refused_before_building(tiny_bundle_dir):
    assert qdq_problems(load_bundle(tiny_bundle_dir).onnx_path("int8"))  # ORT's default int8 is asymmetric
    trt, rt = fake_pair()
    with pytest.raises(UsageError, match="not TensorRT-compatible INT8"):
        build_for_bundle(tiny_bundle_dir, "int8", trt=trt, cudart=rt)
    assert trt.fake_log.builds == 0


def test_fp16_build_and_profile_option(bundle_dir):
    trt, rt = fake_pair("10.3.0")
    result = build_for_bundle(bundle_dir, "fp16", profile=BatchProfile.for_max(32, 4), trt=trt, cudart=rt)
    assert result.precision_built == "fp16" and trt.fake_log.builder_flags[-1] == {trt.BuilderFlag.FP16}
    assert _engines(bundle_dir)[0].details["source_onnx"] == "model.onnx"
    assert result.profile == BatchProfile(1, 4, 32)


def test_no_fast_int8_is_refused_unless_fp16_fallback_allowed(bundle_dir):
    trt, rt = fake_pair("8.5.2.2", gpu_name="NVIDIA Tegra X1", cc=(5, 3), fast_int8=False)
    with pytest.raises(UsageError, match="no fast INT8.*--allow-fp16-fallback"):
        build_for_bundle(bundle_dir, "int8", trt=trt, cudart=rt)
    assert trt.fake_log.builds == 0 and _engines(bundle_dir) == []
    result = build_for_bundle(bundle_dir, "int8", allow_fp16_fallback=True, trt=trt, cudart=rt)
    (art,) = _engines(bundle_dir)
    assert result.precision_built == "fp16" and art.precision == "fp16"  # the manifest says what was built
    assert art.details["precision_requested"] == "int8" and "no fast INT8" in art.details["notes"][0]
    assert art.file.endswith(".nvidia-tegra-x1-sm53.fp16.engine")


def test_fast_precision_falls_back_to_compute_capability_when_flags_are_gone():
    trt, _ = fake_pair("10.6.0", platform_flags=False)
    builder = trt.Builder(trt.Logger())
    assert fast_precisions(builder, GpuInfo("NVIDIA Tegra X1", 5, 3)) == (False, True)
    assert fast_precisions(builder, GpuInfo("NVIDIA Tegra X2", 6, 2)) == (False, True)
    assert fast_precisions(builder, GpuInfo("Orin", 8, 7)) == (True, True)
    with pytest.raises(UsageError, match="fp32"):
        plan_precision("fp16", True, False, False, GpuInfo("old", 5, 2))


@pytest.mark.parametrize("version,how", [("8.2.1.8", "max_workspace_size"), ("8.5.2.2", "pool"), ("10.3.0", "pool")])
def test_workspace_limit_uses_the_api_of_each_generation(bundle_dir, version, how):
    trt, rt = fake_pair(version)
    build_for_bundle(bundle_dir, "fp32", workspace_mb=256, trt=trt, cudart=rt)
    assert trt.fake_log.workspace == [(how, 256 << 20)]


def test_refusals_before_any_work(bundle_dir, tmp_path):
    trt, rt = fake_pair()
    with pytest.raises(UsageError, match="--implicit-int8 only"):
        build_for_bundle(bundle_dir, "fp16", implicit_int8=True, trt=trt, cudart=rt)
    with pytest.raises(UsageError, match="--calib is used only"):
        build_for_bundle(bundle_dir, "int8", calib_dir=tmp_path, trt=trt, cudart=rt)
    with pytest.raises(UsageError, match="precision"):
        build_for_bundle(bundle_dir, "int4", trt=trt, cudart=rt)
    no_int8 = trt_bundle(tmp_path / "fp32only", int8=False)
    with pytest.raises(UsageError, match="no int8"):
        build_for_bundle(no_int8, "int8", trt=trt, cudart=rt)
    with pytest.raises(UsageError, match="no calibration cache.*--calib DIR"):
        build_for_bundle(bundle_dir, "int8", implicit_int8=True, trt=trt, cudart=rt)
    assert trt.fake_log.builds == 0


# -- implicit INT8 and the calibration cache ------------------------------------------------------


@pytest.mark.parametrize("version", ("8.5.2.2", "10.3.0"))
def test_implicit_int8_calibrates_with_runtime_preprocessing_and_stores_cache(bundle_dir, tmp_path, version):
    folder, images = calibration_folder(tmp_path / "calib", n=20)
    trt, rt = fake_pair(version)
    result = build_for_bundle(
        bundle_dir, "int8", implicit_int8=True, calib_dir=folder, calib_batch=8, trt=trt, cudart=rt
    )
    assert result.mode == "implicit-int8" and "no calibration cache" in result.calibration
    (rec,) = trt.fake_log.calibration
    assert rec == {"from_cache": False, "batches": 3}  # 20 images in batches of 8, the last one padded
    header = json.loads(result.path.read_bytes().split(b"\n", 1)[1])
    spec = load_bundle(bundle_dir).manifest.input
    expected = float(np.abs(preprocess(images, spec, colour_order="RGB")).max())
    assert header["calibration"]["absmax"] == pytest.approx(expected, rel=1e-6)  # the device saw runtime preprocessing
    m = load_bundle(bundle_dir).manifest
    cache = m.artifact("int8", CACHE_KIND)
    assert cache.file == "calibration.cache"
    assert cache.details["model_sha256"] == m.artifact("fp32", "onnx").sha256
    assert cache.details["input_shape"] == [3, 28, 28] and cache.details["tensorrt_version"] == version
    assert cache.details["samples"] == 24 and cache.details["algorithm"] == "entropy2"
    assert (bundle_dir / "calibration.cache").read_bytes().startswith(f"TRT-{version}".encode())
    assert rt.cudaGetDeviceCount()[1] == 1 and trt.fake_gpu.leaks()["device"] == 0  # calibration buffer freed


def test_matching_cache_is_reused_without_images(bundle_dir, tmp_path):
    folder, _ = calibration_folder(tmp_path / "calib", n=8)
    trt, rt = fake_pair("10.3.0")
    build_for_bundle(bundle_dir, "int8", implicit_int8=True, calib_dir=folder, calib_batch=4, trt=trt, cudart=rt)
    second = build_for_bundle(bundle_dir, "int8", implicit_int8=True, trt=trt, cudart=rt)
    assert trt.fake_log.calibration[-1] == {"from_cache": True, "batches": 0}
    assert second.calibration.startswith("reused calibration cache calibration.cache")
    again = build_for_bundle(
        bundle_dir, "int8", implicit_int8=True, calib_dir=folder, calib_batch=4, recalibrate=True, trt=trt, cudart=rt
    )
    assert trt.fake_log.calibration[-1]["from_cache"] is False and "--recalibrate" in again.calibration


def _tamper_cache(bundle_dir: Path, **changes) -> None:
    b = load_bundle(bundle_dir)
    arts = tuple(
        replace(a, details={**a.details, **changes}) if a.kind == CACHE_KIND else a for a in b.manifest.artifacts
    )
    write_manifest(b.path, replace(b.manifest, artifacts=arts))


@pytest.mark.parametrize(
    "field,value", [("model_sha256", "0" * 64), ("input_shape", [3, 64, 64]), ("preprocess", "feedfacefeedface")]
)
def test_stale_cache_is_rebuilt_and_says_why(bundle_dir, tmp_path, field, value):
    folder, _ = calibration_folder(tmp_path / "calib", n=8)
    trt, rt = fake_pair("10.3.0")
    build_for_bundle(bundle_dir, "int8", implicit_int8=True, calib_dir=folder, calib_batch=4, trt=trt, cudart=rt)
    _tamper_cache(bundle_dir, **{field: value})
    with pytest.raises(UsageError, match=f"stale.*{field}.*--calib DIR"):
        build_for_bundle(bundle_dir, "int8", implicit_int8=True, trt=trt, cudart=rt)
    result = build_for_bundle(
        bundle_dir, "int8", implicit_int8=True, calib_dir=folder, calib_batch=4, trt=trt, cudart=rt
    )
    assert trt.fake_log.calibration[-1]["from_cache"] is False
    assert "stale" in result.calibration and field in result.calibration
    fresh = load_bundle(bundle_dir).manifest.artifact("int8", CACHE_KIND)
    assert fresh.details[field] != value  # the rebuilt cache records the current key


def test_cache_from_another_tensorrt_version_is_not_reused(bundle_dir, tmp_path):
    folder, _ = calibration_folder(tmp_path / "calib", n=8)
    old_trt, old_rt = fake_pair("8.6.1.6")
    build_for_bundle(
        bundle_dir, "int8", implicit_int8=True, calib_dir=folder, calib_batch=4, trt=old_trt, cudart=old_rt
    )
    trt, rt = fake_pair("10.3.0")
    result = build_for_bundle(
        bundle_dir, "int8", implicit_int8=True, calib_dir=folder, calib_batch=4, trt=trt, cudart=rt
    )
    assert trt.fake_log.calibration[-1]["from_cache"] is False
    assert "tensorrt_version '8.6.1.6' != '10.3.0'" in result.calibration
    assert any("deprecated since TensorRT 10.1" in n for n in result.notes)
    assert {a.details["tensorrt_version"] for a in _engines(bundle_dir)} == {"8.6.1.6", "10.3.0"}


# -- the backend's run loop -----------------------------------------------------------------------


@pytest.mark.parametrize("version,api", [("8.2.1.8", "bindings"), ("8.5.2.2", "tensor"), ("10.3.0", "tensor")])
def test_backend_run_loop_matches_onnxruntime(bundle_dir, version, api):
    trt, rt = fake_pair(version)
    build_for_bundle(bundle_dir, "fp32", trt=trt, cudart=rt)
    rng = np.random.default_rng(0)
    batch = rng.normal(0, 1, (70, 3, 28, 28)).astype(np.float32)
    with OrtBackend(load_bundle(bundle_dir), "fp32", providers=["cpu"]) as ort_backend:
        want = ort_backend.classify(batch)
    backend = TensorRTBackend(bundle_dir, precision="fp32", trt=trt, cudart=rt)
    assert backend.engine is None and trt.fake_gpu.leaks() == {"device": 0, "pinned": 0, "streams": 0}  # cheap ctor
    with backend:
        assert backend.io.api == api and backend.name == "tensorrt/fp32 (Orin)"
        for n in (1, 5, 8, 5, 70):  # 70 > profile max 64: split into 64 + 6
            got = backend.classify(batch[:n])
            np.testing.assert_allclose(got, want[:n], atol=1e-5)
        assert sorted(backend.buffers) == [1, 8, 64]  # one allocation per batch-size bucket, reused
        assert backend.classify(np.zeros((0, 3, 28, 28), np.float32)).shape == (0, 8)
    assert trt.fake_gpu.pageable_async_copies == 0  # async copies go through pinned buffers
    assert trt.fake_gpu.leaks() == {"device": 0, "pinned": 0, "streams": 0}


def test_backend_used_outside_with_block(bundle_dir):
    trt, rt = fake_pair()
    build_for_bundle(bundle_dir, "fp32", trt=trt, cudart=rt)
    with pytest.raises(BackendError, match="outside"):
        TensorRTBackend(bundle_dir, trt=trt, cudart=rt).run_raw(np.zeros((1, 3, 28, 28), np.float32))


def test_engine_for_another_tensorrt_version_is_refused_with_the_command(bundle_dir):
    old_trt, old_rt = fake_pair("8.5.2.2")
    build_for_bundle(bundle_dir, "int8", trt=old_trt, cudart=old_rt)
    trt, rt = fake_pair("10.3.0")
    with pytest.raises(EngineMismatchError) as err:
        TensorRTBackend(bundle_dir, precision="int8", trt=trt, cudart=rt).__enter__()
    msg = str(err.value)
    assert "TensorRT 8.5.2.2 (this station has 10.3.0)" in msg
    assert f"hemaedge build-engine {bundle_dir} --precision int8" in msg


def test_engine_for_another_gpu_is_rebuilt_when_asked(bundle_dir):
    other_trt, other_rt = fake_pair("10.3.0", gpu_name="NVIDIA GeForce RTX 4090", cc=(8, 9))
    build_for_bundle(bundle_dir, "int8", trt=other_trt, cudart=other_rt)
    trt, rt = fake_pair("10.3.0")
    station = probe_station(trt, __import__("hemaedge.edge.classify.cuda_rt", fromlist=["CudaRuntime"]).CudaRuntime(rt))
    art, why = find_engine(load_bundle(bundle_dir).manifest, station, "int8")
    assert art is None and "GPU nvidia-geforce-rtx-4090-sm89 (this station has orin-sm87)" in why
    with TensorRTBackend(bundle_dir, precision="int8", rebuild=True, trt=trt, cudart=rt) as backend:
        assert backend.artifact.file == "model.trt10.3.0.orin-sm87.int8.engine"
        assert "rebuilding" in backend.notes[0]
        assert backend.classify(np.zeros((3, 3, 28, 28), np.float32)).shape == (3, 8)
    assert len(_engines(bundle_dir)) == 2  # the other station's engine stays listed


def test_runtime_check_catches_an_engine_that_does_not_deserialise(bundle_dir):
    trt, rt = fake_pair("10.3.0")
    result = build_for_bundle(bundle_dir, "fp32", trt=trt, cudart=rt)
    # Same name and manifest identity, but a plan TensorRT cannot read (e.g. copied from elsewhere).
    result.path.write_bytes(b"not a plan")
    b = load_bundle(bundle_dir, verify=False)
    from hemaedge.edge.bundle.io import add_artifact

    art = b.manifest.artifact("fp32", "engine")
    add_artifact(b, result.path, "engine", "fp32", **art.details)
    with pytest.raises(EngineMismatchError, match="cannot load .*magic tag.*hemaedge build-engine"):
        TensorRTBackend(bundle_dir, trt=trt, cudart=rt).__enter__()


# -- selection and fallbacks ----------------------------------------------------------------------


def _block(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


@pytest.fixture()
def ort_int8_fastest(monkeypatch, fresh_measurement_cache):
    """On the CPU ``auto`` measures; here the measurement is fixed (ONNX Runtime INT8 fastest), not timed."""
    import hemaedge.edge.classify.measure as measure_mod
    from helpers import fake_measure

    fake = fake_measure({"onnxruntime/int8": 900.0, "onnxruntime/fp32": 300.0, "openvino/int8": 500.0})
    monkeypatch.setattr(measure_mod, "measure", fake)
    return fake


def test_select_prefers_this_stations_engine(bundle_dir):
    trt, rt = fake_pair("10.3.0")
    build_for_bundle(bundle_dir, "int8", trt=trt, cudart=rt)
    backend, reason = select_backend(bundle_dir, trt=trt, cudart=rt)
    assert isinstance(backend, TensorRTBackend)
    assert reason == "using TensorRT 10.3.0 engine model.trt10.3.0.orin-sm87.int8.engine (int8) on Orin"
    with backend:
        assert backend.classify(np.zeros((2, 3, 28, 28), np.float32)).shape == (2, 8)


def test_select_falls_back_to_ort_when_no_engine_fits(bundle_dir, ort_int8_fastest):
    old_trt, old_rt = fake_pair("8.5.2.2")
    build_for_bundle(bundle_dir, "int8", trt=old_trt, cudart=old_rt)
    trt, rt = fake_pair("10.3.0")
    backend, reason = select_backend(bundle_dir, trt=trt, cudart=rt)
    assert isinstance(backend, OrtBackend)
    assert reason.startswith(
        "no TensorRT engine for this station (model.trt8.5.2.2.orin-sm87.int8.engine was built for "
        "TensorRT 8.5.2.2 (this station has 10.3.0); build one with: hemaedge build-engine"
    )
    assert ": using ONNX Runtime CPU (int8 ONNX), the fastest of " in reason
    backend, reason = select_backend(bundle_dir, build_missing=True, trt=trt, cudart=rt)
    assert isinstance(backend, TensorRTBackend) and "building an engine first" in reason


def test_select_without_tensorrt_uses_onnxruntime_and_says_so(bundle_dir, monkeypatch, ort_int8_fastest):
    _block(monkeypatch, "tensorrt")
    backend, reason = select_backend(bundle_dir)
    assert isinstance(backend, OrtBackend)
    assert reason.startswith("TensorRT not installed: using ONNX Runtime CPU (int8 ONNX), the fastest of")
    with backend:
        assert backend.classify(np.zeros((2, 3, 28, 28), np.float32)).shape == (2, 8)
    with pytest.raises(BackendError, match="--backend tensorrt is not possible here: TensorRT not installed: "):
        select_backend(bundle_dir, "tensorrt")
    _, reason = select_backend(bundle_dir, precision="fp32")
    assert "using ONNX Runtime CPU (fp32 ONNX)" in reason


def test_forced_ort_cpu_runs_fp32_when_int8_measured_slower_at_export(bundle_dir, monkeypatch):
    """``--backend ort-cpu`` is not measured on the station: its ``auto`` precision follows the export's measurement
    (EfficientNet's INT8 is slower than its FP32 on ONNX Runtime CPU). ``--backend auto`` measures instead
    (tests/test_measure.py)."""
    import dataclasses

    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.bundle.io import write_manifest

    _block(monkeypatch, "tensorrt")
    bundle = load_bundle(bundle_dir)
    for int8_speed, want in ((74.0, "fp32"), (900.0, "int8")):
        metrics = {**bundle.manifest.metrics, "cpu_speed": {"fp32": 220.0, "int8": int8_speed}}
        write_manifest(bundle_dir, dataclasses.replace(bundle.manifest, metrics=metrics))
        backend, reason = select_backend(bundle_dir, "ort-cpu")
        assert backend.precision == want, reason
        assert ("INT8 ran slower than FP32 on CPU at export (74 vs 220 crops/s)" in reason) == (want == "fp32")
        assert select_backend(bundle_dir, "ort-cpu", precision="int8")[0].precision == "int8"  # a request wins


def test_select_without_cuda_python(bundle_dir, monkeypatch, ort_int8_fastest):
    _block(monkeypatch, "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")
    trt, _ = fake_pair("10.3.0")
    backend, reason = select_backend(bundle_dir, trt=trt)
    assert isinstance(backend, OrtBackend) and reason.startswith("cuda-python not installed")


def test_select_orders_onnxruntime_gpu_providers(bundle_dir, monkeypatch):
    import hemaedge.edge.classify.onnxruntime as ort_mod

    _block(monkeypatch, "tensorrt")
    monkeypatch.setattr(
        ort_mod,
        "available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    backend, reason = select_backend(bundle_dir)
    assert reason == "TensorRT not installed: using ONNX Runtime TensorRT EP (fp32 ONNX)"
    assert backend.want == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    backend, reason = select_backend(bundle_dir, "cuda", precision="fp16")
    assert (
        reason
        == "using ONNX Runtime CUDA (fp32 ONNX); fp16 is a TensorRT engine precision; ONNX Runtime runs the fp32 model"
    )
    backend, reason = select_backend(bundle_dir, "cpu")
    assert reason == "using ONNX Runtime CPU (int8 ONNX)" and backend.precision == "int8"


def test_select_refuses_what_it_cannot_honour(bundle_dir, tmp_path, monkeypatch):
    _block(monkeypatch, "tensorrt")
    with pytest.raises(BackendError, match="not CUDAExecutionProvider: pip install onnxruntime-gpu"):
        select_backend(bundle_dir, "ort-cuda")
    with pytest.raises(UsageError, match="unknown backend"):
        select_backend(bundle_dir, "directml")
    with pytest.raises(UsageError, match="unknown precision"):
        select_backend(bundle_dir, precision="int4")
    with pytest.raises(UsageError, match="no int8 ONNX"):
        select_backend(trt_bundle(tmp_path / "fp32only", int8=False), precision="int8")


def test_runtime_modules_import_without_tensorrt_or_cuda(tmp_path):
    import subprocess

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt', 'cuda', 'torch', 'pycuda'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import hemaedge.edge.classify.select, hemaedge.edge.classify.tensorrt, hemaedge.edge.classify.trt_build, hemaedge.edge.bundle.golden\n"
        "import hemaedge.edge.commands.verify, hemaedge.edge.commands.doctor, hemaedge.edge.commands.build_engine, hemaedge.export.commands.export\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "ok", out.stderr


def test_backend_refuses_a_wrong_input_shape_without_caching_buffers(bundle_dir):
    trt, rt = fake_pair()
    build_for_bundle(bundle_dir, "fp32", trt=trt, cudart=rt)
    with TensorRTBackend(bundle_dir, trt=trt, cudart=rt) as backend:
        with pytest.raises(BackendError, match="refused input shape"):
            backend.classify(np.zeros((2, 3, 32, 32), np.float32))
        assert backend.buffers == {}
        assert backend.classify(np.zeros((2, 3, 28, 28), np.float32)).shape == (2, 8)


class _NoDriverCudart:
    """cuda-python 11.x (JetPack 5's) without a loadable libcuda.so.1: its calls raise instead of returning an error.

    Observed with cuda-python 11.8.2 on a machine without an NVIDIA driver; 12.x returns an error code.
    """

    def cudaGetDeviceCount(self):
        raise RuntimeError("Failed to dlopen libcuda.so.1")

    def cudaGetDeviceProperties(self, device):
        raise RuntimeError("Failed to dlopen libcuda.so.1")


def test_no_loadable_cuda_driver_falls_back_instead_of_crashing(bundle_dir, ort_int8_fastest):
    from hemaedge.edge.classify.cuda_rt import CudaRuntime

    cuda = CudaRuntime(_NoDriverCudart())
    assert cuda.device_count() == 0
    with pytest.raises(BackendError, match="CUDA driver not usable"):
        cuda.gpu(0)
    trt, _ = fake_pair()
    backend, reason = select_backend(bundle_dir, "auto", trt=trt, cudart=_NoDriverCudart())
    assert isinstance(backend, OrtBackend) and "no usable CUDA GPU" in reason
