"""export-model end to end on a small self-made data set: train -> ONNX -> INT8 -> gate -> bundle -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hemaedge.calibration.datasets import load_folder, load_npz, open_dataset, stratified_sample  # noqa: E402
from hemaedge.edge.bundle import load_bundle  # noqa: E402
from hemaedge.edge.errors import AccuracyGateError, InputError, UsageError  # noqa: E402
from hemaedge.export.exporter import ExportOptions, accuracy_gate, run_export  # noqa: E402

CLASSES = 4


def _make_npz(path: Path, n: int = 240, size: int = 28, seed: int = 0) -> Path:
    """Four easy classes: a dark disc whose colour says the class, on a pale noisy background."""
    rng = np.random.default_rng(seed)
    colours = np.array([[150, 40, 160], [60, 60, 170], [170, 60, 60], [60, 150, 60]], np.float32)
    yy, xx = np.mgrid[:size, :size]

    def split(m: int):
        labels = rng.integers(0, CLASSES, m)
        imgs = np.empty((m, size, size, 3), np.uint8)
        for i, c in enumerate(labels):
            cx, cy, r = rng.uniform(10, 18), rng.uniform(10, 18), rng.uniform(5, 8)
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
            img = np.full((size, size, 3), 225, np.float32) + rng.normal(0, 8, (size, size, 3))
            img[mask] = colours[c] + rng.normal(0, 12, 3)
            imgs[i] = np.clip(img, 0, 255)
        return imgs, labels.reshape(-1, 1)

    tr, trl = split(n)
    va, val = split(n // 2)
    np.savez(path, train_images=tr, train_labels=trl, val_images=va, val_labels=val)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from hemaedge.export.train import Recipe, train

    root = tmp_path_factory.mktemp("exp")
    data = _make_npz(root / "toymnist.npz")
    summary = train(
        Recipe(
            data=str(data),
            out=str(root / "run"),
            epochs=3,
            batch=32,
            lr=0.05,
            arch_kwargs={"width": 0.5, "hidden": 32},
            threads=1,
        ),
        progress=False,
    )
    return root, data, Path(summary["best_checkpoint"]), summary


def test_training_writes_best_checkpoint_log_and_learns(trained):
    root, _, ckpt, summary = trained
    assert ckpt.is_file()
    lines = [json.loads(x) for x in (root / "run" / "train.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert summary["val_accuracy"] > 0.6  # 4 easy classes; chance is 0.25


def test_fine_tuning_records_every_stage_and_the_bundle_carries_them(trained, tmp_path):
    """A model fine-tuned twice (``--init``) names all three recipes, oldest first, with each file's sha256."""
    from hemaedge.edge.bundle import sha256_file
    from hemaedge.export.train import Recipe, train

    root, data, ckpt, _ = trained
    stage2 = train(
        Recipe(
            data=str(data),
            out=str(tmp_path / "s2"),
            epochs=1,
            batch=32,
            lr=0.01,
            init=str(ckpt),
            arch_kwargs={"width": 0.5, "hidden": 32},
            threads=1,
        ),
        progress=False,
    )["best_checkpoint"]
    stage3 = train(
        Recipe(
            data=str(data),
            out=str(tmp_path / "s3"),
            epochs=1,
            batch=32,
            lr=0.005,
            init=str(stage2),
            arch_kwargs={"width": 0.5, "hidden": 32},
            threads=1,
        ),
        progress=False,
    )["best_checkpoint"]
    summary = run_export(ExportOptions(source=str(stage3), out=str(tmp_path / "b"), data=str(data)), log=lambda m: None)
    lineage = load_bundle(summary["bundle"]).manifest.provenance["training_lineage"]
    assert [st["recipe"]["lr"] for st in lineage] == [0.05, 0.01]  # the last stage is training_recipe itself
    assert [st["sha256"] for st in lineage] == [sha256_file(ckpt), sha256_file(stage2)]
    assert lineage[1]["recipe"]["init"] == str(ckpt)


