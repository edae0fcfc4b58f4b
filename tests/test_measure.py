"""Choice by measurement (``edge/classify/measure.py``): the selection rule and the cache, on fake backends.

Nothing here is timed: the fake backends' speeds are given (``helpers.fake_measure``) or irrelevant, so the
tests check what is chosen, what is cached and what the reason says, never how fast anything is.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest
from helpers import fake_measure
from hemaedge.edge.bundle import load_bundle, preprocess
from hemaedge.edge.bundle.golden import load_golden, write_golden
from hemaedge.edge.classify import measure as measure_mod
from hemaedge.edge.classify.base import softmax
from hemaedge.edge.classify.measure import (
    CACHE_ENV,
    Candidate,
    Measurement,
    MeasurementCache,
    cache_dir,
    choose,
    key_id,
    measure,
    station_key,
)
from hemaedge.edge.classify.onnxruntime import OrtBackend
from hemaedge.edge.classify.select import cpu_candidates, select_backend
from hemaedge.edge.errors import BackendError

RUNTIMES = {"onnxruntime": "1.0", "fakert": "2.0"}


class FakeBackend:
    """A backend with the real lifecycle whose outputs are the bundle's golden ones, optionally spoiled."""

    def __init__(self, bundle, precision="int8", golden_key=None, spoil=False, fail_on_enter=""):
        self.bundle, self.precision, self.spoil, self.fail_on_enter = bundle, precision, spoil, fail_on_enter
        self.golden_key = golden_key or precision
        self.name = "fake/CPU"
        self.entered = self.exited = 0
        self.model_path = bundle.path / "model.onnx"
        golden = load_golden(bundle)
        self._table = {x.tobytes(): y for x, y in zip(golden.inputs, golden.outputs[self.golden_key])}

    def __enter__(self):
        if self.fail_on_enter:
            raise BackendError(self.fail_on_enter)
        self.entered += 1
        return self

    def __exit__(self, *exc):
        self.exited += 1

    def classify(self, batch):
        k = len(self.bundle.manifest.classes)
        rows = [self._table.get(np.ascontiguousarray(x).tobytes(), np.zeros(k, np.float32)) for x in batch]
        logits = np.stack(rows).astype(np.float32)
        return softmax(logits[:, ::-1] if self.spoil else logits)


@pytest.fixture()
def bundle(tiny_bundle_dir):
    rng = np.random.default_rng(3)
    b = load_bundle(tiny_bundle_dir)
    x = preprocess([rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(12)], b.manifest.input)
    outs = {}
    for p in ("fp32", "int8"):
        with OrtBackend(b, p, providers=["cpu"]) as be:
            outs[p] = be.run_raw(x)
    write_golden(b, x, outs)
    return load_bundle(tiny_bundle_dir)


def _cands(bundle, spoil=(), broken=(), excluded=None):
    excluded = excluded or {}
    made = {}

    def factory(key, prec):
        def make():
            be = FakeBackend(bundle, prec, spoil=key in spoil, fail_on_enter="cannot load" if key in broken else "")
            made.setdefault(key, []).append(be)
            return be

        return make

    cands = [
        Candidate(k, k.split("/")[0], k.split("/")[1], factory(k, k.split("/")[1]), excluded.get(k, ""))
        for k in ("fakert/int8", "fakert/fp32", "onnxruntime/int8")
    ]
    return cands, made


