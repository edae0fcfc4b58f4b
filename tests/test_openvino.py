"""The OpenVINO backend, for real, on the tiny test bundle (skipped, with the reason, where OpenVINO is not installed).

Without OpenVINO the package still imports and its ONNX Runtime paths run (tests/test_layering.py blocks the import);
``--backend openvino`` then fails in one line naming the extra (last test here, which runs everywhere).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hemaedge.edge.bundle import load_bundle, preprocess
from hemaedge.edge.bundle.golden import load_golden, write_golden
from hemaedge.edge.classify import openvino as openvino_mod
from hemaedge.edge.classify.onnxruntime import OrtBackend
from hemaedge.edge.classify.select import cpu_candidates, select_backend
from hemaedge.edge.errors import BackendError, MissingDependencyError

from hemaedge.cli import main

try:
    import openvino  # noqa: F401

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False

needs_openvino = pytest.mark.skipif(
    not HAVE_OPENVINO, reason="OpenVINO is not installed (pip install 'hemaedge[openvino]'; the dev extra has it)"
)


def _inputs(bundle, n: int = 20) -> np.ndarray:
    rng = np.random.default_rng(11)
    return preprocess([rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(n)], bundle.manifest.input)


@pytest.fixture()
def golden_bundle(tiny_bundle_dir):
    """The tiny bundle with golden outputs from ONNX Runtime (what export-model writes)."""
    b = load_bundle(tiny_bundle_dir)
    x = _inputs(b)
    outs = {}
    for p in ("fp32", "int8"):
        with OrtBackend(b, p, providers=["cpu"]) as be:
            outs[p] = be.run_raw(x)
    write_golden(b, x, outs)
    return load_bundle(tiny_bundle_dir)


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_openvino_computes_what_onnxruntime_computes(golden_bundle, precision, threads):
    """One thread: one request (latency); more: the batch is split over OpenVINO's streams and put back in order."""
    from hemaedge.edge.classify.openvino import OpenVinoBackend

    g = load_golden(golden_bundle)
    be = OpenVinoBackend(golden_bundle, precision, threads=threads)
    assert be._dynamic is None  # cheap constructor: nothing loaded yet
    with be:
        probs = be.classify(g.inputs)
        assert be.classify(g.inputs[:3]).shape == (3, 8)  # any batch size (the model's batch is dynamic)
        assert be.classify(g.inputs[:0]).shape == (0, 8)
        assert be.model_path.name == ("model.onnx" if precision == "fp32" else "model.int8.onnx")
        assert be.name == "openvino/CPU" and be.golden_key == precision and be.version
        assert len(be._dynamic.requests) == 1 or threads != 1  # one thread: one request, compiled for latency
        assert np.allclose(be.classify(g.inputs[5:8]), probs[5:8], atol=1e-6)  # rows stay in order
        # a batch size seen again gets a static-shape model (compiled in the background); same numbers
        for _ in range(3):
            be.classify(g.inputs[:6])
        be.settle()
        assert be.static_batches  # 6 (one request) or its per-stream chunks
        assert np.allclose(be.classify(g.inputs[:6]), probs[:6], atol=1e-5)
    assert be._dynamic is None and be.static_batches == []  # released on exit
    ref = g.outputs[precision]
    ref = np.exp(ref - ref.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert np.abs(probs - ref).max() < (1e-4 if precision == "fp32" else 0.05)


@needs_openvino
def test_openvino_refuses_misuse_in_one_line(golden_bundle):
    from hemaedge.edge.classify.openvino import OpenVinoBackend

    be = OpenVinoBackend(golden_bundle, "int8")
    with pytest.raises(BackendError, match="outside its 'with' block"):
        be.classify(np.zeros((1, 3, 28, 28), np.float32))
    with be, pytest.raises(BackendError, match=r"input shape \(2, 3, 32, 32\) does not match"):
        be.classify(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(BackendError, match="fp32 or int8"):
        OpenVinoBackend(golden_bundle, "fp16")
    (golden_bundle.path / "model.int8.onnx").write_bytes(b"not a model")
    with pytest.raises(BackendError, match="cannot load model.int8.onnx") as err:
        OpenVinoBackend(golden_bundle, "int8").__enter__()
    assert "\n" not in str(err.value)


@needs_openvino
def test_verify_covers_openvino(golden_bundle, capsys, monkeypatch):
    monkeypatch.setattr(openvino_mod, "int8_saturation", lambda: "")  # exact 8-bit kernels (see the test below)
    assert main(["verify", str(golden_bundle.path), "--backend", "openvino", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "openvino/CPU" and r["precision"] == "int8" and r["reference"] == "int8" and r["passed"]
    assert main(["verify", str(golden_bundle.path), "--backend", "ov", "--precision", "fp32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["reference"] == "fp32" and r["max_abs_diff"] < 1e-4
    assert main(["verify", str(golden_bundle.path), "--all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["backends"]
    assert {(r["backend"], r["passed"]) for r in rows} >= {("openvino/int8", True), ("openvino/fp32", True)}


@needs_openvino
def test_auto_measures_openvino_against_onnxruntime(golden_bundle, monkeypatch):
    """Real measurement (not timed by the test: whichever wins, it must have passed the golden check)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    backend, reason = select_backend(golden_bundle, threads=1, notify=lambda text: None)
    keys = {m.key for m in backend.measurements}
    assert keys == {"onnxruntime/int8", "onnxruntime/fp32", "openvino/int8", "openvino/fp32"}
    chosen = next(m for m in backend.measurements if m.key == backend.measured_key)
    assert chosen.eligible and chosen.golden["passed"] and chosen.crops_per_s > 0
    assert all(m.golden is not None for m in backend.measurements)
    assert "OpenVINO CPU int8" in reason and "ONNX Runtime CPU fp32" in reason
    with backend:
        assert backend.classify(load_golden(golden_bundle).inputs[:4]).shape == (4, 8)


@needs_openvino
def test_forced_openvino_skips_int8_that_missed_its_gate_at_export(golden_bundle, monkeypatch):
    import dataclasses

    from hemaedge.edge.bundle.io import write_manifest

    monkeypatch.setattr(openvino_mod, "int8_saturation", lambda: "")
    m = golden_bundle.manifest
    gate = {"accuracy": 0.9, "drop_points": 2.5, "max_drop": 1.0, "passed": False}
    write_manifest(golden_bundle.path, dataclasses.replace(m, metrics={**m.metrics, "int8_openvino": gate}))
    backend, reason = select_backend(golden_bundle.path, "openvino")
    assert backend.precision == "fp32" and "lost 2.50 points at export" in reason
    assert select_backend(golden_bundle.path, "openvino", "int8")[0].precision == "int8"  # asked for: honoured


SATURATES = "OpenVINO's INT8 kernels saturate on this CPU (as the test says)"


@needs_openvino
def test_on_a_cpu_without_vnni_openvino_int8_is_never_chosen_unless_asked_for(golden_bundle, monkeypatch):
    """AVX2 without VNNI: OpenVINO's INT8 kernels saturate (docs/openvino.md), so neither ``--backend openvino`` nor
    the measured choice runs its INT8; ``--precision int8`` still forces it."""
    monkeypatch.setattr(openvino_mod, "int8_saturation", lambda: SATURATES)
    backend, reason = select_backend(golden_bundle.path, "openvino")
    assert backend.precision == "fp32" and reason.count(SATURATES) == 1
    assert select_backend(golden_bundle.path, "openvino", "int8")[0].precision == "int8"
    candidates, _, _ = cpu_candidates(golden_bundle, "auto", 1)
    excluded = {c.key: c.excluded for c in candidates}
    assert excluded["openvino/int8"] == SATURATES and not excluded.get("openvino/fp32")
    monkeypatch.setattr(openvino_mod, "int8_saturation", lambda: "")
    assert not {c.key: c.excluded for c in cpu_candidates(golden_bundle, "auto", 1)[0]}["openvino/int8"]


@needs_openvino
def test_bench_compares_openvino_in_the_same_table(golden_bundle, capsys):
    code = main(
        ["bench", "--bundle", str(golden_bundle.path), "--skip-torch", "--skip-pipeline", "--batch", "4"]
        + ["--repeats", "1", "--json"]
    )
    assert code == 0
    crops = json.loads(capsys.readouterr().out)["crops"]
    assert {"openvino_fp32", "openvino_int8", "onnxruntime_fp32", "onnxruntime_int8"} <= set(crops)
    assert crops["openvino_int8"]["golden"]["passed"] and crops["openvino_int8"]["model_file"] == "model.int8.onnx"
    assert set(crops["vs_onnxruntime_fp32"]) >= {"openvino_int8", "onnxruntime_int8"}
    assert crops["chosen"]["row"] in ("openvino_fp32", "openvino_int8", "onnxruntime_fp32", "onnxruntime_int8")


def test_without_openvino_asking_for_it_names_the_extra(golden_bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)
    from hemaedge.edge.classify.openvino import OpenVinoBackend, openvino_version

    assert openvino_version() == ""
    with pytest.raises(MissingDependencyError, match=r"pip install 'hemaedge\[openvino\]'") as err:
        select_backend(golden_bundle, "openvino")
    assert "\n" not in str(err.value)
    with pytest.raises(MissingDependencyError, match="the OpenVINO backend needs 'openvino'"):
        OpenVinoBackend(golden_bundle).__enter__()
    assert main(["verify", str(golden_bundle.path), "--backend", "openvino"]) == 2
    err = capsys.readouterr().err.replace("\n", "")  # rich wraps the one line at the terminal's width
    assert err.startswith("error: --backend openvino: OpenVINO is not installed: pip install 'hemaedge[openvino]'")


# ---------------------------------------------------------------------------------------------------------------------
# the 8-bit arithmetic check (int8_probe.onnx)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_probe():
    openvino_mod.int8_saturation.cache_clear()
    yield openvino_mod.int8_saturation
    openvino_mod.int8_saturation.cache_clear()


def test_the_shipped_probe_is_what_its_script_builds(tmp_path):
    pytest.importorskip("onnx", reason="building the probe needs onnx (the export extra)")
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "make_int8_probe.py"))
    assert script["main"]([str(tmp_path / "p.onnx")]) == 0
    assert (tmp_path / "p.onnx").read_bytes() == openvino_mod.PROBE.read_bytes()


def test_the_reference_computes_the_probe_exactly():
    # ONNX Runtime's basic level computes each quantized step in float (the workstation's reference, which the
    # station compares OpenVINO with): on any CPU the probe's exact sums, 64 x 1 (on a 0.6 grid), 64 x 9 (on a grid
    # of 5) and 9, with the sign of each half of the weights
    from hemaedge.edge.classify.onnxruntime import reference_session

    sess = reference_session(openvino_mod.PROBE)
    outs = sess.run(None, {"x": np.ones(openvino_mod.PROBE_INPUT, np.float32)})
    want = {"pointwise": 64.2, "conv3x3": 575.0, "depthwise": 9.0}
    assert [o.name for o in sess.get_outputs()] == list(want)
    for y, exact in zip(outs, want.values()):
        half = y.shape[1] // 2
        np.testing.assert_allclose(y[0, :half], exact, rtol=1e-5)
        np.testing.assert_allclose(y[0, half:], -exact, rtol=1e-5)


@needs_openvino
def test_the_probe_says_what_the_cpu_flags_say_where_linux_shows_them(fresh_probe):
    """On x86 Linux the flags tell which CPUs sum 8-bit pairs in 16 bits; the probe must agree with them there (it is
    what decides on every other OS and CPU). This machine's CPU decides which branch runs."""
    import platform

    flags_file = Path("/proc/cpuinfo")
    if platform.machine().lower() not in ("x86_64", "amd64") or not flags_file.is_file():
        pytest.skip("CPU flags are read from /proc/cpuinfo on x86 Linux only")
    text = flags_file.read_text(errors="replace")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    saturating_cpu = "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & flags
    why = fresh_probe()
    assert bool(why) == saturating_cpu, (why, sorted(flags & {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"}))
    if why:
        assert why.startswith("OpenVINO's INT8 kernels saturate on this CPU") and "\n" not in why


def test_without_openvino_nothing_is_excluded_and_a_broken_probe_is_not_trusted(fresh_probe, monkeypatch, tmp_path):
    def missing():
        raise MissingDependencyError("no openvino")

    monkeypatch.setattr(openvino_mod, "_import_openvino", missing)
    assert fresh_probe() == ""
    if HAVE_OPENVINO:
        monkeypatch.undo()
        fresh_probe.cache_clear()
        (tmp_path / "p.onnx").write_bytes(b"not a model")
        monkeypatch.setattr(openvino_mod, "PROBE", tmp_path / "p.onnx")
        why = fresh_probe()
        assert why.startswith("OpenVINO's 8-bit arithmetic could not be checked on this CPU") and "\n" not in why
