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
    """The BloodMNIST 28x28 CNN (seed 1's reproduction; the default until 2026-12-07)."""
    return load_bundle(default_bundle_path("bloodcnn5"))


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
    # re-quantized from its own FP32 model with Q/DQ on the inputs of weighted operators only (docs/openvino.md);
    # the checkpoint it was first exported from is named by the parent record
    assert m.calibration["ops"] == "weighted" and m.provenance["source_model"]["kind"] == "bundle"
    assert m.provenance["parent_bundle"]["source_model"]["file"] == "best_e21.pt"
    assert m.provenance["parent_bundle"]["calibration"].get("ops", "all") == "all"
    from hemaedge.edge.classify.trt_build import qdq_problems

    assert qdq_problems(efficientnet.onnx_path("int8")) == []  # symmetric signed INT8, as TensorRT requires
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


@pytest.mark.parametrize("name", ["bloodcnn5", "effb0-pbc256", "hemanet64", "hemanet64-blast", "hemanet64-sn"])
def test_shipped_bundles_carry_their_int8_gate_on_openvino(name):
    """Measured on val with ``hemaedge evaluate --backend openvino --record`` (they predate export measuring it)."""
    m = load_bundle(default_bundle_path(name)).manifest
    gate = m.metrics["int8_openvino"]
    assert gate["passed"] and gate["model_file"] == "model.int8.onnx" and gate["drop_points"] <= m.metrics["max_drop"]
    assert gate["drop_points"] == pytest.approx((m.metrics["fp32"]["accuracy"] - gate["accuracy"]) * 100, abs=1e-3)


@pytest.mark.data
def test_shipped_efficientnet_int8_gate_on_openvino_reproduces_on_val(efficientnet, data_root):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'hemaedge[openvino]')")
    from hemaedge.evaluation.command import evaluate_bundle

    folder = data_root / "pbc256"
    if not folder.is_dir():
        pytest.skip(f"data not found: {folder}")
    from hemaedge.edge.classify.openvino import int8_saturation
    from hemaedge.edge.classify.select import _openvino_gate

    if int8_saturation():  # the manifest's number was measured on a CPU with VNNI; here OpenVINO's INT8 saturates
        assert _openvino_gate(efficientnet) == int8_saturation()  # so the station never chooses it (docs/openvino.md)
        return
    rep = evaluate_bundle(efficientnet, str(folder), "val", "int8", backend="openvino")
    # OpenVINO's kernels may round differently across versions and CPUs: allow two images of 1,731
    assert rep["accuracy"] == pytest.approx(efficientnet.manifest.metrics["int8_openvino"]["accuracy"], abs=0.0012)


# The multi-source station models (docs/models.md): hemanet at 64 px, trained on PBC, DeepAPL's training patients and
# BCCD train. DeepAPL is research-use data, so both say so wherever the model's results are shown.


