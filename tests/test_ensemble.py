"""Soft-voting ensembles fused into one ONNX graph: exact weighted average, refusals before work, manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from hemaedge.edge.errors import UsageError  # noqa: E402
from hemaedge.export import checkpoint  # noqa: E402
from hemaedge.export.ensemble import check_members, export_ensemble, member_probabilities, read_members  # noqa: E402
from hemaedge.export.models import build  # noqa: E402

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
KW = {"width": 0.5, "hidden": 16}


def _member(
    tmp: Path,
    name: str,
    seed: int,
    size: int = 28,
    classes=CLASSES,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    arch: str = "bloodcnn5",
    arch_kwargs: dict | None = None,
) -> Path:
    torch.manual_seed(seed)
    kw = dict(KW, in_size=size) if arch_kwargs is None else arch_kwargs
    model = build(arch, len(classes), **kw)
    # give BatchNorm non-trivial statistics so outputs are not near-uniform
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp / f"{name}.pt"
    checkpoint.save(
        path,
        arch=arch,
        arch_kwargs=kw,
        classes=list(classes),
        state_dict=model.state_dict(),
        input={"height": size, "width": size, "mean": list(mean), "std": list(std), "colour_order": "RGB"},
    )
    return path


def _member_onnx(ck: Path, out: Path) -> Path:
    from hemaedge.export.to_onnx import export_torch, load_source

    src = load_source(ck)
    return export_torch(src, src.meta["input"]["height"], src.meta["input"]["width"], out)


def test_fused_graph_equals_weighted_average_of_members(tmp_path):
    a, b = _member(tmp_path, "a", 1), _member(tmp_path, "b", 2)
    source, info = export_ensemble([(str(a), 0.4), (str(b), 0.6)], tmp_path / "fused.onnx")
    assert info["output_kind"] == "probabilities" and source.meta["classes"] == CLASSES
    assert [m["weight"] for m in info["members"]] == pytest.approx([0.4, 0.6])
    x = np.random.default_rng(0).normal(0, 1, (16, 3, 28, 28)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    fused = sess.run(None, {"input": x})[0]
    ref = member_probabilities(
        [_member_onnx(a, tmp_path / "a.onnx"), _member_onnx(b, tmp_path / "b.onnx")], [0.4, 0.6], x
    )
    np.testing.assert_allclose(fused, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fused.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(info["reference"](x), ref, atol=1e-5, rtol=0)
    assert np.abs(fused - ref).max() < 1e-5 and (fused.argmax(1) != fused.argmin(1)).all()


def test_weights_are_normalised_and_recorded(tmp_path):
    a, b = _member(tmp_path, "a", 1), _member(tmp_path, "b", 2)
    plan = check_members(read_members([(str(a), 2.0), (str(b), 6.0)]))
    assert plan["weights"] == pytest.approx([0.25, 0.75]) and plan["weights_given"] == [2.0, 6.0]


def test_other_normalisation_and_class_order_are_mapped_exactly(tmp_path):
    perm = CLASSES[::-1]
    a = _member(tmp_path, "a", 1)
    b = _member(tmp_path, "b", 2, classes=perm, mean=(0.6, 0.4, 0.5), std=(0.2, 0.3, 0.25))
    _, info = export_ensemble([(str(a), 0.5), (str(b), 0.5)], tmp_path / "fused.onnx")
    assert info["members"][1]["permute"] == list(range(7, -1, -1)) and info["members"][1]["renormalise"]
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (8, 28, 28, 3)).astype(np.float32) / 255
    xa = ((pixels - 0.5) / 0.25).transpose(0, 3, 1, 2).astype(np.float32)
    xb = ((pixels - np.array([0.6, 0.4, 0.5])) / np.array([0.2, 0.3, 0.25])).transpose(0, 3, 1, 2).astype(np.float32)
    pa = member_probabilities([_member_onnx(a, tmp_path / "a.onnx")], [1.0], xa)
    pb = member_probabilities([_member_onnx(b, tmp_path / "b.onnx")], [1.0], xb)[:, ::-1]
    sess = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": xa})[0], 0.5 * pa + 0.5 * pb, atol=1e-5, rtol=0)


def test_different_input_sizes_are_refused_before_any_export(tmp_path):
    a, b = _member(tmp_path, "a", 1, size=28), _member(tmp_path, "b", 2, size=32)
    out = tmp_path / "fused.onnx"
    with pytest.raises(UsageError, match="different input sizes"):
        export_ensemble([(str(a), 0.5), (str(b), 0.5)], out)
    assert not out.exists()
    plan = check_members(read_members([(str(a), 0.5), (str(b), 0.5)]), resize=True)
    assert plan["input"]["height"] == 32 and plan["plan"][0]["resize_to"] == (28, 28)


def test_member_that_resizes_internally_may_differ(tmp_path):
    a = _member(tmp_path, "a", 1, size=64, arch="efficientnet_b0", arch_kwargs={"internal_size": 32})
    b = _member(tmp_path, "b", 2, size=48, arch="efficientnet_b0", arch_kwargs={"internal_size": 32})
    plan = check_members(read_members([(str(a), 0.5), (str(b), 0.5)]))
    assert plan["input"]["height"] == 64 and plan["plan"][1]["resize_to"] is None


@pytest.mark.parametrize("case", ["classes", "single", "weight", "colour"])
def test_incompatible_members_are_refused(tmp_path, case):
    a = _member(tmp_path, "a", 1)
    if case == "classes":
        b = _member(tmp_path, "b", 2, classes=CLASSES[:-1] + ["blast"])
        specs = [(str(a), 0.5), (str(b), 0.5)]
    elif case == "single":
        specs = [(str(a), 1.0)]
    elif case == "weight":
        specs = [(str(a), 0.5), (str(_member(tmp_path, "b", 2)), 0.0)]
    else:
        b = _member(tmp_path, "b", 2)
        ck = checkpoint.load(b)
        ck["input"]["colour_order"] = "BGR"
        checkpoint.save(b, **{k: v for k, v in ck.items() if k != "format"})
        specs = [(str(a), 0.5), (str(b), 0.5)]
    with pytest.raises(UsageError):
        check_members(read_members(specs))


def test_export_model_writes_probability_bundle_with_members(tmp_path):
    """End to end through the lead's export pipeline: manifest records members, weights and output kind."""
    pipeline = pytest.importorskip("hemaedge.export.exporter")
    from hemaedge.edge.bundle import load_bundle

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny_bloodmnist.npz"
    np.savez(
        data,
        **{
            f"{s}_images": rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
            for s, n in (("train", 64), ("val", 48), ("test", 8))
        },
        **{f"{s}_labels": rng.integers(0, 8, (n, 1)) for s, n in (("train", 64), ("val", 48), ("test", 8))},
    )
    a, b = _member(tmp_path, "a", 1), _member(tmp_path, "b", 2)
    opts = pipeline.ExportOptions(
        source=None, out=str(tmp_path / "bundle"), data=str(data), ensemble=[(str(a), 0.4), (str(b), 0.6)]
    )
    summary = pipeline.run_export(opts, log=lambda m: None)
    bundle = load_bundle(summary["bundle"])
    assert bundle.manifest.output_kind == "probabilities"
    members = bundle.manifest.extra["ensemble"]
    assert [m["file"] for m in members] == ["a.pt", "b.pt"]
    assert [m["weight"] for m in members] == pytest.approx([0.4, 0.6])
    assert summary["parity"]["max_abs_diff"] < 1e-5
