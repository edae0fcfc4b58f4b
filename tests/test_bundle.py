"""The bundle contract: write, load, verify; refuse missing, truncated, tampered or malformed bundles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hemaedge.edge.bundle import CropGeometry, InputSpec, cut_crop, load_bundle, preprocess
from hemaedge.edge.bundle.manifest import parse_manifest
from hemaedge.edge.errors import BundleError


def test_written_bundle_loads_and_lists_every_file(tiny_bundle_dir):
    b = load_bundle(tiny_bundle_dir)
    files = {a.file for a in b.manifest.artifacts}
    assert files == {"model.onnx", "model.int8.onnx"}
    assert b.manifest.precisions() == ["fp32", "int8"]
    assert b.onnx_path("int8").name == "model.int8.onnx"
    on_disk = {p.name for p in tiny_bundle_dir.iterdir()}
    assert on_disk == files | {"manifest.json"}


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
def test_any_flipped_byte_is_refused_naming_the_file(tiny_bundle_dir, name):
    path = tiny_bundle_dir / name
    data = bytearray(path.read_bytes())
    for pos in (0, len(data) // 2, len(data) - 1):
        corrupt = bytearray(data)
        corrupt[pos] ^= 0x01
        path.write_bytes(bytes(corrupt))
        with pytest.raises(BundleError, match=name.replace(".", r"\.")) as err:
            load_bundle(tiny_bundle_dir)
        assert "sha256" in str(err.value) and "\n" not in str(err.value)
    path.write_bytes(bytes(data))
    load_bundle(tiny_bundle_dir)


def test_truncated_and_missing_artifacts_are_refused(tiny_bundle_dir):
    p = tiny_bundle_dir / "model.int8.onnx"
    full = p.read_bytes()
    p.write_bytes(full[: len(full) // 3])
    with pytest.raises(BundleError, match=r"model\.int8\.onnx.*truncated"):
        load_bundle(tiny_bundle_dir)
    p.unlink()
    with pytest.raises(BundleError, match=r"model\.int8\.onnx is missing"):
        load_bundle(tiny_bundle_dir)


def test_manifest_problems_are_one_line_errors(tiny_bundle_dir, tmp_path):
    mf = tiny_bundle_dir / "manifest.json"
    good = json.loads(mf.read_text())
    mf.write_text(mf.read_text()[:-40])
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tiny_bundle_dir)
    for mutate, pattern in [
        (lambda d: d.update(schema_version=99), "newer than this hemaedge"),
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(classes=["a", "a"]), "distinct"),
        (lambda d: d["input"].update(colour_order="XYZ"), "colour_order"),
        (lambda d: d["artifacts"][0].update(file="../evil.onnx"), "plain file name"),
        (lambda d: d.update(class_groups={"blasts": ["myeloblast"]}), "lacks"),
    ]:
        d = json.loads(json.dumps(good))
        mutate(d)
        mf.write_text(json.dumps(d))
        with pytest.raises(BundleError, match=pattern):
            load_bundle(tiny_bundle_dir)
    mf.unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tiny_bundle_dir)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")


def test_manifest_round_trips(tiny_bundle_dir):
    m = load_bundle(tiny_bundle_dir).manifest
    again = parse_manifest(json.loads(json.dumps(m.to_dict())))
    assert again == m


def test_failed_write_leaves_no_half_bundle(tmp_path):
    from hemaedge.edge.bundle import BundleWriter, Manifest

    out = tmp_path / "b"
    with pytest.raises(RuntimeError), BundleWriter(out) as w:
        (w.dir / "x.onnx").write_bytes(b"123")
        raise RuntimeError("power cut")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    del Manifest


def test_preprocess_normalises_and_orders_channels():
    spec = InputSpec(height=4, width=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 255  # red in RGB
    x = preprocess([img], spec, "RGB")
    assert x.shape == (1, 3, 4, 4) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x[0, 0], 1.0)
    np.testing.assert_allclose(x[0, 1], -2.0)
    bgr = preprocess([img[..., ::-1]], spec, "BGR")
    np.testing.assert_array_equal(x, bgr)


def test_crop_is_square_centred_and_padded_at_edges():
    frame = np.arange(100 * 120 * 3, dtype=np.uint32).reshape(100, 120, 3).astype(np.uint8)
    geom = CropGeometry(cell_fraction=0.5)
    c = cut_crop(frame, (50, 40, 70, 60), geom)  # 20 px cell -> 40 px crop
    assert c.shape == (40, 40, 3)
    np.testing.assert_array_equal(c, frame[30:70, 40:80])
    edge = cut_crop(frame, (0, 0, 20, 20), geom)
    assert edge.shape == (40, 40, 3)


def test_session_scale_crops_keep_one_field_of_view_for_cells_of_any_size(tiny_bundle_dir):
    """``scale="session"``: the crop side follows the session's typical cell, so a small cell stays small."""
    from hemaedge.edge.bundle.io import write_manifest
    from hemaedge.edge.segment.crops import typical_side

    frame = np.zeros((200, 200, 3), np.uint8)
    geom = CropGeometry(cell_fraction=0.5, scale="session")
    typical = typical_side([(0, 0, 30, 30), (0, 0, 40, 38), (0, 0, 50, 50)])
    assert typical == 40
    small = cut_crop(frame, (90, 90, 110, 110), geom, typical)  # 20 px cell
    big = cut_crop(frame, (70, 70, 130, 130), geom, typical)  # 60 px cell
    assert small.shape == big.shape == (80, 80, 3)
    assert cut_crop(frame, (90, 90, 110, 110), geom).shape == (40, 40, 3)  # no session yet: sized to the cell
    # the manifest keeps the scale, old manifests read as "cell", unknown ones are refused
    b = load_bundle(tiny_bundle_dir)
    assert b.manifest.crop.scale == "cell"
    import dataclasses

    write_manifest(tiny_bundle_dir, dataclasses.replace(b.manifest, crop=geom))
    assert load_bundle(tiny_bundle_dir).manifest.crop == geom
    raw = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    raw["crop"]["scale"] = "zoom"
    with pytest.raises(BundleError, match="crop.scale 'zoom' is not one of"):
        parse_manifest(raw)


