"""hemanet (the multi-source station model's architecture) exports like every registered architecture, and the
terms of a model's training data (a ``notice``, e.g. research use only) travel from its checkpoint into the bundle,
the session's summary, the report and the final terminal lines."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from helpers import tiny_bundle  # noqa: E402

from hemaedge.cli import main  # noqa: E402

NOTICE = "research use only: trained in part on a research-use data set"


CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]


def _checkpoint(tmp_path, notice: str = NOTICE, classes: list[str] = CLASSES):
    from hemaedge.export import checkpoint
    from hemaedge.export.models import build

    torch.manual_seed(0)
    net = build("hemanet", len(classes), width=0.5, in_size=32)
    for m in net.modules():  # non-trivial BatchNorm statistics, so folding them into the convolutions is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    ck = tmp_path / "hemanet.pt"
    checkpoint.save(
        ck,
        arch="hemanet",
        arch_kwargs={"width": 0.5, "in_size": 32},
        classes=list(classes),
        state_dict=net.state_dict(),
        input={"height": 32, "width": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "white_balance": True},
        crop={"cell_fraction": 0.685, "scale": "session"},
        notice=notice,
    )
    return ck, net


def _cells(tmp_path, n_classes: int):
    rng = np.random.default_rng(0)
    data = tmp_path / "cells.npz"
    imgs = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, n_classes, (64, 1))
    np.savez(data, train_images=imgs, train_labels=labels, val_images=imgs, val_labels=labels)
    return data


def test_hemanet_exports_with_parity_and_its_notice(tmp_path):
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.export.exporter import ExportOptions, run_export

    ck, net = _checkpoint(tmp_path)
    data = _cells(tmp_path, len(CLASSES))
    summary = run_export(ExportOptions(source=str(ck), out=str(tmp_path / "b"), data=str(data)), log=lambda m: None)
    bundle = load_bundle(summary["bundle"])
    m = bundle.manifest
    assert m.notice == NOTICE and m.architecture == "hemanet"
    assert m.input.white_balance and m.crop.cell_fraction == pytest.approx(0.685) and m.crop.scale == "session"
    assert m.extra["parity"]["top1_agreement"] == 1.0 and m.extra["parity"]["max_abs_diff"] < 1e-4


def test_a_bundle_without_a_notice_has_none(tmp_path):
    from hemaedge.edge.bundle import load_bundle

    assert load_bundle(tiny_bundle(tmp_path / "plain")).manifest.notice == ""


def test_the_notice_is_in_the_summary_the_report_and_the_final_lines(tmp_path, capsys):
    bundle = tiny_bundle(tmp_path / "b", notice=NOTICE)
    out = tmp_path / "s"
    code = main(
        ["count", "synthetic://?seed=3&frames=40&wbc=5", "--bundle", str(bundle), "--out", str(out), "--no-tui"]
    )
    cap = capsys.readouterr()
    assert code in (0, 1), cap.err
    assert f"model terms: {NOTICE}" in cap.out.replace("\n", " ")
    (path,) = out.rglob("summary.json")
    session = path.parent
    summary = json.loads(path.read_text())
    assert summary["bundle"]["notice"] == NOTICE
    assert f"Model terms: {NOTICE}" in (session / "report.html").read_text()


def test_export_ships_triage_rules_and_refuses_rules_the_model_cannot_serve(tmp_path):
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.count.triage import rules_for_bundle
    from hemaedge.edge.errors import InputError, UsageError
    from hemaedge.export.exporter import ExportOptions, run_export

    rules = tmp_path / "triage.json"
    rules.write_text(json.dumps({"version": "test-1", "false_call_rate": 0.004}))
    ck, _ = _checkpoint(tmp_path)  # no blast, no promyelocyte: the slide call could never see leukaemia
    data = _cells(tmp_path, len(CLASSES))
    with pytest.raises(UsageError, match="names no class or group"):
        run_export(ExportOptions(source=str(ck), out=str(tmp_path / "a"), data=str(data), triage=str(rules)))
    assert not (tmp_path / "a").exists()
    with pytest.raises(InputError, match="does not exist"):
        ExportOptions(
            source=str(ck), out=str(tmp_path / "a"), data=str(data), triage=str(tmp_path / "no.json")
        ).validate()

    ck, _ = _checkpoint(tmp_path, classes=["blast", *CLASSES])
    data = _cells(tmp_path, len(CLASSES) + 1)
    summary = run_export(
        ExportOptions(source=str(ck), out=str(tmp_path / "b"), data=str(data), triage=str(rules)), log=lambda m: None
    )
    got = rules_for_bundle(load_bundle(summary["bundle"]))
    assert got is not None and got.version == "test-1" and got.false_call_rate == pytest.approx(0.004)


def test_evaluate_data_matches_class_folders_to_the_bundle_by_name_not_by_sorted_order(tmp_path):
    """The bundle's classes (neutrophil, lymphocyte, monocyte, eosinophil) are not in alphabetical order: a folder
    tree must still be scored against the right class (it once was scored by sorted position: 2 % on 75 %)."""
    import cv2
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.evaluation.command import evaluate_bundle
    from hemaedge.export.exporter import ExportOptions, run_export

    ck, _ = _checkpoint(tmp_path)
    data = _cells(tmp_path, len(CLASSES))
    bundle = load_bundle(run_export(ExportOptions(source=str(ck), out=str(tmp_path / "b"), data=str(data)))["bundle"])
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    from hemaedge.edge.bundle import preprocess
    from hemaedge.edge.classify.onnxruntime import OrtBackend

    with OrtBackend(bundle, "fp32") as be:  # label each picture with what the model says: accuracy must be 1.0
        pred = be.classify(preprocess(list(imgs), bundle.manifest.input)).argmax(1)
    for i, (img, k) in enumerate(zip(imgs, pred)):
        folder = tmp_path / "cells" / "val" / CLASSES[k]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i}.png"), img[..., ::-1])
    rep = evaluate_bundle(bundle, str(tmp_path / "cells"), "val", "fp32")
    assert rep["n"] == 40 and rep["accuracy"] == 1.0
