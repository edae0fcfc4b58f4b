"""ONNX Runtime's graph optimisation level on the CPU (``edge/classify/onnxruntime.py`` ``cpu_session``).

On an x86 CPU without VNNI, ONNX Runtime's full graph optimisations run INT8 models through kernels that saturate,
and the shipped models' outputs then miss their golden outputs; the basic level reproduces them. The station keeps
the full level unless the basic one lies clearly closer to the golden outputs. The choice is tested with a fake
distance (any machine), and the shipped INT8 models must reproduce their golden outputs, and the shipped
``bloodcnn5`` its val accuracy, on whatever CPU runs the tests.
"""

from __future__ import annotations

import pytest

ort = pytest.importorskip("onnxruntime")

from hemaedge.edge.classify import onnxruntime as ort_mod  # noqa: E402
from hemaedge.edge.classify.onnxruntime import LEVEL_MARGIN, OrtBackend, cpu_session, session_options  # noqa: E402


def _options(seen):
    def options(level):
        seen.append(level)
        return session_options(level)

    return options


def _distance(seen, full, basic):
    """A fake distance from the golden outputs: ``full`` for the session made last at the full level, else ``basic``."""
    return lambda sess: full if seen[-1] == "all" else basic


def test_the_basic_level_runs_when_it_is_clearly_closer_to_the_golden_outputs_and_is_remembered(
    tiny_bundle_dir, monkeypatch
):
    monkeypatch.setattr(ort_mod, "_LEVEL_OF", {})
    path = tiny_bundle_dir / "model.int8.onnx"
    seen = []
    sess, note = cpu_session(path, _options(seen), _distance(seen, 2.3, 0.0))  # as on an AVX2-only CPU
    assert seen == ["all", "basic"] and note.startswith("basic graph optimisations") and sess.get_inputs()
    seen.clear()
    _, note = cpu_session(path, _options(seen), lambda s: pytest.fail("measured again"))
    assert seen == ["basic"] and note.startswith("basic")  # remembered for the file


@pytest.mark.parametrize("full, basic", [(0.0, 0.0), (0.13, 0.0), (0.5, 0.5 - LEVEL_MARGIN / 2), (1.0, 0.9)])
def test_the_full_level_stays_when_it_is_exact_or_within_the_margin_else_the_basic_one_runs(
    tiny_bundle_dir, monkeypatch, full, basic
):
    monkeypatch.setattr(ort_mod, "_LEVEL_OF", {})
    seen = []
    margin_only = full - basic <= LEVEL_MARGIN
    _, note = cpu_session(tiny_bundle_dir / "model.int8.onnx", _options(seen), _distance(seen, full, basic))
    if full == 0.0:
        assert seen == ["all"] and note == ""  # exact: the basic level is not even tried
    elif margin_only:
        assert seen == ["all", "basic"] and note == ""
    else:  # 0.13 against 0.0: a portable INT8 model whose golden outputs the basic level made
        assert seen == ["all", "basic"] and note.startswith("basic")


def test_without_a_distance_the_full_level_runs_unchecked(tiny_bundle_dir, monkeypatch):
    monkeypatch.setattr(ort_mod, "_LEVEL_OF", {})
    seen = []
    assert cpu_session(tiny_bundle_dir / "model.onnx", _options(seen), None)[1] == "" and seen == ["all"]


@pytest.mark.parametrize("name", ["hemanet64-sn", "hemanet64-blast", "bloodcnn5"])
def test_the_shipped_int8_classifiers_reproduce_their_golden_outputs_on_this_cpu(name):
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.bundle.golden import compare_golden, load_golden
    from hemaedge.edge.models import default_bundle_path

    bundle = load_bundle(default_bundle_path(name))
    golden = load_golden(bundle)
    with OrtBackend(bundle, precision="int8", providers=["cpu"]) as be:
        rep = compare_golden(golden, be.classify(golden.inputs), be.golden_key, bundle.manifest.output_kind)
    assert rep.passed, (be.name, rep.max_abs_diff, rep.top1_agreement)


def test_the_shipped_detector_reproduces_its_golden_outputs_on_this_cpu():
    from hemaedge.edge.segment.learned import verify_detector

    rep = verify_detector("wbcnet")
    assert rep["precision"] == "int8" and rep["passed"], rep


def test_the_shipped_28px_int8_model_keeps_its_val_accuracy_on_this_cpu(data_root):
    """Its golden check passes even with saturated kernels (large logits), so accuracy is checked too."""
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.models import default_bundle_path
    from hemaedge.evaluation.command import evaluate_bundle

    npz = data_root / "bloodmnist28.npz"
    if not npz.is_file():
        pytest.skip(f"data not found: {npz}")
    bundle = load_bundle(default_bundle_path("bloodcnn5"))
    rep = evaluate_bundle(bundle, str(npz), "val", "int8", variant="cpu")
    assert rep["accuracy"] == pytest.approx(bundle.manifest.metrics["int8_cpu"]["accuracy"], abs=1e-9)