def test_int8_cpu_variant_folds_relus_and_is_what_a_cpu_station_runs(trained, tmp_path):
    """The bundle's second INT8 model (asymmetric activations) lets ONNX Runtime drop every ReLU on CPU; with every
    operator quantized (``--quant-ops all``) the portable model's symmetric activations keep them in float."""
    import onnxruntime as ort
    from hemaedge.edge.classify.onnxruntime import OrtBackend
    from hemaedge.edge.commands.verify import verify

    _, data, ckpt, _ = trained
    summary = run_export(
        ExportOptions(
            source=str(ckpt),
            out=str(tmp_path / "b"),
            data=str(data),
            int8=True,
            calib_size=64,
            max_drop=5.0,
            quant_ops="all",
        ),
        log=lambda m: None,
    )
    b = load_bundle(summary["bundle"])
    int8 = [a for a in b.manifest.artifacts if a.kind == "onnx" and a.precision == "int8"]
    assert [(a.file, a.details.get("target"), a.details["activations"]) for a in int8] == [
        ("model.int8.onnx", None, "symmetric"),
        ("model.int8.cpu.onnx", "cpu", "asymmetric"),
    ]
    assert b.manifest.precisions() == ["fp32", "int8"]

    def float_relus(path) -> int:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt_{Path(path).name}")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        import onnx

        return sum(n.op_type == "Relu" for n in onnx.load(so.optimized_model_filepath).graph.node)

    assert float_relus(b.onnx_path("int8")) > 0  # symmetric: every ReLU runs in float
    assert float_relus(b.onnx_path("int8", target="cpu")) == 0
    with OrtBackend(b, "int8", providers=["cpu"]) as be:
        assert be.model_path.name == "model.int8.cpu.onnx" and be.golden_key == "int8_cpu"
    with OrtBackend(b, "int8", providers=["cpu"], variant="portable") as be:
        assert be.model_path.name == "model.int8.onnx" and be.golden_key == "int8"
    report = verify(str(b.path), "onnxruntime", "int8")
    assert report["reference"] == "int8_cpu" and report["passed"]
    assert report["max_abs_diff"] < 1e-5  # the same model on the same CPU


def test_export_int8_bundle_is_complete_and_gated(trained, tmp_path):
    _, data, ckpt, _ = trained
    summary = run_export(
        ExportOptions(
            source=str(ckpt), out=str(tmp_path / "b"), data=str(data), int8=True, calib_size=64, max_drop=5.0
        ),
        log=lambda m: None,
    )
    b = load_bundle(summary["bundle"])
    m = b.manifest
    assert m.precisions() == ["fp32", "int8"]
    assert m.calibration["num_images"] <= 64 and m.calibration["method"] == "entropy"
    assert "train" in m.calibration["set"]
    assert summary["parity"]["top1_agreement"] >= 0.99 and summary["parity"]["max_abs_diff"] < 1e-3
    assert abs(m.metrics["drop_points"] - (m.metrics["fp32"]["accuracy"] - m.metrics["int8"]["accuracy"]) * 100) < 1e-3
    assert m.provenance["data"]["val_digest"] and m.provenance["created"]
    # The bundle's ONNX gives the same val accuracy through evaluate (same preprocessing everywhere).
    from hemaedge.evaluation.command import evaluate_bundle

    rep = evaluate_bundle(b, str(data), "val", "int8", variant="portable")
    assert rep["accuracy"] == pytest.approx(m.metrics["int8"]["accuracy"], abs=1e-9)
    assert rep["model_file"] == "model.int8.onnx"
    # The CPU variant (asymmetric activations) is what ONNX Runtime runs on a CPU-only station.
    if m.metrics["int8_cpu"]["shipped"]:
        rep = evaluate_bundle(b, str(data), "val", "int8")
        assert rep["model_file"] == "model.int8.cpu.onnx"
        assert rep["accuracy"] == pytest.approx(m.metrics["int8_cpu"]["accuracy"], abs=1e-9)
    assert np.asarray(rep["confusion_matrix"]).sum() == rep["n"]