def test_the_fastest_candidate_that_passes_the_golden_check_wins(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(measure_mod, "load_average", lambda: 0.3)  # a quiet machine
    cands, _ = _cands(bundle)
    fake = fake_measure(
        {"fakert/int8": 500, "fakert/fp32": 300, "onnxruntime/int8": 900}, failing=("onnxruntime/int8",)
    )
    said = []
    choice = choose(
        cands, bundle, RUNTIMES, 1, cache=MeasurementCache(tmp_path / "m.json"), notify=said.append, measure_fn=fake
    )
    assert choice.candidate.key == "fakert/int8" and not choice.cached
    assert choice.reason.startswith(
        "using fakert (int8 ONNX), the fastest of 3 measured here (batch 8, 1 thread, measured just now)"
    )
    assert "failed the golden check: onnxruntime int8 (top-1 0.50, max |Δp| 0.400)" in choice.reason
    assert len(said) == 1 and said[0].startswith("measuring 3 backends for bundle 'tiny-test'")


def test_a_measurement_taken_on_a_busy_machine_says_so_even_from_the_cache(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(measure_mod, "load_average", lambda: 64.0)
    cands, _ = _cands(bundle)
    kw = {"cache": MeasurementCache(tmp_path / "m.json"), "notify": lambda t: None, "measure_fn": fake_measure({})}
    for _ in range(2):
        reason = choose(cands, bundle, RUNTIMES, 1, **kw).reason
        assert "the machine was busy then (load 64.0 on" in reason and "--remeasure" in reason


def test_an_excluded_candidate_is_measured_but_never_chosen(bundle, tmp_path):
    cands, _ = _cands(bundle, excluded={"fakert/int8": "missed the INT8 gate at export"})
    fake = fake_measure({"fakert/int8": 900, "fakert/fp32": 300, "onnxruntime/int8": 100})
    choice = choose(
        cands, bundle, RUNTIMES, 1, cache=MeasurementCache(tmp_path / "m.json"), notify=lambda t: None, measure_fn=fake
    )
    assert choice.candidate.key == "fakert/fp32"
    assert "not eligible: fakert int8 (missed the INT8 gate at export)" in choice.reason


def test_no_candidate_passing_is_refused_with_what_was_measured(bundle, tmp_path):
    cands, _ = _cands(bundle)
    fake = fake_measure({}, failing=tuple(c.key for c in cands))
    with pytest.raises(BackendError, match="no backend here reproduces bundle 'tiny-test'.*failed the golden check"):
        choose(
            cands,
            bundle,
            RUNTIMES,
            1,
            cache=MeasurementCache(tmp_path / "m.json"),
            notify=lambda t: None,
            measure_fn=fake,
        )


def test_measured_once_then_cached_and_measured_again_when_anything_changes(bundle, tmp_path):
    cache = MeasurementCache(tmp_path / "m.json")
    cands, _ = _cands(bundle)
    fake = fake_measure({"fakert/int8": 500})
    quiet = {"cache": cache, "notify": lambda t: None, "measure_fn": fake}
    assert not choose(cands, bundle, RUNTIMES, 1, **quiet).cached
    again = choose(cands, bundle, RUNTIMES, 1, **quiet)
    assert again.cached and "cached from " in again.reason and len(fake.calls) == 1
    choose(cands, bundle, {**RUNTIMES, "fakert": "2.1"}, 1, **quiet)  # a runtime upgrade
    choose(cands, bundle, RUNTIMES, 2, **quiet)  # other thread count
    assert len(fake.calls) == 3
    choose(cands[:1], bundle, RUNTIMES, 1, **quiet)  # a subset of what is cached: nothing to measure
    assert len(fake.calls) == 3
    choose(cands, bundle, RUNTIMES, 1, remeasure=True, **quiet)
    assert len(fake.calls) == 4
    # a changed bundle (its manifest lists every file's sha256) is measured again
    m = bundle.manifest
    from dataclasses import replace

    from hemaedge.edge.bundle.io import write_manifest

    write_manifest(bundle.path, replace(m, metrics={**m.metrics, "note": "re-exported"}))
    choose(cands, load_bundle(bundle.path), RUNTIMES, 1, **quiet)
    assert len(fake.calls) == 5
    doc = json.loads(cache.path.read_text())
    assert doc["schema"] == 1 and len(doc["entries"]) == 4  # remeasure replaced its entry


def test_a_choice_cached_by_an_older_measuring_method_is_measured_again(bundle, tmp_path, monkeypatch):
    # an upgrade that changes how candidates are loaded or checked (hemaedge's own code, not the runtime) must not
    # keep the old code's verdict: ONNX Runtime's INT8 once failed the golden check on CPUs without VNNI, and that
    # failure stayed cached after the fix
    cache = MeasurementCache(tmp_path / "m.json")
    cands, _ = _cands(bundle)
    fake = fake_measure({"fakert/int8": 500})
    quiet = {"cache": cache, "notify": lambda t: None, "measure_fn": fake}
    monkeypatch.setattr(measure_mod, "METHOD", measure_mod.METHOD - 1)
    choose(cands, bundle, RUNTIMES, 1, **quiet)
    assert choose(cands, bundle, RUNTIMES, 1, **quiet).cached
    monkeypatch.undo()
    assert not choose(cands, bundle, RUNTIMES, 1, **quiet).cached
    assert len(fake.calls) == 2
    monkeypatch.setattr(measure_mod, "__version__", "99.0")  # a new hemaedge release
    assert not choose(cands, bundle, RUNTIMES, 1, **quiet).cached


def test_only_missing_candidates_are_measured_and_merged(bundle, tmp_path):
    cache = MeasurementCache(tmp_path / "m.json")
    cands, _ = _cands(bundle)
    fake = fake_measure({"fakert/int8": 500, "fakert/fp32": 300, "onnxruntime/int8": 900})
    quiet = {"cache": cache, "notify": lambda t: None, "measure_fn": fake}
    assert choose(cands[1:2], bundle, RUNTIMES, 1, **quiet).candidate.key == "fakert/fp32"  # --precision fp32
    assert choose(cands, bundle, RUNTIMES, 1, **quiet).candidate.key == "onnxruntime/int8"
    assert fake.calls == [["fakert/fp32"], ["fakert/int8", "onnxruntime/int8"]]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\x00\xff\xfe", b"[]", b'{"schema": 99, "entries": {}}', b'{"schema": 1, "entries": {"x": 3}}'],
)
def test_a_corrupt_cache_is_measured_again_and_rewritten(bundle, tmp_path, content):
    cands, _ = _cands(bundle)
    path = tmp_path / "m.json"
    path.write_bytes(content)
    fake = fake_measure({"fakert/int8": 500})
    choice = choose(cands, bundle, RUNTIMES, 1, cache=MeasurementCache(path), notify=lambda t: None, measure_fn=fake)
    assert choice.candidate.key == "fakert/int8" and len(fake.calls) == 1
    assert json.loads(path.read_text())["schema"] == 1
    assert choose(
        cands, bundle, RUNTIMES, 1, cache=MeasurementCache(path), notify=lambda t: None, measure_fn=fake
    ).cached


def test_a_malformed_entry_is_measured_again(bundle, tmp_path):
    cands, _ = _cands(bundle)
    cache = MeasurementCache(tmp_path / "m.json")
    key = station_key(bundle, RUNTIMES, 1)
    cache.store(key, {"fakert/int8": Measurement("fakert/int8", "fakert", "int8", 5.0)})
    doc = json.loads(cache.path.read_text())
    doc["entries"][key_id(key)]["results"]["fakert/int8"] = {"crops_per_s": "fast"}  # no key/label/precision
    cache.path.write_text(json.dumps(doc))
    fake = fake_measure({"fakert/int8": 500})
    choose(cands, bundle, RUNTIMES, 1, cache=cache, notify=lambda t: None, measure_fn=fake)
    assert fake.calls == [["fakert/int8", "fakert/fp32", "onnxruntime/int8"]]


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="needs a non-root POSIX user (root writes anywhere)"
)
def test_an_unwritable_cache_never_fails_the_choice(bundle, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    cands, _ = _cands(bundle)
    choice = choose(
        cands,
        bundle,
        RUNTIMES,
        1,
        cache=MeasurementCache(ro / "sub" / "m.json"),
        notify=lambda t: None,
        measure_fn=fake_measure({}),
    )
    assert "not cached: cannot write" in choice.reason


def test_a_cache_path_that_cannot_be_a_file_never_fails_the_choice(bundle, tmp_path):
    """Works as root too: the cache 'directory' is a regular file, so nothing can be written under it."""
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    cands, _ = _cands(bundle)
    cache = MeasurementCache(blocker / "m.json")
    fake = fake_measure({"fakert/int8": 500})
    choice = choose(cands, bundle, RUNTIMES, 1, cache=cache, notify=lambda t: None, measure_fn=fake)
    assert choice.candidate.key == "fakert/int8" and "not cached: cannot write" in choice.reason
    choose(
        cands, bundle, RUNTIMES, 1, cache=MeasurementCache(blocker / "m.json"), notify=lambda t: None, measure_fn=fake
    )
    assert len(fake.calls) == 2  # measured again, never crashed


def test_cache_lives_in_a_per_user_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "hemaedge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir().parts[-2:] == (".cache", "hemaedge")


def test_real_measure_checks_golden_outputs_and_records_failures(bundle):
    """``measure`` itself, on fake backends: golden check per candidate, load errors recorded, every backend exited."""
    cands, made = _cands(bundle, spoil=("fakert/fp32",), broken=("onnxruntime/int8",))
    out = measure(cands, bundle, batch=4, rounds=2, budget_s=0.0)
    ok, spoiled, broken = out["fakert/int8"], out["fakert/fp32"], out["onnxruntime/int8"]
    assert ok.passed and ok.eligible and ok.crops_per_s > 0 and ok.golden["top1_agreement"] == 1.0
    assert ok.golden["reference"] == "int8" and ok.golden["top1_vs_fp32"] is not None
    assert not spoiled.passed and not spoiled.eligible and spoiled.golden["top1_agreement"] < 1.0
    assert broken.error == "cannot load" and not broken.eligible and broken.crops_per_s is None
    assert all(be.entered == be.exited == 1 for key in ("fakert/int8", "fakert/fp32") for be in made[key])


def test_measure_without_golden_outputs_times_and_says_nothing_was_checked(tiny_bundle_dir, tmp_path):
    b = load_bundle(tiny_bundle_dir)
    cands = [
        Candidate("onnxruntime/fp32", "ONNX Runtime CPU", "fp32", lambda: OrtBackend(b, "fp32", providers=["cpu"]))
    ]
    out = measure(cands, b, batch=2, rounds=1, budget_s=0.0)
    assert out["onnxruntime/fp32"].golden is None and out["onnxruntime/fp32"].eligible
    choice = choose(cands, b, RUNTIMES, 1, cache=MeasurementCache(tmp_path / "m.json"), notify=lambda t: None)
    assert "the only one here, measured" in choice.reason and "no golden outputs" in choice.reason


def test_select_backend_measures_the_cpu_candidates_and_tells_the_backend_why(
    bundle, monkeypatch, fresh_measurement_cache
):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    fake = fake_measure({"onnxruntime/int8": 200.0, "onnxruntime/fp32": 900.0})
    monkeypatch.setattr(measure_mod, "measure", fake)
    said = []
    backend, reason = select_backend(bundle.path, threads=1, notify=said.append)
    assert isinstance(backend, OrtBackend) and backend.precision == "fp32" and backend.reason == reason
    assert reason.startswith("TensorRT not installed: using ONNX Runtime CPU (fp32 ONNX), the fastest of")
    assert said and "measuring" in said[0]
    assert backend.measured_key == "onnxruntime/fp32" and {m.key for m in backend.measurements} >= {
        "onnxruntime/int8",
        "onnxruntime/fp32",
    }
    backend, _ = select_backend(bundle.path, precision="int8", threads=1, notify=said.append)
    assert backend.precision == "int8" and len(said) == 1  # already measured: no second notice
    _, reason = select_backend(bundle.path, precision="fp16", threads=1, notify=said.append)
    assert reason.endswith("fp16 is a TensorRT engine precision; the CPU runs the fp32 model")


def test_cpu_candidates_follow_the_precision_asked(bundle):
    def precisions(asked: str) -> set[str]:
        return {c.precision for c in cpu_candidates(bundle, asked)[0]}

    assert precisions("auto") == {"int8", "fp32"}
    assert precisions("int8") == {"int8"}
    assert precisions("fp32") == precisions("fp16") == {"fp32"}
    cands, runtimes, _ = cpu_candidates(bundle, "auto")
    assert "onnxruntime" in runtimes and {"onnxruntime/int8", "onnxruntime/fp32"} <= {c.key for c in cands}
