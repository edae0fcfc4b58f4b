"""Session stain normalisation (``input.stain_ref``): one gain per session, the same in training and on the station.

Synthetic crops only: a stained disc on bright glass, made paler or heavier in optical density as a weaker or
stronger stain would make it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from helpers import manifest_dict
from hemaedge.calibration.datasets import set_stain_vectors
from hemaedge.edge.bundle.manifest import InputSpec, parse_manifest
from hemaedge.edge.bundle.preprocess import (
    HUE_CROPS,
    SessionStain,
    StainEstimate,
    hue_matrix,
    normalise_stain,
    optical_density,
    preprocess,
    stain_angles,
    stain_gain,
    stain_strength,
    stain_vectors,
)
from hemaedge.edge.errors import BundleError

SPEC = InputSpec(height=32, width=32, white_balance=True, stain_ref=1.6)


def _crop(rng: np.random.Generator, nucleus_od: float, size: int = 48) -> np.ndarray:
    """A white cell in miniature: glass (230) with a disc of the given summed optical density (purple hue)."""
    yy, xx = np.mgrid[:size, :size]
    od = np.zeros((size, size, 3), np.float32)
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3.5) ** 2
    od[disc] = np.array([0.4, 0.45, 0.15], np.float32) * nucleus_od * rng.uniform(0.9, 1.1)
    img = 230 * np.power(10.0, -od) + rng.normal(0, 2, od.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _restain(images: list[np.ndarray], factor: float) -> list[np.ndarray]:
    """The same cells under a stain ``factor`` times as strong (optical density scaled)."""
    out = []
    for img in images:
        x = img[None].astype(np.float32)
        out.append(np.clip(np.rint(normalise_stain(x, factor)[0]), 0, 255).astype(np.uint8))
    return out


def _session(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_crop(rng, od) for od in rng.uniform(1.2, 1.8, 24)]


def test_a_pale_slide_and_a_heavy_one_look_alike_after_normalisation():
    cells = _session()
    pale, heavy = _restain(cells, 0.55), _restain(cells, 1.5)
    plain = InputSpec(height=32, width=32, white_balance=True)
    before = np.abs(preprocess(pale, plain) - preprocess(heavy, plain)).mean()
    after = np.abs(preprocess(pale, SPEC) - preprocess(heavy, SPEC)).mean()
    assert after < 0.25 * before, (before, after)
    # each batch here is its own session; the same gain for a stated strength gives the same pixels
    strength = float(np.median(stain_strength(preprocess_resized(pale))))
    np.testing.assert_allclose(preprocess(pale, SPEC, session=strength), preprocess(pale, SPEC), atol=1e-5)


def preprocess_resized(images: list[np.ndarray]) -> np.ndarray:
    from hemaedge.edge.bundle.preprocess import resized

    return resized(images, SPEC)


def test_one_gain_per_session_keeps_a_dark_cell_darker_than_a_pale_one():
    rng = np.random.default_rng(1)
    dark, pale = _crop(rng, 2.4), _crop(rng, 0.9)
    session = [*_session(2), dark, pale]
    x = preprocess(session, InputSpec(height=32, width=32, stain_ref=1.6))  # mean 0, std 1: pixels / 255
    od = optical_density(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) * 255).sum(axis=2).max(axis=1)
    assert od[-2] > 1.8 * od[-1]  # a per-crop normalisation would have made them alike
    alone = preprocess([dark], InputSpec(height=32, width=32, stain_ref=1.6))
    assert not np.allclose(alone, x[-2:-1], atol=1e-3)  # alone it is its own session: another gain


def test_the_gain_is_bounded_and_off_without_a_reference():
    assert stain_gain(0.4, SPEC) == 2.0 and stain_gain(8.0, SPEC) == 0.5
    assert stain_gain(1.0, SPEC) == pytest.approx(1.6)
    assert stain_gain(1.0, InputSpec(height=8, width=8)) == 1.0
    assert stain_gain(None, SPEC) == 1.0


def test_the_session_keeps_its_recent_white_cells():
    s = SessionStain(kept=3)
    assert s.strength is None
    s.add([1.0, 2.0, 3.0, 10.0])
    assert len(s) == 3 and s.strength == 3.0


def test_the_station_adds_white_cells_to_its_session_and_not_platelets():
    from hemaedge.edge.records import CellKind, Crop, Detection
    from hemaedge.edge.station import classify_crops

    class Backend:
        def classify(self, batch):
            return np.tile([0.9, 0.1], (len(batch), 1)).astype(np.float32)

    class Bundle:
        class manifest:  # noqa: N801 - a stand-in for the bundle's manifest
            input = SPEC
            classes = ("a", "b")
            views = 1

    cells = _session()
    crops = [Crop(c, Detection((0, 0, 10, 10), 1.0, CellKind.WBC), 0) for c in cells[:5]]
    crops.append(Crop(cells[5], Detection((0, 0, 4, 4), 1.0, CellKind.PLATELET), 0))
    session = SessionStain()
    preds = classify_crops(Backend(), Bundle, crops, session)
    assert len(preds) == 6 and len(session) == 5


def _manifest_dict(**inp) -> dict:
    return manifest_dict(inp)


def test_the_manifest_carries_the_reference_and_says_it_needs_a_newer_reader():
    plain = parse_manifest(_manifest_dict())
    d = plain.to_dict()
    assert d["schema_version"] == 1 and "stain_ref" not in d["input"]  # bundles without it read as before
    stained = parse_manifest(_manifest_dict(stain_ref=1.6, stain_gain_range=[0.5, 2.0]))
    d = stained.to_dict()
    assert d["schema_version"] == 2 and d["input"]["stain_ref"] == 1.6 and d["input"]["stain_gain_range"] == [0.5, 2]
    d = json.loads(json.dumps(d))  # as written to disk
    assert parse_manifest(d).input == stained.input
    with pytest.raises(BundleError, match="stain"):
        parse_manifest(_manifest_dict(stain_ref=1.6, stain_gain_range=[1.5, 2.0]))
    with pytest.raises(BundleError, match="newer"):
        parse_manifest({**d, "schema_version": 4})
    # a hemaedge that knows only schema 1 refuses this bundle instead of skipping the normalisation
    from hemaedge.edge.bundle import manifest as M

    old = M.SCHEMA_VERSION
    M.SCHEMA_VERSION = 1
    try:
        with pytest.raises(BundleError, match="upgrade hemaedge"):
            parse_manifest(d)
    finally:
        M.SCHEMA_VERSION = old


def _write_source(root, factor: float, n: int = 16, seed: int = 0):
    """Two classes (by nucleus hue) in train/ and val/, stained ``factor`` times PBC-like strength."""
    import cv2

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for name, hue in (("lymphocyte", (0.55, 0.5, 0.1)), ("neutrophil", (0.3, 0.45, 0.25))):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = _crop(rng, 1.5 * factor, 28)
                od = -np.log10(np.maximum(img.astype(np.float32), 1) / 230)
                od = od.sum(axis=2, keepdims=True) * np.asarray(hue, np.float32) / sum(hue)
                img = np.clip(230 * np.power(10.0, -od), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / split / name / f"{i}.png"), img[..., ::-1])
    return root


def test_training_normalises_each_source_as_a_session_and_the_bundle_says_so(tmp_path):
    pytest.importorskip("torch")
    from hemaedge.calibration.datasets import open_dataset
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.export import train as T
    from hemaedge.export.exporter import ExportOptions, run_export

    a, pale = _write_source(tmp_path / "a", 1.0), _write_source(tmp_path / "pale", 0.6, seed=1)
    spec = InputSpec(height=28, width=28, stain_ref=1.6)
    gain_a = stain_gain(T._RawSet(open_dataset(a, "train"), 28, 0, stain=spec).stain.strength, spec)
    gain_pale = stain_gain(T._RawSet(open_dataset(pale, "train"), 28, 1, stain=spec).stain.strength, spec)
    assert gain_pale / gain_a == pytest.approx(1 / 0.6, rel=0.12)  # the pale source is brought up to the other
    assert T._RawSet(open_dataset(a, "train"), 28, 0).stain is None  # off without a reference
    recipe = T.Recipe(
        data=str(a),
        more_data=(str(pale),),
        out=str(tmp_path / "run"),
        epochs=1,
        batch=32,
        samples=128,
        optimizer="adamw",
        lr=3e-3,
        aug=("flip", "od", "gain"),
        white_balance=True,
        stain_ref=1.6,
        stain_hue=True,
        stain_hue_tolerance=3.0,
        arch_kwargs={"width": 0.5, "hidden": 16},
        threads=1,
    )
    summary = T.train(recipe, progress=False)
    out = run_export(
        ExportOptions(source=summary["final_checkpoint"], out=str(tmp_path / "b"), data=str(a)), log=lambda m: None
    )
    m = load_bundle(out["bundle"]).manifest
    assert m.schema_version == 3 and m.input.stain_ref == 1.6 and m.input.stain_gain_range == (0.5, 2.0)
    assert m.provenance["training_recipe"]["stain_ref"] == 1.6 and m.provenance["training_recipe"]["stain_hue"]
    # the reference stains are the first source's own, as measured on it
    first = set_stain_vectors(open_dataset(a, "train"), InputSpec(height=28, width=28))
    np.testing.assert_allclose(np.asarray(m.input.stain_vectors), first, atol=1e-4)
    assert m.input.stain_hue_tolerance == 3.0


@pytest.mark.data
def test_a_class_sorted_folder_is_measured_on_an_even_sample_before_counting(data_root):
    """An analyser's export is sorted by class: the session is measured on an even sample of the folder first, so its
    stain strength and scale do not start from the first class alone."""
    from hemaedge.edge.sources.files import open_images
    from hemaedge.edge.station import PRIME_IMAGES, Station

    folder = data_root / "pbc256" / "val"
    if not folder.is_dir():
        pytest.skip(f"data not found: {folder}")
    station = Station.from_bundle(None, backend=None, segmenter="stain")
    assert station.manifest.input.stain_ref  # the default normalises the stain
    source = open_images(folder)
    finder = station.cell_finder(source)
    assert 0.8 * PRIME_IMAGES <= len(finder.stain) <= PRIME_IMAGES
    assert abs(finder.stain.strength - 1.64) < 0.15, finder.stain.strength  # PBC val, all classes: 1.64


def test_the_session_summary_says_how_the_stain_was_normalised(tmp_path, capsys):
    from hemaedge.cli import main

    code = main(["count", "--demo", "--no-tui", "--json", "--target", "20", "--out", str(tmp_path / "a")])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["bundle"]["name"] == "hemanet64-sn" and doc["views"] == 4
    report = (tmp_path / "a").glob("*/report.html")
    assert "hemanet64-sn (4 views per cell)" in next(report).read_text()
    stain = doc["stain"]
    assert stain["reference"] == 1.6 and stain["cells_measured"] >= 20 and stain["strength"] > 0
    assert stain["gain"] == pytest.approx(stain_gain(stain["strength"], SPEC), abs=1e-3)
    assert "warning" not in stain  # within the bounds: nothing to warn about
    code = main(
        [
            "count",
            "--demo",
            "--no-tui",
            "--json",
            "--target",
            "5",
            "--bundle",
            "bloodcnn5",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert code == 0 and "stain" not in json.loads(capsys.readouterr().out)  # a bundle without it says nothing


@pytest.mark.data
def test_a_stain_beyond_what_the_model_normalises_is_said_plainly(data_root, tmp_path, capsys):
    """BCCD's smears carry a third of PBC's stain: the gain stops at its bound and the count says so."""
    from hemaedge.cli import main

    frames = data_root / "bccd" / "JPEGImages"
    if not frames.is_dir():
        pytest.skip(f"data not found: {frames}")
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in sorted(p.name for p in frames.glob("*.jpg"))[:6]:
        (folder / name).symlink_to((frames / name).resolve())
    code = main(["count", str(folder), "--no-tui", "--json", "--out", str(tmp_path / "s")])
    got = capsys.readouterr()
    assert got.out, got.err[-2000:]
    stain = json.loads(got.out)["stain"]
    assert code == 0 and stain["gain"] == SPEC.stain_gain_range[1] and stain["strength"] < 0.8
    assert "paler than the model can normalise" in stain["warning"]


# --- the session's two stains (``input.stain_vectors``) ---------------------------------------------------------------

NUCLEAR = np.array([0.50, 0.85, 0.14])  # a Romanowsky nucleus: absorbs red and green (purple-blue)
EOSIN = np.array([0.55, 0.69, 0.47])  # eosin: pink


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _turn(v: np.ndarray, towards: np.ndarray, degrees: float) -> np.ndarray:
    """``v`` turned by ``degrees`` in the plane it spans with ``towards`` (away from it for negative degrees)."""
    v, w = _unit(v), _unit(towards)
    w = _unit(w - (w @ v) * v)
    a = np.radians(degrees)
    return np.cos(a) * v + np.sin(a) * w


def _two_stain_cells(stains: np.ndarray, n: int = 24, seed: int = 0, size: int = 40) -> list[np.ndarray]:
    """Cells of two stains: a nucleus of the first, cytoplasm and a red cell of the second, on glass (230)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        c = size / 2 + rng.uniform(-2, 2, 2)
        r = np.hypot(yy - c[0], xx - c[1])
        nuc = (r < size / 6) * rng.uniform(1.0, 1.6)
        cyto = ((r >= size / 6) & (r < size / 3.2)) * rng.uniform(0.3, 0.6)
        rbc = (np.hypot(yy - 4, xx - 4) < 7) * rng.uniform(0.5, 0.8)
        od = nuc[..., None] * stains[0] + (cyto + rbc)[..., None] * stains[1]
        img = 230 * np.power(10.0, -od) + rng.normal(0, 1.5, od.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


REF = np.stack([_unit(NUCLEAR), _unit(EOSIN)])
HUE = InputSpec(
    height=32, width=32, white_balance=True, stain_ref=1.6, stain_vectors=tuple(tuple(r) for r in REF.round(6))
)


def test_the_two_stains_are_measured_nuclear_first():
    from hemaedge.edge.bundle.preprocess import resized

    v = stain_vectors(optical_density(resized(_two_stain_cells(REF), HUE)))
    assert v is not None and max(stain_angles(v, HUE)) < 3.0, stain_angles(v, HUE)
    one = stain_vectors(optical_density(resized(_two_stain_cells(np.stack([REF[0], REF[0]])), HUE)))
    assert one is None  # one stain only: nothing to map
    assert hue_matrix(None, HUE) is None and hue_matrix(v, SPEC) is None  # nothing measured, or a bundle without it


def test_a_bluer_and_redder_stain_looks_like_the_reference_after_mapping():
    """The same cells under stains turned 14 degrees from the reference's (as another lab's: a nuclear stain that
    absorbs less blue light, an eosin that absorbs more) come out as under the reference's."""
    turned = np.stack([_turn(REF[0], [0.5, 0.85, -0.4], 14), _turn(REF[1], [0.0, 0.5, 1.0], 14)])
    ref_cells, odd_cells = _two_stain_cells(REF), _two_stain_cells(turned)
    without = replace(HUE, stain_vectors=())
    before = np.abs(preprocess(ref_cells, without) - preprocess(odd_cells, without)).mean()
    after = np.abs(preprocess(ref_cells, HUE) - preprocess(odd_cells, HUE)).mean()
    assert after < 0.35 * before, (before, after)
    # within the tolerance a session's stains are left as they are (the strength is still normalised)
    tolerant = replace(HUE, stain_hue_tolerance=20.0)
    np.testing.assert_allclose(preprocess(odd_cells, tolerant), preprocess(odd_cells, without), atol=1e-4)
    # a tolerance short of the turn maps part of the way
    partial = np.abs(preprocess(ref_cells, HUE) - preprocess(odd_cells, replace(HUE, stain_hue_tolerance=7.0))).mean()
    assert after < partial < before


def test_the_session_measures_its_stains_on_its_first_white_cells_and_keeps_them():
    turned = np.stack([_turn(REF[0], [0.5, 0.85, -0.4], 14), REF[1]])
    session = SessionStain(hue_crops=8)
    assert session.vectors is None
    session.add_crops(_two_stain_cells(turned, n=8), HUE)
    first = session.vectors
    assert first is not None and 6 < stain_angles(first, HUE)[0] < 17 and stain_angles(first, HUE)[1] < 4
    session.add_crops(_two_stain_cells(REF, n=8, seed=3), HUE)  # later crops count for strength, not for stains
    np.testing.assert_array_equal(session.vectors, first)
    assert len(session) == 16
    est = session.estimate
    assert isinstance(est, StainEstimate) and est.strength == session.strength
    # preprocess given the estimate maps as the session does
    cells = _two_stain_cells(turned, n=4, seed=5)
    np.testing.assert_allclose(preprocess(cells, HUE, session=est), preprocess(cells, HUE, session=est), atol=0)
    with pytest.raises(ValueError, match="SessionStain or StainEstimate"):
        preprocess(cells, HUE, session=1.5)  # a bare strength cannot say how to map the stains
    assert HUE_CROPS == 64


def test_a_class_sorted_set_measures_its_stains_on_an_even_sample():
    """``SessionStain.of_set``: a folder sorted by class gives the stains of all its classes, not of the first."""
    bluish = np.stack([_turn(REF[0], [0.5, 0.85, -0.4], 14), REF[1]])
    cells = _two_stain_cells(REF, n=70) + _two_stain_cells(bluish, n=70, seed=1)
    both = SessionStain.of_set(cells, HUE)
    first_only = SessionStain.of_set(cells[:70], HUE)
    assert len(both) == 140
    assert stain_angles(both.vectors, HUE)[0] > stain_angles(first_only.vectors, HUE)[0] + 2


def test_the_manifest_carries_the_stains_and_needs_a_reader_that_maps_them():
    from hemaedge.edge.bundle import manifest as M

    ref = [list(r) for r in REF.round(6)]
    m = parse_manifest(_manifest_dict(stain_ref=1.6, stain_vectors=ref, stain_hue_tolerance=8))
    d = json.loads(json.dumps(m.to_dict()))
    assert d["schema_version"] == 3 and d["input"]["stain_vectors"] == ref and d["input"]["stain_hue_tolerance"] == 8
    assert parse_manifest(d).input == m.input
    assert "stain_vectors" not in parse_manifest(_manifest_dict(stain_ref=1.6)).to_dict()["input"]
    for bad, why in (
        (dict(stain_ref=1.6, stain_vectors=[[1, 0, 0]]), "two unit-length"),
        (dict(stain_ref=1.6, stain_vectors=[[2, 0, 0], [0, 1, 0]]), "two unit-length"),
        (dict(stain_vectors=ref), "needs input.stain_ref"),
        (dict(stain_ref=1.6, stain_vectors=ref, stain_hue_tolerance=50), "degrees"),
    ):
        with pytest.raises(BundleError, match=why):
            parse_manifest(_manifest_dict(**bad))
    old = M.SCHEMA_VERSION
    M.SCHEMA_VERSION = 2  # a hemaedge that normalises strength only refuses it instead of skipping the mapping
    try:
        with pytest.raises(BundleError, match="upgrade hemaedge"):
            parse_manifest(d)
    finally:
        M.SCHEMA_VERSION = old
