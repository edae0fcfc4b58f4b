"""EfficientNet-B0/B1/B2: torchvision-compatible keys and sizes, checkpoints, in-graph resize, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hemaedge.export.models import DEFAULTS, build, names  # noqa: E402
from hemaedge.export.models.efficientnet import StochasticDepth, load_torchvision_state_dict  # noqa: E402

# Total parameters of torchvision.models.efficientnet_bX(num_classes=1000), from torchvision's weight metadata.
TORCHVISION_PARAMS = {"efficientnet_b0": 5_288_548, "efficientnet_b1": 7_794_184, "efficientnet_b2": 9_109_994}

# A few state_dict keys and shapes as torchvision writes them (B0, 1000 classes).
TORCHVISION_B0_KEYS = {
    "features.0.0.weight": (32, 3, 3, 3),
    "features.0.1.running_var": (32,),
    "features.1.0.block.0.0.weight": (32, 1, 3, 3),  # depthwise (expand ratio 1: no expand conv)
    "features.1.0.block.1.fc1.weight": (8, 32, 1, 1),  # squeeze-excitation
    "features.1.0.block.1.fc2.bias": (32,),
    "features.1.0.block.2.0.weight": (16, 32, 1, 1),  # project
    "features.2.0.block.0.0.weight": (96, 16, 1, 1),  # expand
    "features.2.0.block.1.0.weight": (96, 1, 3, 3),
    "features.2.0.block.2.fc1.weight": (4, 96, 1, 1),
    "features.3.1.block.1.0.weight": (240, 1, 5, 5),
    "features.6.3.block.3.1.num_batches_tracked": (),
    "features.7.0.block.3.0.weight": (320, 1152, 1, 1),
    "features.8.0.weight": (1280, 320, 1, 1),
    "classifier.1.weight": (1000, 1280),
    "classifier.1.bias": (1000,),
}


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def settle_bn(model, x):
    """Give BatchNorm realistic running statistics (random init otherwise collapses activations to ~0)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(name):
    assert name in names()
    assert DEFAULTS[name]["input_size"] == 256
    assert _n_params(build(name, 1000)) == TORCHVISION_PARAMS[name]


def test_b0_key_names_and_shapes_match_torchvision():
    sd = build("efficientnet_b0", 1000).state_dict()
    for key, shape in TORCHVISION_B0_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 360
    assert not any(k.startswith(("stem", "head", "blocks", "_")) for k in sd)


def test_depth_and_width_multipliers():
    b1 = build("efficientnet_b1", 10).state_dict()
    b2 = build("efficientnet_b2", 10).state_dict()
    # depth 1.1: stage 2 has ceil(2 * 1.1) = 3 blocks; B0 has 2
    assert "features.2.2.block.0.0.weight" in b1
    assert "features.2.2.block.0.0.weight" not in build("efficientnet_b0", 10).state_dict()
    # width 1.1: 320 -> 352 last stage channels, head 4x
    assert tuple(b2["features.8.0.weight"].shape) == (1408, 352, 1, 1)
    assert tuple(b2["classifier.1.weight"].shape) == (10, 1408)


def test_bn_and_dropout_match_torchvision_defaults():
    m = build("efficientnet_b2", 5)
    bn = m.features[0][1]
    assert bn.eps == 1e-5 and bn.momentum == 0.1  # torchvision B0-B4 use BatchNorm2d defaults
    assert m.classifier[0].p == 0.3 and build("efficientnet_b0", 5).classifier[0].p == 0.2


def test_stochastic_depth_ramp_and_modes():
    m = build("efficientnet_b0", 4)
    sds = [mod.p for mod in m.modules() if isinstance(mod, StochasticDepth)]
    assert len(sds) == 16 and sds[0] == 0.0 and sds[-1] == pytest.approx(0.2 * 15 / 16)
    sd = StochasticDepth(0.5)
    x = torch.ones(64, 2, 3, 3)
    sd.train()
    y = sd(x)
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0} and 0 < (y == 0).all(dim=(1, 2, 3)).sum() < 64
    sd.eval()
    assert torch.equal(sd(x), x)


def test_checkpoint_with_other_class_count_loads_via_its_classes(tmp_path):
    from hemaedge.export import checkpoint

    classes = [f"c{i}" for i in range(12)]
    src = build("efficientnet_b0", 12, internal_size=32)
    path = tmp_path / "b0.pt"
    checkpoint.save(
        path, arch="efficientnet_b0", arch_kwargs={"internal_size": 32}, classes=classes, state_dict=src.state_dict()
    )
    model = checkpoint.build_model(checkpoint.load(path))
    assert model.classifier[1].out_features == 12
    x = torch.randn(2, 3, 64, 64)
    src.eval()
    assert torch.allclose(model(x), src(x))


def test_torchvision_state_dict_with_1000_classes_into_8_class_model():
    tv_like = build("efficientnet_b0", 1000).state_dict()
    tv_like = {"module." + k: v for k, v in tv_like.items()}  # DataParallel prefix is tolerated
    model = build("efficientnet_b0", 8)
    skipped = load_torchvision_state_dict(model, tv_like)
    assert skipped == ["classifier.1.weight", "classifier.1.bias"]
    assert torch.equal(model.state_dict()["features.0.0.weight"], tv_like["module.features.0.0.weight"])
    with pytest.raises(ValueError):
        load_torchvision_state_dict(build("efficientnet_b0", 8), tv_like, strict_head=True)


def test_internal_resize_keeps_keys_and_equals_resizing_outside():
    torch.manual_seed(0)
    plain = build("efficientnet_b0", 3)
    small = build("efficientnet_b0", 3, internal_size=32)
    assert list(plain.state_dict()) == list(small.state_dict())
    small.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 64, 64)
    settle_bn(plain, torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    small.load_state_dict(plain.state_dict())
    small.eval()
    ref = plain(torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    assert torch.allclose(small(x), ref, atol=1e-6)


def test_onnx_export_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build("efficientnet_b0", 8, internal_size=32)
    x = torch.randn(2, 3, 64, 64)
    settle_bn(model, torch.randn(32, 3, 64, 64))
    path = tmp_path / "b0.onnx"
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 64, 64)
    out = sess.run(None, {"input": x3.numpy()})[0]
    ref = model(x3).detach().numpy()
    assert 1e-3 < np.abs(ref).max() < 1e3
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
    assert any(n.op_type == "Resize" for n in __import__("onnx").load(str(path)).graph.node)
