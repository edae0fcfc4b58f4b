"""Real TensorRT on a real GPU: the tests the contract fake cannot replace.

Marked ``tensorrt`` (deselected by default; run with ``python -m pytest -m tensorrt``
on a machine with TensorRT's Python bindings, cuda-python and an NVIDIA GPU). They
build engines from tiny bundles with the real builder, run them through the
TensorRT backend and compare with ONNX Runtime on the CPU, and check the golden
verification end to end. As of this writing they have never been run in this
project (see docs/tensorrt.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from hemaedge.edge.bundle import load_bundle
from hemaedge.edge.classify.onnxruntime import OrtBackend
from trt_helpers import calibration_folder, trt_bundle

pytestmark = pytest.mark.tensorrt


@pytest.fixture(scope="module")
def station():
    trt = pytest.importorskip("tensorrt", reason="TensorRT's Python bindings are not installed")
    from hemaedge.edge.classify.cuda_rt import CudaRuntime
    from hemaedge.edge.classify.engines import probe_station
    from hemaedge.edge.errors import HemaedgeError

    try:
        cuda = CudaRuntime()
        if cuda.device_count() == 0:
            pytest.skip("no CUDA device visible")
        return probe_station(trt, cuda)
    except HemaedgeError as exc:
        pytest.skip(f"CUDA not usable: {exc}")


def _batch(n: int = 37) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (n, 3, 28, 28)).astype(np.float32)


def _ort(bundle_dir, precision: str, x: np.ndarray) -> np.ndarray:
    with OrtBackend(load_bundle(bundle_dir), precision, providers=["cpu"]) as be:
        return be.classify(x)


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-2), ("fp16", 2e-2)])
def test_float_engines_match_onnxruntime(tmp_path, station, precision, atol):
    from hemaedge.edge.classify.tensorrt import TensorRTBackend
    from hemaedge.edge.classify.trt_build import build_for_bundle

    bundle_dir = trt_bundle(tmp_path / "b")
    result = build_for_bundle(bundle_dir, precision)
    assert result.trt_version == station.trt_version
    x = _batch()
    with TensorRTBackend(bundle_dir, precision=precision) as be:
        got = be.classify(x)
        assert be.io.api == ("tensor" if hasattr(be.engine, "num_io_tensors") else "bindings")
    np.testing.assert_allclose(got, _ort(bundle_dir, "fp32", x), atol=atol)


def test_explicit_int8_engine_agrees_with_onnxruntime_int8(tmp_path, station):
    from hemaedge.edge.classify.tensorrt import TensorRTBackend
    from hemaedge.edge.classify.trt_build import build_for_bundle

    bundle_dir = trt_bundle(tmp_path / "b")
    result = build_for_bundle(bundle_dir, "int8", allow_fp16_fallback=True)
    x = _batch(64)
    with TensorRTBackend(bundle_dir, precision=result.precision_built) as be:
        got = be.classify(x)
    want = _ort(bundle_dir, "int8", x)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9
    assert np.abs(got - want).max() < 0.2


def test_implicit_int8_calibration_writes_a_reusable_cache(tmp_path, station):
    from hemaedge.edge.classify.trt_build import CACHE_KIND, build_for_bundle

    bundle_dir = trt_bundle(tmp_path / "b")
    folder, _ = calibration_folder(tmp_path / "calib", n=32)
    first = build_for_bundle(bundle_dir, "int8", implicit_int8=True, calib_dir=folder, calib_batch=8)
    if first.precision_built != "int8":
        pytest.skip("this GPU has no fast INT8")
    assert load_bundle(bundle_dir).manifest.artifact("int8", CACHE_KIND).details["samples"] == 32
    second = build_for_bundle(bundle_dir, "int8", implicit_int8=True)
    assert second.calibration.startswith("reused calibration cache")


def test_verify_passes_on_this_gpu(tmp_path, station):
    from hemaedge.edge.bundle import preprocess
    from hemaedge.edge.bundle.golden import write_golden
    from hemaedge.edge.classify.trt_build import build_for_bundle
    from hemaedge.edge.commands.verify import verify

    bundle_dir = trt_bundle(tmp_path / "b")
    rng = np.random.default_rng(1)
    x = preprocess(
        [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(32)], load_bundle(bundle_dir).manifest.input
    )
    outs = {}
    for p in ("fp32", "int8"):
        with OrtBackend(load_bundle(bundle_dir), p, providers=["cpu"]) as be:
            outs[p] = be.run_raw(x)
    write_golden(bundle_dir, x, outs)
    build_for_bundle(bundle_dir, "fp32")
    report = verify(str(bundle_dir), backend="tensorrt", precision="fp32")
    assert report["backend"].startswith("tensorrt/fp32") and report["passed"], report