def test_export_measures_the_int8_gate_on_openvino_and_evaluate_can_record_it(trained, tmp_path, capsys):
    """OpenVINO runs the portable INT8 model with its own kernels: export measures its accuracy on val like the ONNX
    Runtime CPU variant's, and ``evaluate --backend openvino --record`` adds it to a bundle exported without it."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'hemaedge[openvino]')")
    import dataclasses

    from hemaedge.edge.bundle.io import write_manifest

    from hemaedge.cli import main

    _, data, ckpt, _ = trained
    s = run_export(
        ExportOptions(
            source=str(ckpt), out=str(tmp_path / "b"), data=str(data), int8=True, calib_size=64, max_drop=5.0
        ),
        log=lambda m: None,
    )
    m = load_bundle(s["bundle"]).manifest
    gate = m.metrics["int8_openvino"]
    assert gate["model_file"] == "model.int8.onnx" and gate["runtime"].startswith("openvino ")
    assert gate["drop_points"] == pytest.approx((m.metrics["fp32"]["accuracy"] - gate["accuracy"]) * 100, abs=1e-3)
    assert gate["passed"] is (gate["drop_points"] <= 5.0)
    # a bundle from before: no OpenVINO numbers; evaluate measures and records the same ones
    metrics = {k: v for k, v in m.metrics.items() if k != "int8_openvino"}
    write_manifest(Path(s["bundle"]), dataclasses.replace(m, metrics=metrics))
    args = ["evaluate", "--bundle", s["bundle"], "--data", str(data), "--backend", "openvino", "--json"]
    assert main([*args, "--record"]) == 0
    rep = json.loads(capsys.readouterr().out)
    again = load_bundle(s["bundle"]).manifest.metrics["int8_openvino"]
    assert rep["backend"] == "openvino" and rep["model_file"] == "model.int8.onnx"
    assert again["accuracy"] == pytest.approx(gate["accuracy"], abs=1e-9) and again["passed"] == gate["passed"]
    assert main([*args, "--record", "--limit", "10"]) == 2  # a partial evaluation is never recorded as the gate
    assert main(["evaluate", "--bundle", s["bundle"], "--data", str(data), "--record", "--json"]) == 2  # ORT: no


def test_gate_refuses_a_drop_above_max_and_prints_both_numbers():
    assert accuracy_gate(0.95, 0.945, 1.0) == pytest.approx(0.5)
    with pytest.raises(AccuracyGateError, match=r"FP32 0\.9500, INT8 0\.9300, drop 2\.00"):
        accuracy_gate(0.95, 0.93, 1.0)


def test_export_from_torchscript_pt2_and_foreign_nhwc_onnx(trained, tmp_path):
    _, data, ckpt, _ = trained
    from hemaedge.export import checkpoint

    ck = checkpoint.load(ckpt)
    model = checkpoint.build_model(ck)
    x = torch.zeros(1, 3, 28, 28)
    ts = tmp_path / "m.ts.pt"
    torch.jit.trace(model, x).save(str(ts))
    pt2 = tmp_path / "m.pt2"
    x2 = torch.zeros(2, 3, 28, 28)
    torch.export.save(torch.export.export(model, (x2,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(pt2))
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(fixed))
    mean, std = tuple(ck["input"]["mean"]), tuple(ck["input"]["std"])
    for src in (ts, pt2):
        s = run_export(
            ExportOptions(source=str(src), out=str(tmp_path / src.stem), data=str(data), mean=mean, std=std),
            log=lambda m: None,
        )
        assert s["parity"]["top1_agreement"] >= 0.99
    with pytest.raises(UsageError, match="fixed batch"):
        run_export(
            ExportOptions(source=str(fixed), out=str(tmp_path / "fx"), data=str(data), mean=mean, std=std),
            log=lambda m: None,
        )
    assert not (tmp_path / "fx").exists()
    # A Keras-style model: NHWC input, softmax inside, fixed batch 1.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, (28 * 28 * 3, CLASSES)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 28 * 28 * 3], np.int64), "shape")
    g = helper.make_graph(
        [
            helper.make_node("Reshape", ["img", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        ],
        "keras_like",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 28, 28, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, CLASSES])],
        [w, shape],
    )
    foreign = tmp_path / "keras.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), foreign)
    s = run_export(
        ExportOptions(source=str(foreign), out=str(tmp_path / "fk"), data=str(data), mean=(0, 0, 0), std=(1, 1, 1)),
        log=lambda m: None,
    )
    m = load_bundle(s["bundle"]).manifest
    assert m.output_kind == "probabilities" and "NHWC" in m.extra["foreign_onnx"]["layout"]
    assert s["parity"]["max_abs_diff"] < 1e-5


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(max_drop=-1), "max-drop"),
        (dict(calib_method="kl"), "calib-method"),
        (dict(calib="x"), "only make sense with --int8"),
        (dict(target="coreml"), "--target"),
        (dict(target="tensorrt"), "TensorRT"),
        (dict(ensemble=[("a.pt", 0.5)]), "not both"),
        (dict(views=3), "--views"),
    ],
)
def test_contradictory_options_are_refused_before_work(trained, tmp_path, kw, match):
    _, data, ckpt, _ = trained
    opts = ExportOptions(source=str(ckpt), out=str(tmp_path / "o"), data=str(data), **kw)
    with pytest.raises((UsageError, InputError, Exception), match=match):
        opts.validate()
    assert not (tmp_path / "o").exists()


def test_calibrating_on_the_validation_split_is_refused(trained, tmp_path):
    _, data, ckpt, _ = trained
    val = tmp_path / "val"
    val.mkdir()
    with pytest.raises(UsageError, match="validation"):
        ExportOptions(source=str(ckpt), out=str(tmp_path / "o"), data=str(data), int8=True, calib=str(val)).validate()


def test_readers_npz_folder_and_stratified_sample(tmp_path):
    import cv2

    data = _make_npz(tmp_path / "bloodmnist_like.npz", n=40)
    s = load_npz(data, "train")
    assert s.array.shape[1:] == (28, 28, 3) and len(s) == 40
    with pytest.raises(InputError, match="no 'test' split"):
        load_npz(data, "test")
    grey = tmp_path / "pneumoniamnist.npz"
    np.savez(grey, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.array([[0], [1], [0], [1]]))
    g = load_npz(grey, "train")
    assert g.array.shape == (4, 28, 28, 3) and g.classes == ("normal", "pneumonia")
    for c in ("a", "b"):
        (tmp_path / "tree" / "train" / c).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tmp_path / "tree" / "train" / c / f"{i}.png"), np.full((5, 6, 3), 40 * i, np.uint8))
    (tmp_path / "tree" / "train" / "a" / "bad.png").write_bytes(b"not an image")
    f = load_folder(tmp_path / "tree", "train")
    assert f.classes == ("a", "b") and len(f) == 7
    assert f.image(0).shape == (5, 6, 3)
    with pytest.raises(InputError, match="bad.png"):
        f.image(int(np.flatnonzero([p.name == "bad.png" for p in f.paths])[0]))
    flat = open_dataset(tmp_path / "tree" / "train" / "b", None)
    assert flat.classes == ("unlabelled",) and len(flat) == 3
    labels = np.array([0] * 90 + [1] * 10)
    idx = stratified_sample(labels, 20)
    assert np.bincount(labels[idx]).tolist() == [18, 2]


def test_evaluate_cli_json_has_every_metric(trained, tmp_path, capsys):
    _, data, ckpt, _ = trained
    from hemaedge.cli import main

    s = run_export(ExportOptions(source=str(ckpt), out=str(tmp_path / "b"), data=str(data)), log=lambda m: None)
    assert main(["evaluate", "--bundle", s["bundle"], "--data", str(data), "--precision", "fp32", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {"accuracy", "macro_f1", "macro_auroc", "per_class", "confusion_matrix"}
    assert set(next(iter(rep["per_class"].values()))) == {"precision", "recall", "f1", "support", "auroc"}
    assert rep["accuracy"] == pytest.approx(load_bundle(s["bundle"]).manifest.metrics["fp32"]["accuracy"])
    assert main(["evaluate", "--bundle", s["bundle"], "--data", str(data), "--precision", "int8"]) == 2  # no INT8 here


@pytest.mark.data
def test_crop_geometry_is_measured_on_the_training_images(data_root):
    """BloodMNIST (MedMNIST centre-crops 200 of 360 px) frames its cells much tighter than whole-field PBC:
    the station must cut crops at each model's own framing, so the export measures it."""
    from hemaedge.export.exporter import measure_training_framing

    npz, folder = data_root / "bloodmnist28.npz", data_root / "pbc256"
    if not npz.is_file() or not folder.is_dir():
        pytest.skip(f"data not found under {data_root}")
    tight = measure_training_framing(str(npz), None, n=120)
    whole = measure_training_framing(str(folder), None, n=120)
    assert tight["found"] >= 100 and whole["found"] >= 100
    assert 0.6 <= tight["median"] <= 0.8 and 0.33 <= whole["median"] <= 0.47


