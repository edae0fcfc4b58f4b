"""``hemaedge bench``: it runs on a bundle and reports what it measured (speeds are checked by running it, not here)."""

from __future__ import annotations

import json

import pytest

from hemaedge.cli import main


def test_bench_reports_every_precision_and_the_pipeline(tiny_bundle_dir, capsys):
    code = main(
        [
            "bench",
            "--bundle",
            str(tiny_bundle_dir),
            "--skip-torch",
            "--batch",
            "8",
            "--repeats",
            "1",
            "--frames",
            "6",
            "--json",
        ]
    )
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    crops = res["crops"]
    assert crops["batch"] == 8
    assert {"onnxruntime_fp32", "onnxruntime_int8"} <= set(crops)
    assert all(crops[k]["median"] > 0 for k in ("onnxruntime_fp32", "onnxruntime_int8"))
    assert "pytorch_eager_fp32" not in crops
    for run in ("panning_slide", "new_field_every_frame"):
        assert res["pipeline"][run]["frames_per_s"]["median"] > 0
    pipe = res["pipeline"]
    assert pipe["backend"].startswith(("onnxruntime/CPU", "openvino/CPU")) and "measured here" in pipe["backend_choice"]
    assert res["machine"]["cores"] >= 1 and "load_average_at_start" in res["machine"]
    chosen = crops["chosen"]
    assert crops[chosen["row"]]["station_candidate"] and crops[chosen["row"]]["median"] == chosen["crops_per_s"]
    assert all(
        crops[k]["median"] <= chosen["crops_per_s"]
        for k in crops
        if k in crops["vs_onnxruntime_fp32"] and crops[k]["station_candidate"] and not crops[k].get("excluded")
    )


def test_bench_never_names_an_excluded_backend_the_stations_choice(tiny_bundle_dir, capsys, monkeypatch):
    """On a CPU without VNNI OpenVINO's INT8 is measured but --backend auto never picks it; bench says the same."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'hemaedge[openvino]')")
    from hemaedge.edge.classify import openvino as openvino_mod

    monkeypatch.setattr(openvino_mod, "int8_saturation", lambda: "OpenVINO's INT8 kernels saturate here (test)")
    args = ["bench", "--bundle", str(tiny_bundle_dir), "--skip-torch", "--skip-pipeline", "--batch", "8"]
    assert main(args + ["--repeats", "1", "--json"]) == 0
    crops = json.loads(capsys.readouterr().out)["crops"]
    assert "saturate here (test)" in crops["openvino_int8"]["excluded"] and crops["chosen"]["row"] != "openvino_int8"


def test_eager_baseline_runs_in_a_child_process_and_checks_the_checkpoint(capsys):
    """The shipped bundle's eager baseline comes from its own checkpoint (sha256 checked) in a torch child process."""
    pytest.importorskip("torch")
    code = main(["bench", "--skip-pipeline", "--batch", "16", "--repeats", "1", "--json"])
    assert code == 0
    crops = json.loads(capsys.readouterr().out)["crops"]
    assert crops["pytorch_eager_fp32"]["median"] > 0
    assert set(crops["speedup_vs_pytorch_eager"]) >= {"onnxruntime_fp32", "onnxruntime_int8"}


def test_eager_baseline_refuses_a_checkpoint_of_another_model(tiny_bundle_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the model")
    code = main(
        [
            "bench",
            "--bundle",
            str(tiny_bundle_dir),
            "--checkpoint",
            str(other),
            "--skip-pipeline",
            "--batch",
            "4",
            "--repeats",
            "1",
        ]
    )
    assert code != 0
    err = capsys.readouterr().err
    assert "eager baseline failed" in err
