"""Accuracy-aware INT8 search on a tiny model built to quantize badly (an outlier channel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from hemaedge.edge.classify.onnxruntime import reference_session  # noqa: E402
from hemaedge.export.quant_search import SearchResult, rank_nodes, search_int8, throughput  # noqa: E402
from hemaedge.export.quantize import quantize_int8  # noqa: E402
from torch import nn  # noqa: E402


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.proj = nn.Conv2d(16, 16, 1)  # linear output: the outlier channel lives here
        self.mix = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.mix(self.proj(self.stem(x))))


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """FP32-identical reparameterisation: proj channel 3 x200, mix's weights on it /200.

    Per-tensor activation scales then spend the INT8 range on one channel and
    crush the other 15 to a few levels; FP32 outputs do not change.
    """
    tmp = tmp_path_factory.mktemp("qs")
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(256, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        net.proj.weight[3] *= 200.0
        net.proj.bias[3] *= 200.0
        net.mix.weight[:, 3] /= 200.0
        assert (net(x) - ref).abs().max() < 1e-3
    path = tmp / "outlier.onnx"
    torch.onnx.export(
        net,
        (x[:2],),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    top2 = ref.topk(2, 1).values
    margin = top2[:, 0] - top2[:, 1]
    keep = (margin > margin.median()).numpy()  # labels = confident FP32 predictions: FP32 accuracy is 1.0
    return path, x.numpy(), x.numpy()[keep], ref.argmax(1).numpy()[keep], tmp


def _factory(xcal):
    def make():
        class Reader:
            def __init__(self) -> None:
                self.it = iter([{"input": xcal[i : i + 32]} for i in range(0, 128, 32)])

            def get_next(self):
                return next(self.it, None)

        return Reader()

    return make


def _eval(xval, labels):
    def ev(path: Path) -> float:
        sess = reference_session(path)  # as the exporter's gate measures, alike on every CPU
        return float((sess.run(None, {"input": xval})[0].argmax(1) == labels).mean())

    return ev


def test_plain_int8_misses_the_gate_and_search_keeps_the_outlier_path_float(outlier_model):
    path, xcal, xval, labels, tmp = outlier_model
    ev = _eval(xval, labels)
    assert ev(path) == 1.0
    plain = quantize_int8(path, tmp / "plain.onnx", _factory(xcal)(), "minmax", True)
    assert (1.0 - ev(plain)) * 100 > 1.0  # the model is built to fail a 1-point gate
    lines: list[str] = []
    res = search_int8(
        path,
        _factory(xcal),
        ev,
        1.0,
        out=tmp / "searched.onnx",
        baseline=1.0,
        log=lines.append,
        settings=[("minmax", True), ("entropy", True)],
    )
    assert isinstance(res, SearchResult) and res.passed and res.drop <= 1.0
    assert res.path.is_file() and ev(res.path) == pytest.approx(res.accuracy)
    assert "/mix/Conv" in res.excluded_nodes and "/proj/Conv" in res.excluded_nodes
    assert len(res.excluded_nodes) <= 4
    assert (
        [r["stage"] for r in res.log][:2] == ["calibration", "calibration"]
        and res.log[-2]["stage"] == "float-fallback"
        and res.log[-1]["stage"] == "result"
    )
    assert any("float nodes" in ln for ln in lines)


def test_ranking_puts_the_node_reading_the_outlier_tensor_first(outlier_model):
    path, xcal, *_rest, tmp = outlier_model
    q = quantize_int8(path, tmp / "rank.onnx", _factory(xcal)(), "minmax", True)
    ranking = rank_nodes(path, q, _factory(xcal)(), max_batches=2)
    name, label, db, group = ranking[0]
    assert name == "/mix/Conv" and label.startswith("mix") and db < 10
    assert set(group) == {"/mix/Conv", "/proj/Conv"}
    assert all(r[2] >= db for r in ranking)


def test_search_stops_at_the_first_setting_within_the_gate(outlier_model):
    path, xcal, xval, labels, tmp = outlier_model
    res = search_int8(
        path, _factory(xcal), _eval(xval, labels), 100.0, out=tmp / "easy.onnx", baseline=1.0, log=lambda m: None
    )
    assert res.passed and res.excluded_nodes == [] and len(res.log) == 1 and res.method == "entropy"
    assert res.per_channel is True


def test_skip_avoids_rerunning_the_plain_setting(outlier_model):
    path, xcal, xval, labels, tmp = outlier_model
    res = search_int8(
        path,
        _factory(xcal),
        _eval(xval, labels),
        100.0,
        out=tmp / "skip.onnx",
        baseline=1.0,
        log=lambda m: None,
        skip=[("entropy", True)],
    )
    assert res.method == "percentile" and len(res.log) == 1


def test_throughput_measures_crops_per_second(outlier_model):
    path, *_ = outlier_model
    assert throughput(path, (4, 3, 16, 16), seconds=0.2) > 0


@pytest.mark.slow
@pytest.mark.parametrize("ops", ["weighted", "all"])
def test_export_model_search_through_the_pipeline(tmp_path, ops):
    """``export-model --int8 --search``: the lead's pipeline calls search_int8 when plain INT8 fails the gate.

    A tiny bloodcnn5 learns a synthetic 8-class task (class = colour tint) in a few seconds; then four
    channels are scaled x300 and the next conv's weights on them /300 (ReLU and max-pool are positively
    homogeneous, so FP32 is unchanged) - an outlier channel, as trained networks grow them.
    """
    from hemaedge.edge.bundle import InputSpec, load_bundle, preprocess
    from hemaedge.edge.errors import AccuracyGateError
    from hemaedge.export import checkpoint
    from hemaedge.export import exporter as pipeline
    from hemaedge.export.models import build

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 1000)
    tint = np.array([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], np.float32) * 60 - 30
    imgs = np.clip(rng.normal(128, 40, (1000, 28, 28, 3)) + tint[labels][:, None, None, :], 0, 255).astype(np.uint8)
    spec = InputSpec(height=28, width=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x, y = torch.from_numpy(preprocess(imgs[:800], spec)), torch.from_numpy(labels[:800])
    torch.manual_seed(0)
    kw = {"width": 0.5, "hidden": 16, "in_size": 28}
    net = build("bloodcnn5", 8, **kw)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(80):
        i = torch.randint(0, 800, (48,))
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():  # a quarter of the channels: too much mass for a clipping calibrator to cut off
        net.features[8].weight[:4] *= 300.0
        net.features[8].bias[:4] *= 300.0
        net.features[10].weight[:, :4] /= 300.0
    data = tmp_path / "synthetic_bloodmnist.npz"
    np.savez(
        data,
        train_images=imgs[:800],
        train_labels=labels[:800, None],
        val_images=imgs[800:],
        val_labels=labels[800:, None],
        test_images=imgs[:8],
        test_labels=labels[:8, None],
    )
    ck = tmp_path / "outlier.pt"
    checkpoint.save(
        ck,
        arch="bloodcnn5",
        arch_kwargs=kw,
        classes=[f"c{i}" for i in range(8)],
        state_dict=net.state_dict(),
        input={"height": 28, "width": 28, "mean": [0.5] * 3, "std": [0.25] * 3},
    )
    opts = dict(
        source=str(ck), data=str(data), int8=True, calib_size=256, calib_method="minmax", max_drop=1.0, quant_ops=ops
    )
    with pytest.raises(AccuracyGateError):
        pipeline.run_export(pipeline.ExportOptions(out=str(tmp_path / "plain"), **opts), log=lambda m: None)
    summary = pipeline.run_export(
        pipeline.ExportOptions(out=str(tmp_path / "searched"), search=True, **opts), log=lambda m: None
    )
    manifest = load_bundle(summary["bundle"]).manifest
    assert manifest.metrics["fp32"]["accuracy"] > 0.9
    assert manifest.metrics["drop_points"] <= 1.0
    assert manifest.extra["int8_search"]["float_nodes"] == manifest.calibration["float_nodes"]
    if ops == "all":  # a pair on every tensor: the outlier channels' producer, their ReLU and their consumer
        assert len(manifest.calibration["float_nodes"]) == 3
    else:  # pairs only where a weighted operator reads: the outlier channels reach one, features.10
        assert manifest.extra["int8_search"]["float_node_labels"] == ["features.10 (Conv)"]
    speed = manifest.extra["int8_search"]["speed"]  # the speed cost is reported, for all three models
    assert set(speed) >= {"fp32", "int8_plain", "int8_searched", "searched_vs_plain"}
    assert all(speed[k]["crops_per_cpu_s"] > 0 for k in ("fp32", "int8_plain", "int8_searched"))


def test_entropy_bins_make_entropy_differ_from_minmax(tmp_path):
    """ORT's stock entropy calibration equals min-max (one candidate threshold); ours searches 2048 bins."""
    import onnx
    from helpers import tiny_onnx
    from hemaedge.export.quant_search import entropy_bins
    from onnx import numpy_helper

    src = tiny_onnx(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    data = [rng.standard_t(3, (32, 3, 28, 28)).astype(np.float32) for _ in range(4)]

    def reader():
        class R:
            def __init__(self) -> None:
                self.it = iter([{"input": d} for d in data])

            def get_next(self):
                return next(self.it, None)

        return R()

    def input_scale(path) -> float:
        inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
        return float(numpy_helper.to_array(inits["input_scale"]))

    mm = input_scale(quantize_int8(src, tmp_path / "mm.onnx", reader(), "minmax", True))
    stock = input_scale(quantize_int8(src, tmp_path / "stock.onnx", reader(), "entropy", True))
    with entropy_bins():
        kl = input_scale(quantize_int8(src, tmp_path / "kl.onnx", reader(), "entropy", True))
    assert stock == pytest.approx(mm)  # the ORT behaviour entropy_bins works around
    assert kl < 0.5 * mm  # heavy-tailed input: KL clips the tails


@pytest.mark.parametrize("method", ["minmax", "entropy", "entropy-2048", "percentile"])
def test_chunked_calibration_matches_one_pass(tmp_path, method, monkeypatch):
    """Min-max calibrated a chunk at a time (bounded memory) gives the one-pass ranges exactly; the
    histogram methods are not chunked (merged histograms are re-binned and move the scales)."""
    import contextlib

    import hemaedge.export.quantize as q
    import onnx
    from helpers import tiny_onnx
    from hemaedge.export.quant_search import entropy_bins
    from onnx import numpy_helper

    fp32 = tiny_onnx(tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    data = [rng.normal(0, 1 + i / 4, (8, 3, 28, 28)).astype(np.float32) for i in range(12)]  # widening range

    class Reader:
        def __init__(self):
            self.it = iter({"input": x} for x in data)

        def get_next(self):
            return next(self.it, None)

    def scales(chunk: int) -> dict[str, float]:
        monkeypatch.setattr(q, "CALIB_CHUNK_BATCHES", chunk)
        q.calibration_chunks.clear()
        with entropy_bins() if method == "entropy-2048" else contextlib.nullcontext():
            out = q.quantize_int8(fp32, tmp_path / f"{method}_{chunk}.onnx", Reader(), method.split("-")[0])
        chunked = method == "minmax"
        assert q.calibration_chunks == ([chunk] * (len(data) // chunk) if chunked else [])
        m = onnx.load(str(out))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        return {n.input[0]: float(inits[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}

    one_pass, chunked = scales(len(data)), scales(2)
    assert one_pass.keys() == chunked.keys() and one_pass
    for name in one_pass:
        assert chunked[name] == pytest.approx(one_pass[name], rel=1e-6), name
