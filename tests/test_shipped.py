"""The bundle and checkpoint shipped in the package: intact, honest about themselves, and rebuildable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hemaedge.edge.bundle import load_bundle, sha256_file
from hemaedge.edge.models import default_bundle_path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "export" / "checkpoints" / "bloodcnn5.pt"


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(default_bundle_path())


def test_shipped_bundle_verifies_and_meets_its_own_int8_bar(shipped):
    m = shipped.manifest
    assert m.precisions() == ["fp32", "int8"]
    assert {a.kind for a in m.artifacts} >= {"onnx", "golden"}
    assert m.input.height == m.input.width == 28 and len(m.classes) == 8
    assert m.calibration["num_images"] >= 400 and "train" in m.calibration["set"]
    fp32, int8 = m.metrics["fp32"]["accuracy"], m.metrics["int8"]["accuracy"]
    assert fp32 - int8 <= 0.003, "INT8 must stay within 0.3 points of its own FP32"
    assert m.provenance["training_recipe"]["arch"] == "bloodcnn5"
    assert m.provenance["export_command"].startswith("export-model")


def test_readme_records_the_commands_that_rebuilt_the_shipped_model(shipped):
    """Every training stage (the model is fine-tuned in stages) and the export command are in the README."""
    readme = (ROOT / "README.md").read_text()
    prov = shipped.manifest.provenance
    assert prov["export_command"] in readme
    stages = [st["recipe"] for st in prov.get("training_lineage", [])] + [prov["training_recipe"]]
    for recipe in stages:
        assert f"--out {recipe['out']}" in readme and f"--epochs {recipe['epochs']}" in readme
        if recipe.get("init"):
            assert f"--init {recipe['init']}" in readme


def test_shipped_checkpoint_is_the_bundles_source(shipped):
    if not CHECKPOINT.is_file():
        pytest.skip(f"checkpoint not in this installation: {CHECKPOINT}")
    assert sha256_file(CHECKPOINT) == shipped.manifest.provenance["source_model"]["sha256"]


def test_golden_outputs_reproduce_on_this_machine(shipped):
    res = subprocess.run(
        [sys.executable, "-m", "hemaedge", "verify", str(shipped.path), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-1500:]
    doc = json.loads(res.stdout)
    assert doc["passed"] is True


@pytest.mark.data
def test_shipped_bundle_transfers_to_another_microscope(shipped, data_root, capsys):
    """Detect + crop + classify on BCCD's held-out val frames (another microscope and stain): >= 0.85."""
    pytest.importorskip("onnxruntime")
    bccd = data_root / "bccd"
    if not (bccd / "wbc_types.csv").is_file():
        pytest.skip(f"data not found: {bccd}")
    from hemaedge.cli import main

    code = main(["evaluate", "--station", str(bccd), "--split", "val", "--bundle", str(shipped.path), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0 and rep["cells"] >= 80
    assert rep["accuracy"] >= 0.85, rep


@pytest.mark.data
def test_shipped_metrics_reproduce_on_val(shipped, data_root):
    pytest.importorskip("onnxruntime")
    from hemaedge.evaluation.command import evaluate_bundle

    npz = data_root / "bloodmnist28.npz"
    if not npz.is_file():
        pytest.skip(f"data not found: {npz}")
    metrics = shipped.manifest.metrics
    for variant, key in (("portable", "int8"), ("cpu", "int8_cpu")):
        rep = evaluate_bundle(shipped, str(npz), "val", "int8", variant=variant)
        assert rep["accuracy"] == pytest.approx(metrics[key]["accuracy"], abs=1e-9)
        assert rep["accuracy"] >= 0.98, variant


@pytest.mark.data
@pytest.mark.slow
def test_export_of_the_shipped_checkpoint_gives_the_same_contract(shipped, data_root, tmp_path):
    pytest.importorskip("torch")
    if not CHECKPOINT.is_file():
        pytest.skip(f"checkpoint not in this installation: {CHECKPOINT}")
    npz = data_root / "bloodmnist28.npz"
    if not npz.is_file():
        pytest.skip(f"data not found: {npz}")
    from hemaedge.export.exporter import ExportOptions, run_export

    out = tmp_path / "rebuilt"
    s = run_export(
        ExportOptions(
            source=str(CHECKPOINT),
            out=str(out),
            data=str(npz),
            int8=True,
            cell_fraction=shipped.manifest.crop.cell_fraction,
        ),
        log=lambda m: None,
    )
    new = load_bundle(out).manifest
    old = shipped.manifest
    assert (new.classes, new.input, new.crop, new.output_kind, new.class_groups) == (
        old.classes,
        old.input,
        old.crop,
        old.output_kind,
        old.class_groups,
    )
    assert sorted((a.kind, a.precision) for a in new.artifacts) == sorted((a.kind, a.precision) for a in old.artifacts)
    assert new.metrics["int8"]["accuracy"] == pytest.approx(old.metrics["int8"]["accuracy"], abs=0.002)
    assert s["seconds"] < 300


@pytest.fixture(scope="module")
def efficientnet():
    return load_bundle(default_bundle_path("effb0-pbc256"))


def test_shipped_efficientnet_bundle_meets_its_int8_gate_and_verifies(efficientnet):
    m = efficientnet.manifest
    assert m.architecture == "efficientnet_b0" and m.input.height == m.input.width == 256
    assert m.crop.scale == "session" and m.extra["crop_geometry_from"] == "measured on the training images"
    fp32, int8 = m.metrics["fp32"]["accuracy"], m.metrics["int8"]["accuracy"]
    assert int8 >= 0.98 and fp32 - int8 <= 0.01
    assert m.calibration["method"] == "entropy" and m.calibration["per_channel"]  # what the search chose
    assert m.provenance["export_command"] in (ROOT / "docs" / "efficientnet.md").read_text()  # how to rebuild it
    res = subprocess.run(
        [sys.executable, "-m", "hemaedge", "verify", str(efficientnet.path), "--precision", "int8", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-1500:]
    assert json.loads(res.stdout)["passed"] is True


@pytest.mark.data
def test_shipped_efficientnet_metrics_reproduce_on_val(efficientnet, data_root):
    pytest.importorskip("onnxruntime")
    from hemaedge.evaluation.command import evaluate_bundle

    folder = data_root / "pbc256"
    if not folder.is_dir():
        pytest.skip(f"data not found: {folder}")
    rep = evaluate_bundle(efficientnet, str(folder), "val", "int8", variant="portable")
    assert rep["accuracy"] == pytest.approx(efficientnet.manifest.metrics["int8"]["accuracy"], abs=1e-9)