def test_export_records_where_its_crop_geometry_came_from(trained, tmp_path):
    _, data, ckpt, _ = trained
    given = run_export(
        ExportOptions(source=str(ckpt), out=str(tmp_path / "g"), data=str(data), cell_fraction=0.5, views=4),
        log=lambda m: None,
    )
    m = load_bundle(given["bundle"]).manifest
    assert m.crop.cell_fraction == 0.5 and m.extra["crop_geometry_from"] == "--cell-fraction"
    assert m.views == 4  # --views travels in the manifest for the station
    auto = load_bundle(
        run_export(ExportOptions(source=str(ckpt), out=str(tmp_path / "a"), data=str(data)), log=lambda m: None)[
            "bundle"
        ]
    ).manifest
    assert auto.extra["crop_geometry_from"] in (
        "measured on the training images",
        "default (no cell found in the training images)",
    )
    if "crop_measurement" in auto.extra:
        assert auto.crop.cell_fraction == auto.extra["crop_measurement"]["median"]


def test_export_records_and_gates_the_recall_of_critical_classes(trained, tmp_path):
    root, data, ckpt, _ = trained
    out = tmp_path / "b"
    s = run_export(
        ExportOptions(
            source=str(ckpt),
            out=str(out),
            data=str(data),
            int8=True,
            calib_size=64,
            critical_classes=["class_1"],
            quant_ops="all",  # this toy's INT8 that passes the class gate (weighted: class_1 -4.35 points, refused)
        ),
        log=lambda m: None,
    )
    crit = s["metrics"]["critical_classes"]["class_1"]
    assert set(crit) == {"fp32_recall", "int8_recall", "drop_points", "support"} and crit["support"] > 0
    assert s["metrics"]["max_class_drop"] == 2.0
    assert load_bundle(out).manifest.extra["critical_classes"] == ["class_1"]


