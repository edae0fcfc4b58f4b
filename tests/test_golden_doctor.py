"""Golden outputs + ``hemaedge verify`` (ONNX Runtime path, and the TensorRT path on the contract fake),
``hemaedge build-engine`` and ``hemaedge doctor``."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from fake_tensorrt import fake_pair
from hemaedge.edge.bundle import BundleWriter, load_bundle, preprocess
from hemaedge.edge.bundle.golden import GOLDEN_KIND, compare_golden, load_golden, write_golden
from hemaedge.edge.classify.onnxruntime import OrtBackend
from hemaedge.edge.commands import doctor
from hemaedge.edge.errors import BundleError
from trt_helpers import trt_bundle

from hemaedge.cli import main


def _raw_outputs(bundle_dir: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    b = load_bundle(bundle_dir)
    outs = {}
    for p in b.manifest.precisions("onnx"):
        with OrtBackend(b, p, providers=["cpu"]) as be:
            outs[p] = be.run_raw(x)
    return outs


def _inputs(bundle_dir: Path, n: int = 24) -> np.ndarray:
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(n)]
    return preprocess(images, load_bundle(bundle_dir).manifest.input)


def _with_golden(bundle_dir: Path) -> Path:
    x = _inputs(bundle_dir)
    summary = write_golden(bundle_dir, x, _raw_outputs(bundle_dir, x))
    assert summary["file"] == "golden.npz" and summary["samples"] == len(x)
    return bundle_dir


def test_write_golden_into_existing_bundle_and_load(tiny_bundle_dir):
    _with_golden(tiny_bundle_dir)
    b = load_bundle(tiny_bundle_dir)  # sha256 of golden.npz checked
    art = b.manifest.artifact(None, GOLDEN_KIND)
    assert art.details["precisions"] == ["fp32", "int8"] and art.details["samples"] == 24
    g = load_golden(b)
    assert g.inputs.shape == (24, 3, 28, 28) and set(g.outputs) == {"fp32", "int8"}
    assert not any(p.name.startswith("tmp") for p in tiny_bundle_dir.iterdir())  # no temp dir left behind


def test_write_golden_through_the_bundle_writer(tmp_path, tiny_bundle_dir):
    # What export-model does: write_golden(writer, inputs, outputs) before finish().
    src = load_bundle(tiny_bundle_dir)
    x = _inputs(tiny_bundle_dir, 8)
    with BundleWriter(tmp_path / "new") as w:
        w.add(src.onnx_path("fp32"), "onnx", "fp32")
        summary = write_golden(w, x, {"fp32": np.zeros((8, 8), np.float32), "int8": np.zeros((8, 8), np.float32)})
        out = w.finish(src.manifest)
    assert summary["fp32_int8_top1_agreement"] == 1.0
    assert load_golden(out).inputs.shape == (8, 3, 28, 28)


def test_verify_passes_on_onnxruntime(tiny_bundle_dir, capsys):
    _with_golden(tiny_bundle_dir)
    assert main(["verify", str(tiny_bundle_dir), "--backend", "ort-cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "onnxruntime/CPU" and r["precision"] == "int8" and r["reference"] == "int8"
    assert r["top1_agreement"] == 1.0 and r["max_abs_diff"] < 1e-5 and r["passed"]
    assert "int8 ONNX" in r["reason"] and set(r["others"]) == {"fp32"}
    assert main(["verify", str(tiny_bundle_dir), "--backend", "ort-cpu", "--precision", "fp32"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["verify", str(tiny_bundle_dir), "--json"]) == 0  # auto: whatever measured fastest here
    r = json.loads(capsys.readouterr().out)
    assert r["passed"] and "measured here" in r["reason"]


def test_verify_fails_when_the_station_disagrees(tiny_bundle_dir, capsys):
    x = _inputs(tiny_bundle_dir)
    outs = _raw_outputs(tiny_bundle_dir, x)
    outs["int8"] = outs["int8"][:, ::-1].copy()  # the "workstation" saw different numbers
    write_golden(tiny_bundle_dir, x, outs)
    assert main(["verify", str(tiny_bundle_dir), "--backend", "ort-cpu", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["passed"] is False
    assert main(["verify", str(tiny_bundle_dir), "--backend", "ort-cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["verify", str(tiny_bundle_dir), "--all", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["backends"]
    assert {(r["precision"], r["passed"]) for r in rows} == {("int8", False), ("fp32", True)}


def test_verify_all_shows_what_the_station_would_not_run_and_does_not_fail_on_it(tiny_bundle_dir, capsys, monkeypatch):
    # a backend the station never runs here (e.g. OpenVINO's INT8 where its 8-bit kernels saturate) is still checked
    # and shown, marked, with the reason; its failure is not the bundle's
    import dataclasses

    from hemaedge.edge.classify import select

    x = _inputs(tiny_bundle_dir)
    outs = _raw_outputs(tiny_bundle_dir, x)
    outs["int8"] = outs["int8"][:, ::-1].copy()
    write_golden(tiny_bundle_dir, x, outs)
    real = select.cpu_candidates

    def int8_excluded(*a, **k):
        cands, runtimes, note = real(*a, **k)
        why = "its 8-bit kernels saturate on this CPU (test)"
        return [dataclasses.replace(c, excluded=why) if c.precision == "int8" else c for c in cands], runtimes, note

    monkeypatch.setattr(select, "cpu_candidates", int8_excluded)
    assert main(["verify", str(tiny_bundle_dir), "--all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["backends"]
    assert {(r["precision"], r["passed"], r.get("excluded", "")[:3]) for r in rows} == {
        ("int8", False, "its"),
        ("fp32", True, ""),
    }
    assert main(["verify", str(tiny_bundle_dir), "--all"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the terminal may wrap the table and the notes
    assert "int8 is not used by the station here: its 8-bit kernels saturate on this CPU (test)" in out


def test_auto_never_picks_a_backend_that_fails_the_golden_check(tiny_bundle_dir, capsys):
    """The INT8 outputs disagree with the workstation's: however fast INT8 runs here, ``auto`` runs FP32, and says why."""
    x = _inputs(tiny_bundle_dir)
    outs = _raw_outputs(tiny_bundle_dir, x)
    outs["int8"] = outs["int8"][:, ::-1].copy()
    write_golden(tiny_bundle_dir, x, outs)
    assert main(["verify", str(tiny_bundle_dir), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["precision"] == "fp32" and r["passed"]
    assert "failed the golden check: ONNX Runtime CPU int8" in r["reason"]
    assert main(["verify", str(tiny_bundle_dir), "--precision", "int8"]) == 2  # only INT8 asked: refused
    assert "no backend here reproduces bundle" in capsys.readouterr().err


def test_verify_without_golden_outputs_is_a_one_line_error(tiny_bundle_dir, capsys):
    assert main(["verify", str(tiny_bundle_dir)]) == 2
    assert "has no golden outputs" in capsys.readouterr().err
    with pytest.raises(BundleError):
        load_golden(load_bundle(tiny_bundle_dir))


def test_station_calibrated_int8_is_compared_with_fp32(tiny_bundle_dir):
    _with_golden(tiny_bundle_dir)
    g = load_golden(load_bundle(tiny_bundle_dir))
    z = np.exp(g.outputs["fp32"] - g.outputs["fp32"].max(1, keepdims=True))
    probs = z / z.sum(1, keepdims=True)
    assert compare_golden(g, probs, "int8", station_calibrated=True).reference == "fp32"
    assert compare_golden(g, probs, "int8").reference == "int8"
    assert compare_golden(g, probs, "fp16").reference == "fp32"
    strict = compare_golden(g, probs, "fp32", max_diff=0.0)
    assert strict.max_abs_diff < 1e-6 and (strict.passed is (strict.max_abs_diff == 0.0))


# -- the TensorRT path end to end through the CLI, on the contract fake ---------------------------


@pytest.fixture()
def fake_tensorrt_installed(monkeypatch):
    """Install the fake as ``tensorrt`` and ``cuda.bindings.runtime`` (a CONTRACT fake, see fake_tensorrt.py)."""
    trt, rt = fake_pair("10.3.0")
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    for name, mod in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, mod)
    return trt


def test_build_engine_then_verify_on_tensorrt(tmp_path, fake_tensorrt_installed, capsys):
    bundle_dir = _with_golden(trt_bundle(tmp_path / "bundle"))
    assert main(["build-engine", str(bundle_dir), "--max-batch", "16", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["engine"] == "model.trt10.3.0.orin-sm87.int8.engine" and built["precision_built"] == "int8"
    assert built["profile"] == {"min": 1, "opt": 8, "max": 16}
    assert main(["verify", str(bundle_dir), "--backend", "tensorrt", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "tensorrt/int8 (Orin)" and r["reference"] == "int8" and r["passed"]
    assert r["top1_agreement"] == 1.0 and r["max_abs_diff"] < 1e-5


def test_build_engine_refusals_are_one_line_errors(tmp_path, fake_tensorrt_installed, capsys):
    bundle_dir = trt_bundle(tmp_path / "bundle")
    assert main(["build-engine", str(bundle_dir), "--precision", "fp16", "--implicit-int8"]) == 2
    assert "--implicit-int8 only applies to --precision int8" in capsys.readouterr().err
    assert main(["build-engine", str(bundle_dir), "--max-batch", "0"]) == 2
    assert "batch profile" in capsys.readouterr().err


def test_build_engine_without_tensorrt_names_the_install_step(tiny_bundle_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build-engine", str(tiny_bundle_dir), "--precision", "fp16"]) == 2
    assert "TensorRT is not installed: pip install tensorrt" in capsys.readouterr().err


# -- doctor ---------------------------------------------------------------------------------------


def test_doctor_runs_here_and_names_what_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["doctor", "--json"]) == 0
    rows = {r["area"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["TensorRT"]["status"] in ("optional", "missing") and "tensorrt" in rows["TensorRT"]["fix"]
    assert rows["ONNX Runtime"]["status"] == "ok"
    assert rows["runtime"]["detail"].startswith("hemaedge count will use ONNX Runtime")
    assert main(["doctor"]) == 0
    assert "hemaedge doctor" in capsys.readouterr().out


def test_doctor_reads_jetson_release_files(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n"
    )
    rows, facts = doctor.check_board(str(tmp_path))
    assert facts["jetson"] and facts["l4t"] == "35.4.1" and facts["jetpack"] == "5"
    assert rows[0].detail == "NVIDIA Jetson Orin Nano Developer Kit"
    assert "L4T 35.4.1" in rows[1].detail
    assert doctor.jetpack_major("36.3.0") == "6" and doctor.parse_l4t("garbage") == ""
    cams = doctor.check_cameras(facts, str(tmp_path))
    assert cams[0].status == "missing" and "v4l2-ctl" in cams[0].fix


def test_doctor_bundle_row_says_which_backend_and_what_was_measured(
    tiny_bundle_dir, monkeypatch, fresh_measurement_cache
):
    import hemaedge.edge.classify.measure as measure_mod
    from helpers import fake_measure

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    fake = fake_measure({"onnxruntime/int8": 900.0, "onnxruntime/fp32": 300.0, "openvino/int8": 500.0})
    monkeypatch.setattr(measure_mod, "measure", fake)
    row, *measured = doctor.check_bundle(str(tiny_bundle_dir))
    assert row.status == "ok" and "TensorRT not installed: using ONNX Runtime CPU (int8 ONNX)" in row.detail
    assert {m.area for m in measured} == {"measured"} and len(measured) == len(fake.calls[0])
    assert any("900 crops/s" in m.detail and m.detail.endswith("<- chosen") for m in measured)
    doctor.check_bundle(str(tiny_bundle_dir))
    assert len(fake.calls) == 1  # the second look reads the cache
    doctor.check_bundle(str(tiny_bundle_dir), remeasure=True)
    assert len(fake.calls) == 2