def test_bundle_copy_elsewhere_still_verifies(tiny_bundle_dir, tmp_path):
    dst = tmp_path / "copied"
    shutil.copytree(tiny_bundle_dir, dst)
    assert load_bundle(dst).manifest.name == "tiny-test"


def test_white_balance_removes_a_colour_cast_the_same_way_everywhere():
    rng = np.random.default_rng(0)
    scene = rng.uniform(0.2, 0.6, (2, 28, 28, 3))
    scene[:, :14] = 0.95  # glass background
    neutral = (scene * 240).astype(np.uint8)
    cast = (scene * np.array([250, 205, 235])).clip(0, 255).astype(np.uint8)  # another lamp / stain
    spec = InputSpec(height=28, width=28, white_balance=True)
    a, b = preprocess(neutral, spec), preprocess(cast, spec)
    assert np.abs(a - b).max() < 0.03
    plain = InputSpec(height=28, width=28)
    assert np.abs(preprocess(neutral, plain) - preprocess(cast, plain)).max() > 0.1


def test_a_bare_name_finds_a_shipped_bundle_but_a_real_folder_wins(tmp_path, monkeypatch, tiny_bundle_dir):
    from hemaedge.edge.models import DEFAULT_BUNDLE

    monkeypatch.chdir(tmp_path)
    assert load_bundle(DEFAULT_BUNDLE).path.name == DEFAULT_BUNDLE
    assert load_bundle(DEFAULT_BUNDLE).path.parent.name == "models"
    shutil.copytree(tiny_bundle_dir, tmp_path / DEFAULT_BUNDLE)
    assert load_bundle(DEFAULT_BUNDLE).manifest.name == "tiny-test"
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle("no-such-bundle")