def _silu_net(path: Path) -> Path:
    """Conv -> SiLU -> Conv -> SiLU -> pooled linear head, as EfficientNet's blocks are built."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x):
            x = torch.nn.functional.silu(self.b(torch.nn.functional.silu(self.a(x))))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), (torch.zeros(2, 3, 16, 16),), str(path), input_names=["input"], dynamo=False)
    return path


@pytest.mark.parametrize("ops", ["weighted", "all"])
def test_quant_ops_weighted_quantizes_only_what_enters_a_weighted_operator(tmp_path, ops):
    """``weighted`` (the default) leaves a convolution's output and its SiLU in float until the next convolution's
    input, so a runtime can fuse them into the convolution (TensorRT's placement); ``all`` quantizes the sigmoid's
    output too, as ONNX Runtime's quantizer does by default."""
    import onnx
    from hemaedge.export.quantize import _ListReader, quantize_int8

    fp32 = _silu_net(tmp_path / "silu.onnx")
    rng = np.random.default_rng(0)
    reader = _ListReader([{"input": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(4)])
    out = quantize_int8(fp32, tmp_path / f"{ops}.onnx", reader, "minmax", ops=ops)
    g = onnx.load(str(out)).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    quantized = [producer.get(n.input[0], "input") for n in g.node if n.op_type == "QuantizeLinear"]
    convs = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 3 and all(producer[n.input[0]] == "DequantizeLinear" for n in convs)  # INT8 either way
    if ops == "weighted":
        assert "Sigmoid" not in quantized and "Conv" not in quantized
        assert sorted(quantized) == ["Mul", "ReduceMean", "input"]  # just the inputs of the three layers
    else:
        assert "Sigmoid" in quantized
    with pytest.raises(UsageError, match="quant-ops"):
        quantize_int8(fp32, tmp_path / "x.onnx", reader, "minmax", ops="some")


def test_a_bundle_re_exports_from_its_fp32_model_and_keeps_its_record(trained, tmp_path):
    """``export-model BUNDLE``: the same FP32 model re-quantized (here with the other Q/DQ placement), re-gated and
    re-measured; what the checkpoint had told the first export (training recipe, views, crop, name) is kept, and the
    parent is recorded."""
    from hemaedge.edge.bundle import sha256_file
    from hemaedge.export.commands.export import _data_from_checkpoint

    _, data, ckpt, _ = trained
    first = dict(data=str(data), int8=True, calib_size=64, max_drop=5.0)
    parent = Path(
        run_export(
            ExportOptions(source=str(ckpt), out=str(tmp_path / "p"), views=2, quant_ops="all", name="toy", **first),
            log=lambda m: None,
        )["bundle"]
    )
    child = run_export(ExportOptions(source=str(parent), out=str(tmp_path / "c"), **first), log=lambda m: None)
    pm, cm = load_bundle(parent).manifest, load_bundle(child["bundle"]).manifest
    assert (pm.calibration["ops"], cm.calibration["ops"]) == ("all", "weighted")
    assert cm.metrics["int8_cpu"]["ops"] == "all"  # ONNX Runtime's CPU variant keeps its own placement
    assert child["parity"]["max_abs_diff"] == 0.0 and cm.metrics["fp32"] == pm.metrics["fp32"]
    assert (cm.name, cm.views, cm.crop) == ("toy", 2, pm.crop)
    assert cm.extra["crop_geometry_from"] == pm.extra["crop_geometry_from"]  # how the parent got it
    assert cm.extra.get("crop_measurement") == pm.extra.get("crop_measurement")
    assert cm.provenance["training_recipe"] == pm.provenance["training_recipe"] is not None
    assert cm.provenance["source_model"]["kind"] == "bundle"
    assert cm.provenance["source_model"]["sha256"] == sha256_file(load_bundle(parent).onnx_path("fp32"))
    record = cm.provenance["parent_bundle"]
    assert record["name"] == "toy" and record["manifest_sha256"] == sha256_file(parent / "manifest.json")
    assert record["calibration"]["ops"] == "all" and record["source_model"]["file"] == ckpt.name
    assert _data_from_checkpoint(str(parent)) == str(data)  # --data defaults to the set the bundle was checked on
    # no --calib-size: as many calibration images as the parent was calibrated on (64 here; the default 500 would
    # have taken all 240 of the toy training split)
    again = run_export(
        ExportOptions(source=str(parent), out=str(tmp_path / "c2"), data=str(data), int8=True, max_drop=5.0),
        log=lambda m: None,
    )
    assert load_bundle(again["bundle"]).manifest.calibration["num_images"] == pm.calibration["num_images"] == 64
    with pytest.raises(UsageError, match="being re-exported"):
        ExportOptions(source=str(parent), out=str(parent), overwrite=True, **first).validate()