@pytest.mark.parametrize("name", ["hemanet64", "hemanet64-blast"])
def test_multisource_bundles_are_intact_and_say_they_are_research_use_only(name):
    b = load_bundle(default_bundle_path(name))
    m = b.manifest
    assert m.architecture == "hemanet" and m.input.height == m.input.width == 64 and m.input.white_balance
    assert m.crop.scale == "session" and m.crop.cell_fraction == pytest.approx(0.685)
    assert m.notice.startswith("research use only") and "DeepAPL" in m.notice
    assert m.metrics["fp32"]["accuracy"] - m.metrics["int8"]["accuracy"] <= 0.01
    ck = ROOT / "export" / "checkpoints" / f"{name}.pt"
    assert m.provenance["source_model"]["sha256"] == sha256_file(ck)
    res = subprocess.run(
        [sys.executable, "-m", "hemaedge", "verify", str(b.path), "--json"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and json.loads(res.stdout)["passed"] is True, res.stderr[-1500:]


def test_blast_aware_bundle_carries_its_triage_rules_and_gates_its_blast_recall():
    from hemaedge.edge.count.triage import rules_for_bundle

    b = load_bundle(default_bundle_path("hemanet64-blast"))
    m = b.manifest
    assert {"blast", "promyelocyte", "smudge_cell", "neutrophil_band", "lymphocyte_variant"} <= set(m.classes)
    assert m.class_groups["blasts"] == ["blast"]
    rules = rules_for_bundle(b)
    assert rules is not None and rules.apl is not None and rules.false_call_rate > 0
    assert {c.name for c in rules.chronic} == {"CML pattern", "CLL pattern"}
    gate = m.metrics["critical_classes"]  # INT8 recall per critical class on the 22 held-out patients' cells
    assert set(gate) == {"blast", "promyelocyte"} and gate["blast"]["support"] >= 800
    assert gate["blast"]["int8_recall"] >= 0.80 and gate["blast"]["drop_points"] <= m.metrics["max_class_drop"]


@pytest.mark.data
def test_blast_aware_bundle_calls_a_held_out_aml_patient_acute(data_root, tmp_path, capsys):
    """Patient_28 is one of the 22 DeepAPL patients held out of training (docs/models.md): its cells, counted whole."""
    folder = data_root / "deepapl" / "cells" / "Patient_28"
    if not folder.is_dir():
        pytest.skip(f"data not found: {folder}")
    from hemaedge.cli import main

    code = main(["count", str(folder), "--no-tui", "--json", "--bundle", "hemanet64-blast", "--out", str(tmp_path)])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["triage"]["call"] == "acute", doc["triage"]
    assert doc["bundle"]["notice"].startswith("research use only")


# The default station model (docs/models.md "Choosing the default"): hemanet at 64 px with session stain
# normalisation, trained on PBC and BCCD train only, so it carries no research-use notice.


def test_the_default_is_the_stain_normalised_model_and_is_licence_clean():
    b = load_bundle(default_bundle_path())
    m = b.manifest
    assert b.path.name == "hemanet64-sn" and m.architecture == "hemanet"
    assert m.schema_version == 2 and m.input.stain_ref == pytest.approx(1.6) and m.input.white_balance
    assert m.crop.scale == "session" and m.crop.cell_fraction == pytest.approx(0.685)
    assert m.views == 4  # each crop classified as it lies, mirrored, flipped and turned (docs/models.md)
    assert not m.notice, "trained on PBC (CC BY) and BCCD (MIT) only: no research-use terms"
    recipe = m.provenance["training_recipe"]
    assert recipe["train"] == ["pbc_train", "bccd_train"] and recipe["sessnorm"] is True
    assert m.metrics["fp32"]["accuracy"] - m.metrics["int8"]["accuracy"] <= 0.01
    assert m.provenance["source_model"]["sha256"] == sha256_file(ROOT / "export" / "checkpoints" / "hemanet64-sn.pt")
    res = subprocess.run(
        [sys.executable, "-m", "hemaedge", "verify", str(b.path), "--json"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and json.loads(res.stdout)["passed"] is True, res.stderr[-1500:]


@pytest.mark.data
def test_the_default_keeps_pbc_val_through_the_station_path(data_root):
    """The no-regression bar: PBC val (8 classes) through detect, crop, stain normalisation and INT8 >= 0.96."""
    from hemaedge.edge.bundle.class_groups import default_class_groups
    from hemaedge.edge.station import Station
    from hemaedge.evaluation.labelled import read_labelled
    from hemaedge.evaluation.station import evaluate_station, match_labels

    folder = data_root / "pbc256"
    if not folder.is_dir():
        pytest.skip(f"data not found: {folder}")
    cells, _ = read_labelled(folder, "val")
    with Station.from_bundle(None) as station:
        m = station.manifest
        groups = m.class_groups or default_class_groups(m.classes)
        res = evaluate_station(station, cells, match_labels([c.label for c in cells], m.classes, groups))
    d = res.to_dict()
    assert d["accuracy"] >= 0.96, d["accuracy"]
    assert 1.4 < d["stain_strength"] < 1.9  # PBC is the reference stain: a gain near 1
